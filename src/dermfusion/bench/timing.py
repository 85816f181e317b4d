"""Timing and memory instruments: latency statistics, peak memory (CPU RSS / CUDA), a part timer that splits a
forward pass into encoders and fusion, and repeated timed calls."""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from .core import sync_device


def latency_stats(ms: list[float]) -> dict:
    a = np.asarray(ms, float)
    if not len(a):
        return {"n": 0}
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min()), "n": int(len(a))}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: ru_maxrss is a lifetime peak, better than nothing
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory above the starting point while the block runs: RSS sampled every ``interval`` s on
    CPU, ``torch.cuda.max_memory_allocated`` on CUDA. ``.peak_mb`` after exit."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device, self.interval = torch.device(device), interval
        self.peak_mb: float = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._peak = rss_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_mb = (self._peak - self._base) / 2**20
        return False


class PartTimer:
    """Times each encoder's ``forward_tokens`` inside a module (eager backends only); the rest of a call
    is fusion + heads. ``calls`` collects {"encoders": s} per timed call between ``start()``/``stop()``."""

    def __init__(self, module: nn.Module | None, device: torch.device | str = "cpu"):
        self.module, self.device = module, torch.device(device)
        self.encoder_s = 0.0
        self._patched: list = []

    @property
    def available(self) -> bool:
        return self.module is not None and isinstance(getattr(self.module, "encoders", None), nn.ModuleDict)

    def __enter__(self):
        if not self.available:
            return self
        for enc in self.module.encoders.values():
            original = enc.forward_tokens

            def timed(x, _orig=original):
                sync_device(self.device)
                t0 = time.perf_counter()
                out = _orig(x)
                sync_device(self.device)
                self.encoder_s += time.perf_counter() - t0
                return out

            enc.forward_tokens = timed  # instance attribute shadows the method
            self._patched.append(enc)
        return self

    def __exit__(self, *exc):
        for enc in self._patched:
            del enc.forward_tokens
        self._patched = []
        return False

    def reset(self) -> None:
        self.encoder_s = 0.0


def timed_calls(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu",
                budget_s: float | None = None, min_repeats: int = 2,
                part_timer: PartTimer | None = None) -> tuple[list[float], list[float]]:
    """(total ms per call, encoder ms per call) for up to ``repeats`` calls, stopping early once
    ``budget_s`` is spent (after at least ``min_repeats``)."""
    device = torch.device(device)
    totals, encs = [], []
    start = time.perf_counter()
    for i in range(repeats):
        if part_timer is not None:
            part_timer.reset()
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        totals.append((time.perf_counter() - t0) * 1000)
        if part_timer is not None and part_timer.available:
            encs.append(part_timer.encoder_s * 1000)
        if budget_s is not None and i + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return totals, encs

