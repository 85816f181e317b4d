"""``FastMultiheadAttention``: ``nn.MultiheadAttention(batch_first=True)`` on contiguous tensors, through SDPA.

Why ``nn.MultiheadAttention`` is replaced (``fast_attention_``): open_clip's ViT and our fusion
layers use ``nn.MultiheadAttention(batch_first=True)``. Off its fused inference kernel — which
it leaves under autocast, in training mode, for cross-attention, or when weights are wanted — it
transposes its inputs to (L, B, E) and calls ``F.linear`` on that non-contiguous view.
``aten::matmul`` folds such an input into one GEMM only when an operand requires grad; otherwise
(``torch.inference_mode``, EMA copies, frozen blocks, an autocast-cast weight under inference mode)
it runs ``bmm`` with the weight broadcast to L copies, and a bf16 ``bmm`` on CPU first
*materialises* that broadcast (an L×E×3E ``copy_`` per layer: 197 copies of every QKV weight).
That is the ~20× CPU slow-down seen with open_clip under bf16 autocast. ``FastMultiheadAttention``
computes the same thing on contiguous batch-first tensors with ``scaled_dot_product_attention``
(numerically equal to nn.MultiheadAttention in fp32) and exposes its projections as ``nn.Linear``,
so int8 quantisation reaches them too.

``fast_attention_(module)`` swaps every convertible layer in place; the fast inference backends (bf16, autocast,
int8, compile) and the ONNX export run on such copies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FastMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention(batch_first=True)``: projections on contiguous B×L×E tensors
    as ``nn.Linear`` layers (``in_proj`` packs q, k, v), attention through SDPA.

    Same call signature and outputs ``(out, weights | None)``. ``need_weights=True`` computes the
    softmax explicitly (head-averaged unless ``average_attn_weights=False``).
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first = True
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "FastMultiheadAttention":
        if not supports_fast_attention(mha):
            raise ValueError("only batch_first nn.MultiheadAttention with packed q/k/v weights, no bias_k/v, "
                             "no add_zero_attn and no dropout can be converted")
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _project(self, query, key, value):
        w, b = self.in_proj.weight, self.in_proj.bias
        e = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        bq, bk, bv = (None, None, None) if b is None else b.split(e)
        q = F.linear(query, w[:e], bq)
        if key is value:
            k, v = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
        else:
            k, v = F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
        return q, k, v

    def _mask(self, key_padding_mask, attn_mask, b, lq, lk, dtype):
        """One additive float mask (B×1|H×Lq×Lk) or None; True in torch's bool masks = ignore."""
        mask = None
        if key_padding_mask is not None:
            kpm = key_padding_mask
            kpm = torch.zeros(kpm.shape, dtype=dtype, device=kpm.device).masked_fill(kpm, float("-inf")) \
                if kpm.dtype == torch.bool else kpm.to(dtype)
            mask = kpm.view(b, 1, 1, lk)
        if attn_mask is not None:
            am = attn_mask
            am = torch.zeros(am.shape, dtype=dtype, device=am.device).masked_fill(am, float("-inf")) \
                if am.dtype == torch.bool else am.to(dtype)
            am = am.view(1, 1, lq, lk) if am.dim() == 2 else am.view(b, self.num_heads, lq, lk)
            mask = am if mask is None else mask + am
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        b, lq, _ = query.shape
        lk = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q, k, v = (t.reshape(b, -1, h, hd).transpose(1, 2) for t in (q, k, v))  # B×H×L×hd
        mask = self._mask(key_padding_mask, attn_mask, b, lq, lk, q.dtype)
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            attn = scores.softmax(-1)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return out, weights


def supports_fast_attention(mha: nn.Module) -> bool:
    return (type(mha) is nn.MultiheadAttention and mha.batch_first and mha._qkv_same_embed_dim
            and mha.bias_k is None and not mha.add_zero_attn and mha.in_proj_weight is not None
            and (mha.dropout == 0 or not mha.training))


def fast_attention_(module: nn.Module) -> int:
    """Replace every convertible ``nn.MultiheadAttention`` inside ``module`` in place; returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if supports_fast_attention(child):
            setattr(module, name, FastMultiheadAttention.from_mha(child))
            n += 1
        else:
            n += fast_attention_(child)
    return n

