"""``vit_triage``: a single-image ViT classifier trained with an attention-diversity regulariser.

The network is :class:`~dermfusion.models.baselines.SingleImage` on a timm ViT (class-token pooling, an MLP
head). While training, it adds one loss term that *rewards diverse, spread-out attention* of the class token in
the last transformer block, so no head collapses onto a few patches (a ruler, a hair, a bubble):

    p_h       = softmax over the patch tokens of (q_cls · k_patch) / √d, for head h of the last block
    H_h       = −Σ p_h log p_h                                  (entropy, nats; prefix tokens left out)
    R         = 1 − mean_{batch, heads} H_h / log P             (P patch tokens; R ∈ [0, 1], 0 = uniform)
    loss term = λ · R   under ``outputs["losses"]["attention_diversity"]``   (λ = ``diversity_weight``)

R is normalised by the largest possible entropy, log P, so λ means the same at every input size (and under
progressive resizing). Minimising λ·R has the gradient of −λ/log P · mean entropy: it raises the entropy.

How the attention is obtained without touching timm's fused attention: a forward hook on the last block's
``attn.qkv`` linear layer keeps that layer's output during a training forward pass; the class-token row of the
attention logits is recomputed from it in fp32 (B×H×1×P, a negligible cost). Every block, the last one
included, still runs its fused SDPA kernel. In evaluation (prediction, export, the explainer's attention
rollout) the hook keeps nothing and the network is exactly ``single_image``. ``diversity_weight: 0`` adds no
loss term at all.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ..data.features import FeatureSpec
from .baselines import SingleImage
from .registry import register_model

LOSS_NAME = "attention_diversity"
_STORE = "_dermfusion_qkv_store"  # where the hook leaves the qkv output; present only during a training forward


def _keep_qkv(module: nn.Module, _inputs, output: torch.Tensor) -> None:
    """Forward hook on ``attn.qkv``: append its output to the module's store when one is open. A plain function
    kept in the module's own hook table, so a deep copy of the model records into its own copy."""
    store = module.__dict__.get(_STORE)
    if store is not None:
        store.append(output)


def cls_attention_entropy(attn: nn.Module, qkv: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """B×H entropy (nats) of the class token's attention over the patch tokens, from the output of a timm
    ``Attention``'s ``qkv`` layer (B×N×3·H·d). Computed in fp32 whatever autocast is on."""
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        b, n, _ = qkv.shape
        q, k, _v = qkv.float().reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)      # per-token norms: slicing first is the same
        logits = (q * attn.scale) @ k[:, :, num_prefix:].transpose(-2, -1)  # B×H×1×P
        logp = logits.squeeze(2).log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)


@register_model("vit_triage")
class ViTTriage(SingleImage):
    """``single_image`` on a timm ViT with the attention-diversity regulariser (``diversity_weight`` = λ).

    Every ``single_image`` setting applies (its signature is advertised as this class's, below, so a config's keys
    are checked against both)."""

    def __init__(self, num_classes: int, feature_spec: FeatureSpec, *, diversity_weight: float = 0.1, **settings):
        if diversity_weight < 0:
            raise ValueError(f"diversity_weight must be >= 0 (it rewards attention entropy), not {diversity_weight}")
        super().__init__(num_classes, feature_spec, **settings)
        self.diversity_weight = float(diversity_weight)
        vit = self.encoder(self.modalities[0]).model
        attn = _last_attention(vit)
        if attn is None or getattr(vit, "cls_token", None) is None:
            name = self.encoder(self.modalities[0]).name
            raise ValueError(f"vit_triage needs a timm ViT with a class token whose last block has a fused qkv "
                             f"layer (e.g. timm:vit_small_patch16_224); {name} has none")
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        attn.qkv.register_forward_hook(_keep_qkv)

    def last_attention(self) -> nn.Module:
        """The last transformer block's attention module (the one the regulariser looks at)."""
        return _last_attention(self.encoder(self.modalities[0]).model)

    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        if not (self.training and self.diversity_weight > 0):
            return super().forward(batch, return_attention)
        qkv_layer = self.last_attention().qkv
        store: list[torch.Tensor] = []
        qkv_layer.__dict__[_STORE] = store
        try:
            out = super().forward(batch, return_attention)
        finally:
            qkv_layer.__dict__.pop(_STORE, None)
        # with no image present in the batch the encoder saw only a blank stand-in: nothing to regularise
        if store and bool(self.image_presence(batch)[:, 0].any()):
            term = self.diversity_weight * self.diversity_penalty(store[-1])
            out["losses"] = {**out.get("losses", {}), LOSS_NAME: term}
        return out

    def diversity_penalty(self, qkv: torch.Tensor) -> torch.Tensor:
        """R = 1 − mean entropy / log P (unweighted) from the last block's qkv output."""
        patches = qkv.shape[1] - self.num_prefix
        entropy = cls_attention_entropy(self.last_attention(), qkv, self.num_prefix)
        return 1.0 - entropy.mean() / math.log(max(patches, 2))


def _advertise_settings(cls: type, base: type) -> None:
    """Give ``cls.__init__`` the signature of ``base.__init__`` plus ``cls``'s own keyword settings, so
    ``registry.model_settings`` (which reads the signature) knows every setting the model accepts."""
    own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    params = list(inspect.signature(base.__init__).parameters.values())
    cut = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    cls.__init__.__signature__ = inspect.signature(base.__init__).replace(parameters=[*params[:cut], *own,
                                                                                     *params[cut:]])


_advertise_settings(ViTTriage, SingleImage)


def _last_attention(vit: nn.Module) -> nn.Module | None:
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
        return None
    attn = getattr(blocks[-1], "attn", None)
    ok = attn is not None and isinstance(getattr(attn, "qkv", None), nn.Linear) and hasattr(attn, "num_heads") \
        and hasattr(attn, "scale")
    return attn if ok else None
