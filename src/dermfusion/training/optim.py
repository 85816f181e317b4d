"""Optimiser parameter groups with layer-wise LR decay, AdamW, warmup + cosine schedule.

Fine-tuning a foundation encoder (PanDerm, DermLIP) works best when early blocks move least:
encoder block ``i`` gets ``lr · layer_decay^(num_blocks − i)`` (patch/position embeddings, index −1,
decay the most; parameters above the last block get ``lr``), while the freshly initialised
fusion layers, tokenizers and heads get ``head_lr``. Norms, biases, embeddings and learned tokens
get no weight decay.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import nn

_NO_DECAY_NAME = re.compile(r"(^|\.)(cls_token|reg_token|dist_token|mask_token|pos_embed|class_embedding|"
                            r"positional_embedding|null|pool_queries|modality_embed|concept_embed|"
                            r"numeric_missing|missing_image|fill)$")


def _cfg_get(cfg, key, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _no_decay(name: str, param: nn.Parameter, embedding_params: set[int], extra: set[int]) -> bool:
    return param.ndim <= 1 or id(param) in embedding_params or id(param) in extra or bool(_NO_DECAY_NAME.search(name))


def build_param_groups(model: nn.Module, *, lr: float, head_lr: float | None = None, layer_decay: float = 1.0,
                       weight_decay: float = 0.05) -> list[dict]:
    """Parameter groups; each dict has "params", "lr", "weight_decay", "name" (and "lr_scale" vs ``lr``)."""
    head_lr = lr if head_lr is None else head_lr
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Encoder parameters: id -> (encoder key, block index, num_blocks); shared encoders appear once.
    enc_info: dict[int, tuple[str, int | None, int]] = {}
    extra_no_decay: set[int] = set()
    encoders = getattr(model, "encoders", None) or {}
    for key, enc in encoders.items():
        for pname, p in enc.named_parameters():
            if id(p) in enc_info:
                continue
            idx = enc.block_index(pname) if hasattr(enc, "block_index") else None
            enc_info[id(p)] = (key, idx, getattr(enc, "num_blocks", 0))
        if hasattr(enc, "no_weight_decay_names"):
            named = dict(enc.named_parameters())
            extra_no_decay |= {id(named[n]) for n in enc.no_weight_decay_names() if n in named}

    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not _no_decay(name, p, embedding_params, extra_no_decay)
        if id(p) in enc_info:
            key, idx, n_blocks = enc_info[id(p)]
            idx = n_blocks if idx is None else idx
            scale = layer_decay ** (n_blocks - idx)
            gname = f"encoder.{key}.block{idx}" if idx >= 0 else f"encoder.{key}.embed"
            group_lr = lr * scale
        else:
            gname, group_lr, scale = "head", head_lr, head_lr / lr if lr else 1.0
        gname += ".decay" if decay else ".no_decay"
        g = groups.setdefault((gname,), {"name": gname, "params": [], "param_names": [], "lr": group_lr,
                                          "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over :func:`build_param_groups`; fused kernel when every parameter is on CUDA.

    cfg keys: lr, head_lr, layer_decay, weight_decay, betas, eps.
    """
    lr = float(_cfg_get(cfg, "lr", 1e-4))
    groups = build_param_groups(model, lr=lr, head_lr=_cfg_get(cfg, "head_lr"),
                                layer_decay=float(_cfg_get(cfg, "layer_decay", 1.0)),
                                weight_decay=float(_cfg_get(cfg, "weight_decay", 0.05)))
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(_cfg_get(cfg, "betas", (0.9, 0.999))),
                             eps=float(_cfg_get(cfg, "eps", 1e-8)), fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to each group's LR, then cosine decay to ``min_lr_ratio`` of it."""
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
