"""Lesion selection (RemixFormer++, top-down clinical branch): where in a clinical photo to look closer.

The global encoder's class token attends over the image patches in its last block; that attention says which
patches decided the global view. :func:`select_regions` picks the ``k`` most salient, non-overlapping patches
and places each region's centre at the *attention-weighted soft-argmax* of the patch neighbourhood around it;
:func:`crop_regions` samples those regions from the full-resolution photo with ``F.grid_sample``. The choice of
patch is discrete (top-k with suppression), the centre is a smooth function of the attention, so the loss of
whatever reads the crops reaches the attention (and the global encoder's queries and keys) through the crop
positions — the differentiable part of the selection.

:class:`AttentionTap` is how the attention is read: it replaces a timm attention module's ``attn_drop`` (which
receives the softmaxed attention probabilities) and keeps its output for the thread that ran the block.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn


class AttentionTap(nn.Module):
    """Stands in for a timm attention module's ``attn_drop``: applies it, and keeps its output (B×H×N×N, in
    the autograd graph) for the calling thread until :meth:`take`. Concurrent requests through one model (the
    service's workers) each find their own."""

    def __init__(self, drop: nn.Module):
        super().__init__()
        self.drop = drop
        self._kept: dict[int, torch.Tensor] = {}

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        out = self.drop(attn)
        self._kept[threading.get_ident()] = out
        return out

    def take(self) -> torch.Tensor:
        out = self._kept.pop(threading.get_ident(), None)
        if out is None:
            raise RuntimeError("no attention was recorded: the tapped block did not run its explicit attention path")
        return out


def tap_last_attention(vit: nn.Module) -> AttentionTap:
    """Install an :class:`AttentionTap` on the last block of a timm ViT (its fused kernel switched off, so the
    probabilities exist); returns the tap. Refuses encoders without a class token or timm attention blocks."""
    blocks = getattr(vit, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if getattr(vit, "cls_token", None) is None or attn is None or not hasattr(attn, "fused_attn") \
            or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
        raise ValueError("lesion selection needs a timm ViT-style encoder with a class token and attention blocks "
                         f"(e.g. timm:vit_base_patch16_224 or panderm:…), not {type(vit).__name__}")
    if not isinstance(attn.attn_drop, AttentionTap):
        attn.attn_drop = AttentionTap(attn.attn_drop)
    attn.fused_attn = False
    return attn.attn_drop


def class_token_saliency(attn: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """B×h×w: the class token's attention to each patch (heads averaged) from a B×H×N×N attention tensor."""
    row = attn[:, :, 0, num_prefix:].mean(1)
    return row.reshape(row.shape[0], *grid)


def _suppress_top_k(saliency: torch.Tensor, k: int, radius: int) -> torch.Tensor:
    """B×k flat indices of the k highest cells, each pick suppressing the cells within ``radius`` (Chebyshev)."""
    b, h, w = saliency.shape
    ys = torch.arange(h, device=saliency.device).repeat_interleave(w)
    xs = torch.arange(w, device=saliency.device).repeat(h)
    s = saliency.detach().flatten(1).float()
    picks = []
    for _ in range(k):
        i = s.argmax(1)
        picks.append(i)
        near = ((ys[None] - ys[i][:, None]).abs() <= radius) & ((xs[None] - xs[i][:, None]).abs() <= radius)
        s = s.masked_fill(near, float("-inf"))
    return torch.stack(picks, 1)


def select_regions(saliency: torch.Tensor, k: int, window: int = 1, suppress: int | None = None):
    """The ``k`` most salient regions of a B×h×w (non-negative) saliency map.

    Returns ``(centres, scores, cells)``: centres B×k×2 as (x, y) in ``[-1, 1]`` image coordinates (the
    attention-weighted mean position of the (2·window+1)² cells around each pick: differentiable in the
    saliency), scores B×k (the saliency mass of each region, also differentiable) and the picked cells B×k
    (flat indices, highest first). ``suppress`` (default ``window``): cells within it of a pick are not picked
    again, so the k regions are distinct."""
    b, h, w = saliency.shape
    idx = _suppress_top_k(saliency, k, window if suppress is None else suppress)
    side = 2 * window + 1
    padded = F.pad(saliency[:, None], (window, window, window, window))  # zero weight outside the image
    neigh = F.unfold(padded, side)  # B×side²×(h·w), row-major over the neighbourhood
    win = neigh.gather(2, idx[:, None, :].expand(-1, side * side, -1)).transpose(1, 2)  # B×k×side²
    win = win.clamp_min(0)
    mass = win.sum(-1)
    weights = win / mass[..., None].clamp_min(torch.finfo(win.dtype).tiny)
    offs = torch.arange(-window, window + 1, device=saliency.device, dtype=win.dtype)
    dy, dx = offs.repeat_interleave(side), offs.repeat(side)
    cy = torch.div(idx, w, rounding_mode="floor").to(win.dtype) + (weights * dy).sum(-1)
    cx = (idx % w).to(win.dtype) + (weights * dx).sum(-1)
    centres = torch.stack([(cx + 0.5) / w * 2 - 1, (cy + 0.5) / h * 2 - 1], -1)
    return centres, mass, idx


def crop_regions(image: torch.Tensor, centres: torch.Tensor, fraction: float, out_size: int) -> torch.Tensor:
    """(B·k)×C×out×out crops of ``image`` (B×C×H×W), square windows of side ``fraction`` of the image around
    ``centres`` (B×k×2, (x, y) in [-1, 1], moved inwards so the crop stays inside), bilinearly resampled —
    differentiable in the centres."""
    k = centres.shape[1]
    c = torch.minimum(torch.maximum(centres, centres.new_tensor(fraction - 1)), centres.new_tensor(1 - fraction))
    # the sampling grid of a scale-and-shift affine map (F.affine_grid's, written out: it exports to ONNX opset 18)
    base = (torch.arange(out_size, device=image.device, dtype=c.dtype) * 2 + 1) / out_size - 1  # pixel centres
    gx = fraction * base[None, None, :] + c[..., 0].reshape(-1, 1, 1)  # (B·k)×1×out
    gy = fraction * base[None, :, None] + c[..., 1].reshape(-1, 1, 1)  # (B·k)×out×1
    grid = torch.stack([gx.expand(-1, out_size, -1), gy.expand(-1, -1, out_size)], -1)
    return F.grid_sample(image.repeat_interleave(k, 0), grid.to(image.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)
