"""DistributedDataParallel training pieces: the differentiable gather behind the global-batch loss, BatchNorm
conversion, the unused-parameter probe, DDP wrapping and checkpoint loading on every rank.

The session itself (ranks, process group, collective error handling) is ``runtime.distributed``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.distributed import DistContext
from .checkpoint import load_checkpoint


# ---- autograd-aware gathering for the loss --------------------------------------------------------------
class _GatherCat(torch.autograd.Function):
    """all_gather along dim 0, differentiable: the backward all-reduces (sums) the gradient of the gathered
    tensor and hands each rank the slice of its own rows. Every rank computes the same global loss L, so each
    rank's rows receive W·∂L/∂rows, and DDP's averaging over W ranks leaves exactly ∂L/∂θ."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_cat(x: torch.Tensor, differentiable: bool = True) -> torch.Tensor:
    if differentiable and x.requires_grad:
        return _GatherCat.apply(x.float())
    y = x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach().contiguous()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    out = torch.cat(parts)
    return out.bool() if x.dtype == torch.bool else out


def gather_for_loss(outputs: dict, target: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The global batch's logits / auxiliary logits / masks / targets, gathered from every rank (rank order)."""
    out = {"logits": gather_cat(outputs["logits"])}
    if outputs.get("aux"):
        out["aux"] = {k: gather_cat(outputs["aux"][k]) for k in sorted(outputs["aux"])}
    if outputs.get("aux_mask"):
        out["aux_mask"] = {k: gather_cat(outputs["aux_mask"][k], differentiable=False)
                           for k in sorted(outputs["aux_mask"])}
    if outputs.get("losses"):  # the model's own loss terms are per-rank means; DDP averages their gradients
        out["losses"] = outputs["losses"]
    return out, gather_cat(target, differentiable=False)


# ---- model wrapping --------------------------------------------------------------------------------------
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm → SyncBatchNorm (timm's converter when available: it also handles BatchNormAct2d). The state
    dict keys are unchanged, so checkpoints and bundles load into the plain model."""
    try:
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    except ImportError:  # pragma: no cover
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def unused_parameters(model: nn.Module, loss_fn: Callable, batch: dict) -> list[str]:
    """Trainable parameters the loss does not reach on ``batch`` (e.g. auxiliary heads with aux_weight 0).

    Evaluated in eval mode (no dropout draw, no BatchNorm statistics update, no RNG use), so probing does
    not change the run."""
    was_training = model.training
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    try:
        with torch.enable_grad():
            loss, _ = loss_fn(model(batch), batch["target"])
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        model.train(was_training)
    return [n for (n, _), g in zip(named, grads) if g is None]


def find_unused_setting(probe: Callable[[], list[str]]) -> bool:
    """DDP's find_unused_parameters: env DERMFUSION_DDP_FIND_UNUSED=0/1 forces it, else the probe decides."""
    forced = os.environ.get("DERMFUSION_DDP_FIND_UNUSED", "auto").strip().lower()
    if forced in {"0", "false", "no"}:
        return False
    if forced in {"1", "true", "yes"}:
        return True
    return bool(probe())


def wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None, find_unused_parameters=find_unused)


def load_checkpoint_everywhere(ctx: DistContext, path: str | Path) -> dict | None:
    """The checkpoint as rank 0 sees it, on every rank: read locally where the run directory is shared,
    sent from rank 0 where it is not (multi-node without a shared filesystem)."""
    if not ctx.distributed:
        return load_checkpoint(path)
    seen = ctx.all_gather_object(Path(path).exists())
    if not seen[0]:
        return None
    if all(seen):
        return load_checkpoint(path)
    return ctx.broadcast_object(load_checkpoint(path) if ctx.is_main else None)
