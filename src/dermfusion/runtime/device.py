"""Device, precision, threads and seeding: one place that decides how a run uses the hardware."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible; use --set train.device=cpu")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor / machine name elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_name() -> str:
    """`cpu_model` with the CPU's matrix-unit features: benchmark rows and backend checks name the machine they
    were measured on."""
    feats = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2"})
    return f"{cpu_model()} ({', '.join(feats)})" if feats else cpu_model()


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs on matrix units here: a CUDA GPU that supports it, or a CPU with AMX or AVX-512 BF16.
    Without them (e.g. an AVX2-only AMD EPYC) CPU bf16 is emulated: measured ~15x *slower* than fp32 for a
    ResNet-18 training step (BENCHMARKS.md)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    return False


def cpu_int8_dot_product() -> bool:
    """Whether the CPU multiplies int8 with 32-bit accumulation in one instruction (AVX-512 VNNI, AVX-VNNI or
    AMX). Without it, u8×s8 GEMMs (ONNX Runtime's MLAS) go through 16-bit intermediate sums that saturate with
    full-range int8 weights; 7-bit weights (``reduce_range``) avoid that."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


PRECISIONS = ("auto", "fast", "fp32", "bf16")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a precision setting:

    - ``auto``: bf16 on CUDA, fp32 on CPU (open_clip's ViT is ~20x slower under CPU autocast in some contexts);
    - ``fast``: bf16 wherever the hardware computes it natively (CUDA, AMX / AVX-512 BF16 CPUs), else fp32;
    - ``fp32`` / ``bf16``: as asked (``bf16`` on a CPU without native bf16 warns: it is much slower there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" and not native_bf16(device):
            import warnings

            warnings.warn("precision bf16 on a CPU without AMX / AVX-512 BF16: bf16 is emulated here and runs "
                          "many times slower than fp32; use precision 'fast' (bf16 only where native) or 'fp32'",
                          stacklevel=2)
        return torch.bfloat16
    if precision == "fast":
        return torch.bfloat16 if native_bf16(device) else None
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_num_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # torchrun: the processes of one node share its cores
    cpus = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    if device.type == "cuda":
        return max(2, min(12, cpus - 2))
    # on a small CPU box the model needs the cores; one worker decodes (cached) images ahead
    return 1 if cpus <= 4 else min(4, cpus // 4)


@contextlib.contextmanager
def compute_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (0: leave torch's setting), then restore it.

    On a small CPU machine a data-loader worker and the training threads share the cores; fewer compute
    threads can be faster (docs/PERFORMANCE.md)."""
    if n < 0:
        raise ValueError(f"threads must be >= 0 (0 = torch's default), not {n}")
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def move_batch(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    nb = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if k == "images":
            out[k] = {m: (x.to(device, non_blocking=nb, memory_format=torch.channels_last) if channels_last
                          else x.to(device, non_blocking=nb)) for m, x in v.items()}
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=nb)
        else:
            out[k] = v
    return out
