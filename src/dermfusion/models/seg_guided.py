"""``seg_guided_dual``: a segmentation-guided dual encoder with a transformer metadata encoder.

1. **Segment**: a U-Net (``models.segmenter``: pretrained-capable CNN encoder, ASPP bottleneck, attention-gated
   skips) predicts a lesion mask logit per pixel of the image (optionally at a smaller ``seg_input_size``).
   Trained jointly: while training, its BCE + Dice loss against a target mask is returned in
   ``outputs["losses"]`` (``seg_bce``, ``seg_dice``, each × ``seg_loss_weight``). The target is
   ``batch["masks"][modality]`` when the batch carries one (B×1×H×W in [0, 1], aligned with the augmented image —
   no loader provides it yet: no dataset here has masks), else the classical Otsu mask of the *augmented* image
   itself (``segmenter.fallback_masks``), so it is aligned with every crop, flip and rotation by construction and
   the data pipeline is untouched; its cost (≈ 6 ms an image at ``mask_work_size`` 96) is measured in BENCHMARKS.md.
   At inference the predicted mask alone guides the lesion branch. ``detach_mask`` (default) keeps the
   classification loss from reaching the segmenter through the mask (``false``: end to end; slower, and the mask
   drifted off the lesion early in training — BENCHMARKS.md).
2. **Two encoders**: the whole-image encoder sees the image; the lesion encoder sees image × soft mask (in the
   normalised space, so background becomes the dataset's mean colour, 0). Both see the same H × W and, by default,
   have the same architecture (``lesion_encoder`` defaults to ``encoder``, weights initialised alike but trained
   separately), so their token grids match position for position.
3. **Cross-attention, whole image → query and value, lesion → key**: out_i = Σ_j softmax_j(q_i · k_j) v_j with
   q, v from whole-image token i, j and k from lesion token j. Keys and values must pair up, so both streams need
   the same token count T; because the lesion input is the *masked* image, not a crop, key j and value j describe
   the same image location: the lesion's appearance decides *where* to look, the whole image supplies *what* is
   read there (context included). A learned null key/value pair keeps rows whose image is absent finite.
4. **Metadata**: concept + metadata tokens (``models.tokens``) and a learned CLS token through a small
   transformer encoder (timm ViT blocks, absent fields masked); its CLS output is the metadata representation.
5. **Additive fusion**: image representation + metadata representation → MLP head. An absent image is replaced by
   a learned vector (as ``single_image`` does). Auxiliary heads on both encoders' pooled features (``aux``).

Explanations: the whole-image encoder is the modality's encoder (``encoders[modality]``), so a CNN gets Grad-CAM
on it, a ViT attention rollout; ``encoders["lesion"]`` and ``encoders["segmenter"]`` are found by the optimiser's
layer-wise LR decay and cast by the bf16 backend like any encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ..data.features import FeatureSpec
from .backbones import create_backbone, tiny_backbone_spec
from .base import MultiModalNet, drop_metadata, encode_present_rows
from .layers import MLPHead, frozen_batchnorm, zero_masked
from .registry import register_model
from .segmenter import UNetDecoder, bce_dice_loss, fallback_masks, prepare_seg_encoder, seg_features
from .tokens import ConceptTokenizer, MetadataTokenizer


class KeyedCrossAttention(nn.Module):
    """Multi-head attention with the query/value stream ``x`` (B×T×D) and a separate key stream ``keys``
    (B×T×D, the same T: key j pairs with value j). ``present`` (B×T) masks keys (and their values); a learned
    null key/value pair is always present, so a row with every key masked reads the null value."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.null = nn.Parameter(torch.zeros(1, 2, dim))  # [null key, null value]
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, present: torch.Tensor, need_weights: bool = False):
        if keys.shape[:2] != x.shape[:2]:
            raise ValueError(f"the key stream has {keys.shape[1]} tokens and the query/value stream {x.shape[1]}: "
                             "both encoders must give the same token grid (same architecture and input size)")
        b = x.shape[0]
        null = self.null.to(x.dtype).expand(b, -1, -1)
        k = torch.cat([null[:, :1], zero_masked(keys, present)], 1)
        v = torch.cat([null[:, 1:], zero_masked(x, present)], 1)
        pad = torch.cat([present.new_zeros(b, 1), ~present.bool()], 1)  # True = ignore
        out, w = self.attn(x, k, v, key_padding_mask=pad, need_weights=need_weights)
        return out, w  # w: B×T×(1+T), column 0 = the null key


class MetadataTransformer(nn.Module):
    """Concept + metadata tokens and a CLS token through ``depth`` pre-norm transformer blocks; returns the CLS
    output (B×D). Absent concepts and unknown categorical fields are masked out of the attention."""

    def __init__(self, feature_spec: FeatureSpec, dim: int, depth: int, num_heads: int, dropout: float,
                 use_concepts: bool, use_metadata: bool, metadata_dropout: float):
        super().__init__()
        self.k = len(feature_spec.concepts) if use_concepts else 0
        self.use_metadata, self.metadata_dropout = use_metadata, metadata_dropout
        self.concepts = ConceptTokenizer(self.k, dim, [feature_spec.concept_modality(c)
                                                       for c in feature_spec.concepts[:self.k]])
        self.metadata = MetadataTokenizer(feature_spec.numeric if use_metadata else [],
                                          feature_spec.categorical_sizes if use_metadata else {}, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=2.0, qkv_bias=True, proj_drop=dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def num_tokens(self) -> int:
        return self.k + len(self.metadata.token_names)

    def forward(self, batch: dict, b: int, device) -> torch.Tensor:
        k, n, q = self.k, len(self.metadata.numeric_names), len(self.metadata.categorical_names)
        ct, cm = self.concepts(batch.get("concepts", torch.zeros(b, k, device=device))[:, :k].float(),
                               batch.get("concepts_present", torch.zeros(b, k, dtype=torch.bool,
                                                                         device=device))[:, :k].bool())
        num, nump = torch.zeros(b, n, device=device), torch.zeros(b, n, dtype=torch.bool, device=device)
        cat = torch.zeros(b, q, dtype=torch.long, device=device)
        if self.use_metadata:
            num, nump = batch.get("numeric", num).float(), batch.get("numeric_present", nump).bool()
            cat = batch.get("categorical", cat).long()
        if self.training:
            nump, cat = drop_metadata(nump, cat, self.metadata_dropout)
        mt, mm = self.metadata(num, nump, cat)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(mt.dtype), ct.to(mt.dtype), mt], 1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=device), cm, mm], 1)
        mask = keep[:, None, None, :]  # B×1×1×(1+K+F), True = attend (SDPA semantics)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.norm(x[:, 0])


@register_model("seg_guided_dual")
class SegGuidedDual(MultiModalNet):
    def __init__(self, num_classes: int, feature_spec: FeatureSpec, *, modality: str | None = None, encoder=None,
                 lesion_encoder=None, seg_encoder="timm:tf_efficientnet_lite0", pretrained_path=None,
                 freeze_blocks: int = 0, seg_input_size: int | None = None,
                 decoder_channels: tuple[int, ...] = (96, 64, 32, 16), aspp_channels: int = 128,
                 aspp_rates: tuple[int, ...] = (2, 4, 6), seg_loss_weight: float = 1.0, mask_work_size: int = 96,
                 detach_mask: bool = True, fusion_dim: int = 128, num_heads: int = 4, meta_layers: int = 2,
                 use_metadata: bool = True, use_concepts: bool = True, metadata_dropout: float = 0.0,
                 dropout: float = 0.1, aux_heads: bool = True, **backbone_kwargs):
        modality = modality or ("dermoscopic" if "dermoscopic" in feature_spec.modalities
                                else feature_spec.modalities[0])
        if modality not in feature_spec.modalities:
            raise ValueError(f"modality {modality!r} is not in feature_spec.modalities {feature_spec.modalities}")
        super().__init__(feature_spec, [modality], encoder=encoder, pretrained_path=pretrained_path,
                         freeze_blocks=freeze_blocks, **backbone_kwargs)
        self.modality, d = modality, fusion_dim
        whole = self.encoder(modality)
        if lesion_encoder is None:  # the whole-image encoder's spec and pretrained weights, trained separately
            lesion_path = pretrained_path.get(modality) if isinstance(pretrained_path, dict) else pretrained_path
            spec = encoder.get(modality) if isinstance(encoder, dict) and "name" not in encoder else encoder
            self.encoders["lesion"] = create_backbone(self._whole_spec(spec), lesion_path, **backbone_kwargs)
        else:
            self.encoders["lesion"] = create_backbone(lesion_encoder, **backbone_kwargs)
        self.encoders["segmenter"] = create_backbone(seg_encoder, **backbone_kwargs)
        if freeze_blocks:
            for key in ("lesion", "segmenter"):
                self.encoders[key].freeze_blocks(freeze_blocks)
        seg_channels = prepare_seg_encoder(self.encoders["segmenter"])
        self.seg_levels = len(seg_channels)
        self.decoder = UNetDecoder(seg_channels, decoder_channels, aspp_channels, aspp_rates)
        self.seg_input_size, self.mask_work_size = seg_input_size, mask_work_size
        self.seg_loss_weight, self.detach_mask = seg_loss_weight, detach_mask
        # pixel statistics: the image arrives normalised for the whole-image encoder; the others may differ
        for key, enc in (("whole", whole), ("lesion", self.encoders["lesion"]), ("seg", self.encoders["segmenter"])):
            dc = enc.data_config
            self.register_buffer(f"{key}_mean", torch.tensor(dc["mean"]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{key}_std", torch.tensor(dc["std"]).view(1, 3, 1, 1), persistent=False)
        self.whole_proj = nn.Linear(whole.token_dim, d)
        self.lesion_proj = nn.Linear(self.encoders["lesion"].token_dim, d)
        self.cross_attn = KeyedCrossAttention(d, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(d)
        self.image_out = nn.Linear(d, d)
        self.missing_image = nn.Parameter(torch.zeros(d))  # stands in for an absent image
        has_meta = (use_metadata and (feature_spec.numeric or feature_spec.categorical)) or \
            (use_concepts and feature_spec.concepts)
        self.meta = MetadataTransformer(feature_spec, d, meta_layers, num_heads, dropout, use_concepts, use_metadata,
                                        metadata_dropout) if has_meta else None
        self.head = MLPHead(d, num_classes, dropout=dropout)
        self.aux_heads = nn.ModuleDict()
        if aux_heads:
            for key, enc in ((modality, whole), ("lesion", self.encoders["lesion"])):
                self.aux_heads[key] = nn.Sequential(nn.LayerNorm(enc.dim), nn.Linear(enc.dim, num_classes))

    @staticmethod
    def _whole_spec(encoder):
        """The lesion encoder's default: the whole-image encoder's spec (pretrained weights included)."""
        return tiny_backbone_spec() if encoder is None else encoder

    # ------------------------------------------------------------------------------------------ stages
    def _renorm(self, x: torch.Tensor, to: str) -> torch.Tensor:
        """``x`` (normalised for the whole-image encoder) normalised for encoder ``to`` ("lesion" / "seg")."""
        mean, std = getattr(self, f"{to}_mean"), getattr(self, f"{to}_std")
        if torch.equal(mean, self.whole_mean) and torch.equal(std, self.whole_std):
            return x
        return ((x * self.whole_std + self.whole_mean) - mean) / std

    def _segment_rows(self, x: torch.Tensor) -> torch.Tensor:
        size = self.seg_input_size
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        feats = seg_features(self.encoders["segmenter"], self._renorm(x, "seg"), self.seg_levels)
        return self.decoder(feats, x.shape[-2:])

    def segment(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """B×1×h×w lesion-mask logits (h = ``seg_input_size`` or the input's). In training only the rows with an
        image enter the segmenter (BatchNorm statistics); the other rows are zeros."""
        if not self.training or bool(keep.all()):
            return self._segment_rows(x)
        idx = keep.nonzero().squeeze(1)
        if idx.numel() == 0:  # keep every parameter in the graph (DDP), change nothing
            with frozen_batchnorm(self):
                out = self._segment_rows(torch.zeros_like(x[:1])) * 0
            return out.expand(x.shape[0], *out.shape[1:])
        out = self._segment_rows(x.index_select(0, idx))
        return out.new_zeros((x.shape[0], *out.shape[1:])).index_copy(0, idx, out)

    def seg_losses(self, batch: dict, x: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor) -> dict:
        """{"seg_bce", "seg_dice"}, weighted, over the rows with an image (zero when there is none)."""
        given = (batch.get("masks") or {}).get(self.modality)
        if given is not None:
            target = F.interpolate(given.float(), size=logits.shape[-2:], mode="nearest")
        else:
            target = fallback_masks(x, self.whole_mean.flatten().tolist(), self.whole_std.flatten().tolist(),
                                    self.mask_work_size, logits.shape[-2:])
        if not bool(keep.any()):
            zero = logits.sum() * 0
            return {"seg_bce": zero, "seg_dice": zero}
        bce, dice = bce_dice_loss(logits[keep], target[keep])
        return {"seg_bce": self.seg_loss_weight * bce, "seg_dice": self.seg_loss_weight * dice}

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        m = self.modality
        present = self.image_presence(batch)
        keep = present[:, 0]
        x = batch["images"][m]
        seg_logits = self.segment(x, keep)
        soft = torch.sigmoid(seg_logits.float()).to(x.dtype)
        if self.detach_mask:
            soft = soft.detach()
        if soft.shape[-2:] != x.shape[-2:]:
            soft = F.interpolate(soft, size=x.shape[-2:], mode="bilinear", align_corners=False)
        lesion_x = self._renorm(x, "lesion") * soft

        whole_tokens, whole_pooled = self.encode_images(batch, present)[m]
        lesion_enc = self.encoders["lesion"]
        if self.training and not bool(keep.all()):
            les_tokens, les_pooled = encode_present_rows(lesion_enc, lesion_x, keep)
        else:
            les_tokens, les_pooled = lesion_enc.forward_tokens(lesion_x)
        les_tokens, les_pooled = zero_masked(les_tokens, keep), zero_masked(les_pooled, keep)

        q = self.whole_proj(whole_tokens)
        tok_present = keep[:, None].expand(-1, q.shape[1])
        attended, weights = self.cross_attn(q, self.lesion_proj(les_tokens), tok_present,
                                            need_weights=return_attention)
        z = self.cross_norm(q + attended)
        image = self.image_out(z.mean(1))
        image = torch.where(keep[:, None], image, self.missing_image.to(image.dtype).expand_as(image))
        feats = image if self.meta is None else image + self.meta(batch, image.shape[0], image.device).to(image.dtype)
        out = {"logits": self.head(feats), "features": feats, "aux": {}, "aux_mask": {}, "mask_logits": seg_logits}
        for key, pooled in ((m, whole_pooled), ("lesion", les_pooled)):
            if key in self.aux_heads:
                out["aux"][key], out["aux_mask"][key] = self.aux_heads[key](pooled), keep
        if self.training:
            out["losses"] = self.seg_losses(batch, x, seg_logits, keep)
        if return_attention and weights is not None:
            out["cross_attention"] = weights  # B×T×(1+T); column 0 = the null key
        return out
