"""Small building blocks shared by the fusion models."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean over ``dim`` of the entries where ``mask`` is True; 0 where none are (no NaN)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))  # exact: masked values never enter
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


@contextlib.contextmanager
def frozen_batchnorm(module: nn.Module):
    """Run the block with every BatchNorm layer of ``module`` in eval mode (running statistics used,
    not updated), then restore each layer's mode."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    try:
        for m in bns:
            m.train(False)
        yield
    finally:
        for m, mode in zip(bns, modes):
            m.train(mode)


def zero_masked(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Replace rows (``present`` B) or tokens (B×T) that are absent with exact zeros."""
    while present.ndim < x.ndim:
        present = present.unsqueeze(-1)
    return torch.where(present, x, torch.zeros_like(x))


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


class MaskedCrossAttention(nn.Module):
    """Multi-head attention whose keys always include one learned "null" token.

    The null token keeps the softmax defined when every real key is masked (e.g. no metadata and
    no second image), so such rows produce finite outputs instead of NaN.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.null = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, present: torch.Tensor, need_weights: bool = False):
        b = query.shape[0]
        keys = torch.cat([self.null.expand(b, -1, -1).to(keys.dtype), zero_masked(keys, present)], dim=1)
        pad = torch.cat([present.new_zeros(b, 1), ~present.bool()], dim=1)  # True = ignore
        out, w = self.attn(query, keys, keys, key_padding_mask=pad, need_weights=need_weights,
                           average_attn_weights=True)
        return out, w  # w: B×Tq×(1+Tk), column 0 = null token
