"""The two image branches of RemixFormer++ (Xu et al.): top-down on the clinical photo, bottom-up on the
dermoscopic image. Each takes its encoder (a :class:`~dermfusion.models.backbones.Backbone` owned by the model's
``encoders``, never by the branch, so shared weights are stored once) and returns global and local features.

- :class:`ClinicalBranch`: a global ViT reads a downsized view; its class token's last-block attention picks
  ``num_regions`` regions (``lesion_selection``) that are cropped from the full-resolution photo and read by the
  *same* encoder's patch embedding and first ``local_blocks`` blocks (its early stages); cross-scale
  cross-attention then lets the global class token read the close-ups and each close-up read the whole photo.
- :class:`DermoscopyBranch`: the high-resolution image is cut into windows (``texture_attention``), each read by
  the window encoder; a texture encoding of the window's patches is added to its embedding; a region-level
  transformer with a class token reads the window embeddings (+ learned window positions).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn

from .lesion_selection import class_token_saliency, crop_regions, select_regions, tap_last_attention
from .texture_attention import MultiScaleTextureAttention, window_partition


def inner_model(encoder: nn.Module) -> nn.Module:
    """The library model inside a Backbone (or inside a backend's cast wrapper of one)."""
    return getattr(getattr(encoder, "inner", encoder), "model", encoder)


class AttnBlock(nn.Module):
    """Pre-norm transformer block: attention of ``x`` over ``context`` (``cross`` blocks) or over itself, keys
    masked by ``mask`` (B×Tk, True = attend), then an MLP, both residual. Returns (x, head-averaged attention
    weights or None)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, mlp_ratio: float = 4.0, cross: bool = False):
        super().__init__()
        self.norm_q, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None  # a self-attention block has no separate context
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=dropout)

    def forward(self, x, context=None, mask=None, need_weights: bool = False):
        q = self.norm_q(x)
        kv = q if self.norm_kv is None else self.norm_kv(context)
        a, w = self.attn(q, kv, kv, key_padding_mask=None if mask is None else ~mask, need_weights=need_weights)
        x = x + a
        return x + self.mlp(self.norm_mlp(x)), w


def global_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` downsized to size×size without aliasing: the mean of each k×k block for a whole factor k (exports to
    ONNX as one pooling op), an antialiased bilinear resize otherwise."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h == w and h % size == 0:
        return F.avg_pool2d(x, h // size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ClinicalBranch(nn.Module):
    """Clinical photo → {"global": B×D, "local": B×D, "centres": B×K×2, "scores": B×K} (see the module doc)."""

    def __init__(self, encoder: nn.Module, *, num_regions: int = 3, region_fraction: float = 0.5,
                 local_blocks: int | None = None, selection_window: int = 1, cross_depth: int = 1, num_heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        vit = inner_model(encoder)
        tap_last_attention(vit)
        depth = len(vit.blocks)
        self.local_blocks = max(1, depth // 2) if local_blocks is None else int(local_blocks)
        if not 1 <= self.local_blocks < depth:
            raise ValueError(f"local_blocks={local_blocks}: the local encoder shares 1…{depth - 1} of the clinical "
                             f"encoder's {depth} blocks")
        if not 0 < region_fraction <= 1:
            raise ValueError(f"region_fraction={region_fraction} must be in (0, 1]")
        self.num_regions, self.region_fraction, self.window = int(num_regions), float(region_fraction), selection_window
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.global_size = int(encoder.data_config["input_size"][-1])
        dim = encoder.token_dim
        self.local_norm = nn.LayerNorm(dim)
        self.to_local = nn.ModuleList(AttnBlock(dim, num_heads, dropout, cross=True) for _ in range(cross_depth))
        self.to_global = nn.ModuleList(AttnBlock(dim, num_heads, dropout, cross=True) for _ in range(cross_depth))
        self.norm_global, self.norm_local = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> dict:
        vit, g = inner_model(encoder), self.global_size
        tokens = vit.forward_features(global_view(x, g))  # B×(prefix+P)×D, normed; the tap keeps the last attention
        saliency = class_token_saliency(vit.blocks[-1].attn.attn_drop.take(), self.num_prefix, self.grid)
        centres, scores, _ = select_regions(saliency, self.num_regions, self.window)
        crops = crop_regions(x, centres, self.region_fraction, g)  # (B·K)×C×g×g from the full-resolution photo
        (patches, prefix), = vit.forward_intermediates(crops, indices=[self.local_blocks - 1], norm=False,
                                                       return_prefix_tokens=True, stop_early=True, output_fmt="NLC",
                                                       intermediates_only=True)
        b, k = centres.shape[:2]
        local = self.local_norm(torch.cat([prefix, patches], 1))  # (B·K)×T×D, early-stage tokens of the close-ups
        local_cls, local_all = local[:, 0].reshape(b, k, -1), local.reshape(b, -1, local.shape[-1])
        glob, patches_g = tokens[:, :1], tokens[:, self.num_prefix:]
        for to_local, to_global in zip(self.to_local, self.to_global):  # cross-scale cross-attention
            glob, local_cls = to_local(glob, local_all)[0], to_global(local_cls, patches_g)[0]
        share = scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        return {"global": self.norm_global(glob[:, 0]), "local": self.norm_local((share[..., None] * local_cls).sum(1)),
                "centres": centres, "scores": scores}


class DermoscopyBranch(nn.Module):
    """Dermoscopic image → {"global": B×dim, "local": B×dim, "window_weights": B×nW} (see the module doc)."""

    def __init__(self, encoder: nn.Module, *, image_size: int, dim: int, num_textures: int = 16,
                 texture_scales: Sequence[int] = (1, 2), region_depth: int = 2, num_heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.window = int(encoder.data_config["input_size"][-1])
        if image_size % self.window:
            raise ValueError(f"dermoscopic_size={image_size} must be a multiple of the window encoder's input size "
                             f"{self.window}")
        self.image_size, self.grid = int(image_size), (image_size // self.window, image_size // self.window)
        self.num_prefix = int(getattr(inner_model(encoder), "num_prefix_tokens", 0) or 0)
        self.texture = MultiScaleTextureAttention(encoder.token_dim, encoder.dim, num_textures, texture_scales)
        self.proj = nn.Linear(encoder.dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, self.grid[0] * self.grid[1], dim), std=0.02))
        self.blocks = nn.ModuleList(AttnBlock(dim, num_heads, dropout) for _ in range(region_depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def num_windows(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, encoder: nn.Module, x: torch.Tensor, need_weights: bool = False) -> dict:
        s = self.image_size
        if tuple(x.shape[-2:]) != (s, s):  # e.g. progressive resizing: the window grid is fixed by the config
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        b = x.shape[0]
        tokens, pooled = encoder.forward_tokens(window_partition(x, self.window))  # shared weights over windows
        emb = pooled + self.texture(tokens[:, self.num_prefix:])
        z = self.proj(emb).reshape(b, self.num_windows, -1) + self.pos_embed
        z = torch.cat([self.cls_token.expand(b, -1, -1), z], 1)
        w = None
        for i, blk in enumerate(self.blocks):
            z, w = blk(z, need_weights=need_weights and i == len(self.blocks) - 1)
        z = self.norm(z)
        out = {"global": z[:, 0], "local": z[:, 1:].mean(1)}
        if w is not None:
            out["window_weights"] = w[:, 0, 1:]
        return out
