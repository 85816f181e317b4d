"""PanDerm (CAE/BEiT-style) checkpoints loaded into a timm VisionTransformer.

PanDerm's encoder (SiyuanYan1/PanDerm@97e09d0, classification/models/modeling_finetune.py; key set with shapes and
sources: models/upstream_keys/panderm_{base,large}.json) names its parameters BEiT/CAE-style: ``gamma_1``/``gamma_2``
layer scale, separate ``q_bias``/``v_bias`` (no k bias), ``encoder.`` before every key in the released ViT-L file.
timm's VisionTransformer with ``init_values`` (layer scale) and ``qkv_bias`` computes the same (LayerNorm eps 1e-6,
exact GELU, scale head_dim ** -0.5), so a key mapping (:func:`panderm_checkpoint_filter_fn`) followed by a *strict*
load gives the exact encoder — or an error naming every key that did not fit. Upstream's own loaders use
``strict=False`` (its ViT-B loader does not even strip ``encoder.``), so a mismatch there goes unnoticed.

Deliberate differences from upstream, none of which changes a forward pass of the loaded weights:

* the k bias exists here (zeros from the mapping) and is trainable; attention is invariant to a k bias (it adds the
  same number to every key of a query), so its gradient is zero and it stays zero;
* ``pos_embed`` is a trainable parameter (upstream: a fixed 2-D sin-cos table, ``requires_grad=False``); fine-tuning
  may move it — set a lower learning rate on it, or freeze it, to follow upstream exactly;
* pooling: the class token after the final norm (upstream's linear-probe and feature-extraction forward, the
  default); upstream's *fine-tuning* recipe averages the patch tokens into ``fc_norm`` initialised from the final
  norm — ``model.encoder.global_pool: avg`` gives exactly that (the mapping moves ``norm.*`` to ``fc_norm.*``).
  Upstream fine-tuning also adds a zero-initialised relative position bias per block (``rel_pos_bias``); not here.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .checkpoint import (CheckpointMismatchError, WeightsNotFoundError, find_weight_file, load_state_dict_strict,
                         read_state_dict, strip_prefixes)

PANDERM_ARCHS = {
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
}
# PanDerm's published evaluation preprocessing (SiyuanYan1/PanDerm@97e09d0, classification/models/builder.py
# get_eval_transforms and run_class_finetuning.py val_trans): torchvision Resize(256) — the short side, bilinear (its
# default), antialiased PIL — CenterCrop(224), ToTensor (RGB, [0, 1]), Normalize(ImageNet mean, std typed as
# (0.228, 0.224, 0.225)). 256 = 224 / 0.875; `resize_crop_pct` is the key dermfusion's Preprocess honours (timm's own
# `crop_pct` it ignores).
PANDERM_SOURCE = ("SiyuanYan1/PanDerm@97e09d066c61b7d7cb3044a7318f66d8f308a017:"
                  "classification/models/builder.py (get_eval_transforms)")
PANDERM_DATA_CONFIG = dict(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225),
                           interpolation="bilinear", crop_pct=0.875, resize_crop_pct=0.875,
                           preprocess_source=PANDERM_SOURCE)
# The released files (PanDerm README, "Download PanDerm Pre-trained Weights"; Google Drive file ids)
RELEASED_FILES = {"vit_base_patch16_224": ("panderm_bb_data6_checkpoint-499.pth", "17J4MjsZu3gdBP6xAQi_NMDVvH65a00HB"),
                  "vit_large_patch16_224": ("panderm_ll_data6_checkpoint-499.pth", "1SwEzaOlFV_gBKf2UzeowMC8z9UH7AQbE")}
# Keys that only exist in a *pre-training* checkpoint: the CAE/CAEv2 latent regressor ("regresser", PanDerm's
# spelling) with its position embeddings and input projection, the alignment (EMA target) encoder, the decoder,
# teacher and mask token. They are dropped only when the caller opts in with ``ignore_pretraining_keys=True``, and
# the dropped keys are listed (``model.dropped_pretraining_keys``) — never silently.
PRETRAINING_ONLY_PREFIXES = (
    "regresser.", "regressor.", "rd_pos_embed", "encoder_to_regresser", "encoder_to_regressor",
    "alignment_encoder.", "pretext_neck.",
    "decoder.", "regressor_and_decoder.", "encoder_to_decoder.", "teacher.", "teacher_model.",
    "mask_token", "decoder_pos_embed", "projector.", "lm_head.", "norm_decoder.",
)


def panderm_checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module, *,
                                 ignore_pretraining_keys: bool = False,
                                 dropped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Map a PanDerm/CAE/BEiT-style state dict onto timm ``VisionTransformer`` key names.

    Unknown keys are passed through unchanged so the strict load that follows reports them. With
    ``ignore_pretraining_keys``, the pre-training-only keys are left out and appended to ``dropped``.
    """
    sd = strip_prefixes(state_dict, ("module.", "model.", "encoder."))
    if any("rel_pos_bias" in k or "relative_position" in k for k in sd):
        raise ValueError("checkpoint uses relative position bias (BEiT rel_pos_bias); the timm "
                         "VisionTransformer used for PanDerm has absolute position embeddings only — not supported")
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ignore_pretraining_keys and k.startswith(PRETRAINING_ONLY_PREFIXES):
            if dropped is not None:
                dropped.append(k)
            continue
        if k.endswith(".attn.q_bias"):
            prefix = k[: -len("q_bias")]
            v_bias = sd.get(prefix + "v_bias")
            if v_bias is None:
                out[k] = v  # leave it for the strict load to report
                continue
            out[prefix + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), v_bias])
            continue
        if k.endswith(".attn.v_bias"):
            if k[: -len("v_bias")] + "q_bias" not in sd:
                out[k] = v
            continue
        k = k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if k == "patch_embed.proj.weight" and k in own and v.shape[-2:] != own[k].shape[-2:]:
            from timm.layers import resample_patch_embed

            v = resample_patch_embed(v, list(own[k].shape[-2:]))
        if k == "pos_embed" and k in own and v.shape != own[k].shape:
            v = _fit_pos_embed(v, own[k], getattr(model, "num_prefix_tokens", 1))
        out[k] = v
    # Mean-pooling fine-tune heads (global_pool='avg') use fc_norm instead of the final norm.
    if "norm.weight" in out and "norm.weight" not in own and "fc_norm.weight" in own:
        out["fc_norm.weight"], out["fc_norm.bias"] = out.pop("norm.weight"), out.pop("norm.bias")
    return out


def _fit_pos_embed(pe: torch.Tensor, target: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Resample absolute position embeddings to the model's grid (and add a zero CLS slot if absent)."""
    from timm.layers import resample_abs_pos_embed

    n_target = target.shape[1] - num_prefix
    side = int(round(n_target ** 0.5))
    n_src = pe.shape[1]
    src_side = int(round(n_src ** 0.5))
    if src_side * src_side == n_src and num_prefix:  # checkpoint stores patch positions only
        pe = torch.cat([pe.new_zeros(1, num_prefix, pe.shape[-1]), pe], dim=1)
    return resample_abs_pos_embed(pe, new_size=[side, side], num_prefix_tokens=num_prefix)


def _released(arch: str) -> str:
    name, drive_id = RELEASED_FILES.get(arch, RELEASED_FILES["vit_base_patch16_224"])
    return f"{name} (Google Drive id {drive_id})"


def create_panderm_vit(arch: str, pretrained_path=None, *, ignore_pretraining_keys: bool = False,
                       allow_head_mismatch: bool = False, init_values: float = 0.1, **kwargs) -> nn.Module:
    """A timm ViT shaped like PanDerm's encoder, strictly loaded from ``pretrained_path`` if given."""
    import timm

    if arch not in PANDERM_ARCHS:
        raise ValueError(f"unknown PanDerm architecture {arch!r}; choose one of {', '.join(PANDERM_ARCHS)}")
    if pretrained_path is not None:
        try:
            find_weight_file(pretrained_path)  # a missing download fails before the (large) model is built
        except WeightsNotFoundError:
            raise WeightsNotFoundError(
                f"PanDerm weights not found: {pretrained_path} — download {_released(arch)} (linked from the "
                f"README of github.com/SiyuanYan1/PanDerm; dermfusion README, 'Foundation models') and set "
                f"model.pretrained_path to its local path") from None
    args = dict(PANDERM_ARCHS[arch], init_values=init_values, qkv_bias=True, num_classes=0)
    args.update(kwargs)
    model = timm.create_model(arch, pretrained=False, **args)
    if pretrained_path is not None:
        raw = read_state_dict(pretrained_path)
        dropped: list[str] = []
        sd = panderm_checkpoint_filter_fn(raw, model, ignore_pretraining_keys=ignore_pretraining_keys, dropped=dropped)
        try:
            load_state_dict_strict(model, sd, source=str(pretrained_path), allow_head_mismatch=allow_head_mismatch)
        except CheckpointMismatchError as e:
            if not ignore_pretraining_keys and any(k.startswith(PRETRAINING_ONLY_PREFIXES) for k in e.unexpected):
                raise CheckpointMismatchError(
                    e.source, e.missing, e.unexpected, e.shape_mismatch,
                    "this looks like a pre-training checkpoint (CAE regressor / alignment encoder / decoder / "
                    "teacher / mask-token keys); pass "
                    "ignore_pretraining_keys=True to drop exactly those keys") from None
            raise
        model.dropped_pretraining_keys = sorted(dropped)
        if dropped:
            logging.getLogger(__name__).info("%s: dropped %d pre-training-only key(s): %s", pretrained_path,
                                             len(dropped), ", ".join(sorted(dropped)))
    return model
