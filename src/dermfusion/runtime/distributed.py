"""Multi-GPU / multi-node runs with PyTorch's own machinery: ``torchrun`` starts the processes and does
the rendezvous, ``torch.distributed`` (NCCL on CUDA, gloo on CPU) connects them,
``DistributedDataParallel`` averages the gradients. Nothing here starts or watches processes.

    torchrun --nproc-per-node 4 --no-python dermfusion train CONFIG --manifest M --out RUN

Semantics (see README, "Scaling out"):

* ``train.batch_size`` is the *global* batch: each of the W ranks gets ``batch_size / W`` lesions of every
  step, drawn as ``indices[rank::W]`` of the same weighted epoch (``data.samplers``); the loss is computed on
  the gathered global batch (``gather_for_loss``), so batch-level terms (soft-F1, masked auxiliary means)
  and the averaged gradient are those of a single-process run with the same global batch.
* Validation / out-of-fold / prediction are sharded without padding and gathered, each lesion once.
* Rank 0 alone writes logs, checkpoints (atomically) and bundles; every rank waits at a barrier after.
* Checkpoints hold the unwrapped model, optimiser, scheduler and epoch: a run resumes on any world size.

A single process (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) never touches
``torch.distributed``: the code paths and results are those of the plain trainer.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from rich.markup import escape

from ..console import err_console
from ..errors import DermfusionError
from .device import resolve_device

# Rank r > 0 re-seeds its augmentation / dropout RNG with this offset so ranks do not share random streams;
# rank 0 keeps the single-process seed.
RANK_SEED_STRIDE = 7919


class DistributedError(DermfusionError, RuntimeError):
    """A step failed on one or more ranks; raised on *every* rank, naming the failing ranks and errors."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False       # a process group is up (only when world_size > 1)
    backend: str | None = None
    launched: bool = False          # started by torchrun (possibly with a world of one)
    progress: bool = True           # this process may draw progress bars (global rank 0)

    @property
    def distributed(self) -> bool:
        return self.initialized and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def solo(self) -> "DistContext":
        """This process on its own (fold-parallel mode): world of one, but still its own local device."""
        return replace(self, rank=0, world_size=1, initialized=False, progress=self.progress and self.rank == 0)

    def device(self, name: str = "auto") -> torch.device:
        """The device for this process: ``cuda`` means ``cuda:LOCAL_RANK`` when launched by torchrun."""
        dev = resolve_device(name)
        if dev.type == "cuda" and dev.index is None and self.launched:
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise RuntimeError(f"local rank {self.local_rank} needs cuda:{self.local_rank}, but this node has "
                                   f"{n} visible GPU(s): use --nproc-per-node {n} or fewer")
            return torch.device("cuda", self.local_rank)
        return dev

    # ---- collectives (no-ops in a single process) -------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]


_CURRENT = DistContext()


def current() -> DistContext:
    """The context of the enclosing ``distributed_session`` (a single-process context outside one)."""
    return _CURRENT


def env_ranks() -> tuple[int, int, int, int, bool]:
    """(rank, world_size, local_rank, local_world_size, launched) from torchrun's environment variables."""
    e = os.environ
    launched = "WORLD_SIZE" in e and "RANK" in e
    world = int(e.get("WORLD_SIZE", 1))
    local_world = int(e.get("LOCAL_WORLD_SIZE", world if launched else 1))
    return int(e.get("RANK", 0)), world, int(e.get("LOCAL_RANK", 0)), local_world, launched


def _timeout(timeout_s: float | None) -> datetime.timedelta | None:
    s = timeout_s if timeout_s is not None else os.environ.get("DERMFUSION_DIST_TIMEOUT")
    return datetime.timedelta(seconds=float(s)) if s else None


@contextlib.contextmanager
def distributed_session(device: str = "auto", *, backend: str | None = None,
                        timeout_s: float | None = None) -> Iterator[DistContext]:
    """Join the process group torchrun set up (env://); a plain single-process context otherwise.

    backend: default ``nccl`` when the run's device is CUDA, else ``gloo``. timeout_s: how long a
    collective may wait (default: PyTorch's; env ``DERMFUSION_DIST_TIMEOUT`` in seconds overrides).
    """
    global _CURRENT
    rank, world, local_rank, local_world, launched = env_ranks()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        ctx = _CURRENT if _CURRENT.distributed else DistContext(local_rank=local_rank, launched=launched)
        prev, _CURRENT = _CURRENT, ctx
        try:
            yield ctx
        finally:
            _CURRENT = prev
        return
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    probe = DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                        launched=True)
    dev = probe.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kw = {"timeout": _timeout(timeout_s)} if _timeout(timeout_s) else {}
    dist.init_process_group(backend=backend, **kw)
    ctx = replace(probe, rank=dist.get_rank(), world_size=dist.get_world_size(), initialized=True, backend=backend,
                  progress=dist.get_rank() == 0)
    prev, _CURRENT = _CURRENT, ctx
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        _CURRENT = prev
        if ok:  # after a failure, exit and let torchrun tear the group down (destroy could wait on a dead peer)
            dist.barrier()  # no rank tears down gloo while a peer is still using it (aborts at exit otherwise)
            dist.destroy_process_group()


def record_errors(fn: Callable) -> Callable:
    """Under torchrun, ``torch.distributed.elastic``'s ``@record``: a rank's exception goes to the error
    file torchrun summarises ("Root Cause (first observed failure) … rank … traceback")."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return fn
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


def run_collectively(ctx: DistContext, fn: Callable[[], Any], what: str = "work", gather: bool = True):
    """Run ``fn`` on every rank and compare notes, so a failure on one rank fails *every* rank loudly
    (with the failing ranks and their errors) instead of leaving the others waiting in a collective.

    Returns the list of every rank's result (``gather=True``) or this rank's own result.
    """
    err: BaseException | None = None
    try:
        result, status = fn(), None
    except Exception as e:  # noqa: BLE001 — re-raised below, on every rank
        if not ctx.distributed:
            raise
        err, result = e, None
        code = getattr(e, "exit_code", None)  # click/typer Exit: the message was printed just before
        status = f"exited with code {code} (see its message above)" if code is not None else f"{type(e).__name__}: {e}"
        err_console.print(f"[bold red]rank {ctx.rank} failed[/] during {escape(what)}:\n"
                          f"{escape(traceback.format_exc())}", highlight=False)
    if not ctx.distributed:
        return [result] if gather else result
    notes = ctx.all_gather_object((status, result if gather else None))
    failed = [(r, s) for r, (s, _) in enumerate(notes) if s is not None]
    if failed:
        lines = "; ".join(f"rank {r}: {s}" for r, s in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {ctx.world_size} rank(s) — {lines}") from err
    return [r for _, r in notes] if gather else result


def gather_indexed(ctx: DistContext, indices, values: np.ndarray, n: int) -> np.ndarray:
    """Reassemble per-rank rows (``values[i]`` belongs to row ``indices[i]``) into one n-row array, in row
    order, on every rank. A row seen twice (padding) is kept once; a row seen by no rank is an error."""
    parts = ctx.all_gather_object((list(map(int, indices)), np.asarray(values)))
    width = next((v.shape[1] for _, v in parts if v.ndim == 2 and len(v)), 0)
    out = np.zeros((n, width), dtype=next((v.dtype for _, v in parts if len(v)), np.float32))
    seen = np.zeros(n, dtype=bool)
    for idx, vals in parts:
        for i, row in zip(idx, vals):
            if not seen[i]:
                out[i], seen[i] = row, True
    if not seen.all():
        raise DistributedError(f"gathered predictions miss {int((~seen).sum())} of {n} rows")
    return out
