"""Windows and textures (RemixFormer++, bottom-up dermoscopy branch).

A high-resolution dermoscopic image (e.g. 1024²) is cut into windows (e.g. 256²) that one window-level encoder
reads with shared weights — attention cost grows with the window's tokens, not the image's.
:func:`window_partition` / :func:`window_reverse` are the two directions of that cut (exact inverses).

:class:`MultiScaleTextureAttention` summarises a window's patch embeddings by texture (Deep TEN-style encoding,
Zhang et al. 2017): K learnable texture templates c_k, each with a learnable scale s_k; every patch x_i is softly
assigned to the templates, a_ik = softmax_k(−s_k·‖x_i − c_k‖² / D), and the residuals are aggregated per
template, e_k = mean_i a_ik (x_i − c_k). The same templates read the patch grid at several spatial scales
(average-pooled 1×, 2×, …; each scale with its own s_k), so fine and coarse textures both count. The K encodings
are projected to the window embedding's width and *added* to it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """B×C×H×W → (B·nH·nW)×C×window×window, windows in row-major order per image (H, W multiples of window)."""
    b, c, h, w = x.shape
    if h % window or w % window:
        raise ValueError(f"image size {h}×{w} is not a multiple of the window size {window}")
    nh, nw = h // window, w // window
    x = x.reshape(b, c, nh, window, nw, window).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * nh * nw, c, window, window)


def window_reverse(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B·nH·nW)×C×win×win → B×C×height×width: the inverse of :func:`window_partition`."""
    n, c, wh, ww = windows.shape
    nh, nw = height // wh, width // ww
    b = n // (nh * nw)
    x = windows.reshape(b, nh, nw, c, wh, ww).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, nh * wh, nw * ww)


class MultiScaleTextureAttention(nn.Module):
    """B×N×D patch embeddings (a square grid) → B×out_dim texture encoding (see the module docstring)."""

    def __init__(self, dim: int, out_dim: int, num_textures: int = 16, scales: Sequence[int] = (1, 2)):
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"texture scales must be positive pooling factors, got {list(scales)}")
        self.norm_in = nn.LayerNorm(dim)
        bound = 1.0 / math.sqrt(num_textures)
        self.templates = nn.Parameter(torch.empty(num_textures, dim).uniform_(-bound, bound))
        self.log_scale = nn.Parameter(torch.zeros(len(self.scales), num_textures))  # s_k = exp(.) > 0, per scale
        self.norm_out = nn.LayerNorm(dim)
        self.proj = nn.Linear(num_textures * dim, out_dim)

    @property
    def num_textures(self) -> int:
        return self.templates.shape[0]

    def assignments(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        """B×N×K soft assignment of each of the B×N×D embeddings to the K templates (sums to 1 over K)."""
        c = self.templates.to(x.dtype)
        d2 = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.t() + c.pow(2).sum(-1)).clamp_min(0) / x.shape[-1]
        return torch.softmax(-self.log_scale[level].exp().to(x.dtype) * d2, dim=-1)

    def encode(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        """B×K×D aggregated residuals mean_i a_ik (x_i − c_k)."""
        a = self.assignments(x, level)
        return (a.transpose(1, 2) @ x - a.sum(1)[..., None] * self.templates.to(x.dtype)) / x.shape[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(tokens)
        b, n, d = x.shape
        side = math.isqrt(n)
        enc = 0
        used = 0
        for level, s in enumerate(self.scales):
            if s > 1:
                if side * side != n or side % s:  # not a square grid this factor divides: this scale is skipped
                    continue
                grid = x.transpose(1, 2).reshape(b, d, side, side)
                xs = F.avg_pool2d(grid, s).flatten(2).transpose(1, 2)
            else:
                xs = x
            enc = enc + self.encode(xs, level)
            used += 1
        if not used:  # no pooling scale fits this grid: the patches as they are
            enc, used = self.encode(x, 0), 1
        return self.proj(self.norm_out(enc / max(used, 1)).flatten(1))
