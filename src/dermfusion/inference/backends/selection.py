"""Choosing a backend: build one (``prepare_backend``), compare its probabilities with fp32 eager, time it, and keep
the fastest that agrees (``select_backend``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .base import BACKENDS, CPU_ONLY, BackendError, BackendFactory, BackendRunner, UnknownBackendError, as_device


def prepare_backend(model: nn.Module, name: str, *, device="cpu", sample_batch: dict | None = None,
                    **options) -> BackendRunner:
    """Build backend ``name`` for ``model`` (left unchanged; backends other than fp32 work on a copy)."""
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    device = as_device(device)
    if name in CPU_ONLY and device.type != "cpu":
        raise BackendError(f"backend {name!r} runs on CPU only")
    return BACKENDS[name](model, device=device, sample_batch=sample_batch, **options)


# ------------------------------------------------------------------------------------------ agreement + selection
def compare_probs(reference: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> dict:
    """Max absolute probability difference and argmax agreement between two N×C arrays."""
    ref = np.asarray(reference.detach().cpu() if isinstance(reference, torch.Tensor) else reference, np.float64)
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, np.float64)
    if ref.shape != p.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {p.shape}")
    finite = bool(np.isfinite(p).all())
    diff = float(np.abs(ref - p).max()) if finite and ref.size else (0.0 if finite else float("inf"))
    agree = float((ref.argmax(1) == p.argmax(1)).mean()) if len(ref) else 1.0
    return {"max_prob_diff": diff, "mean_prob_diff": float(np.abs(ref - p).mean()) if finite and ref.size else diff,
            "argmax_agreement": agree if finite else 0.0, "n": int(len(ref))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runner(runner: Callable[[dict], dict], batch: dict, repeats: int = 3, warmup: int = 1,
                device: torch.device | str = "cpu") -> list[float]:
    """Wall-clock milliseconds per call (after ``warmup`` calls)."""
    device = as_device(device)
    for _ in range(warmup):
        runner(batch)
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner(batch)
        _sync(device)
        out.append((time.perf_counter() - t0) * 1000)
    return out


@dataclass
class BackendSelection:
    name: str
    runner: BackendRunner
    candidates: list[dict]

    def __call__(self, batch: dict) -> dict:
        return self.runner(batch)


def selection_text(candidates: Sequence[dict] | None, chosen: str | None = None) -> str:
    """One line a person can read: each checked backend's latency, or why it was not eligible."""
    parts = []
    for rec in candidates or []:
        if rec.get("ok"):
            parts.append(f"{rec['name']} {rec['latency_ms']:.1f} ms" + (" ✓" if rec["name"] == chosen else ""))
        else:
            reason = str(rec.get("reason", "failed")).splitlines()[0]
            parts.append(f"{rec['name']} ✗ {reason[:90]}{'…' if len(reason) > 90 else ''}")
    return " · ".join(parts)


def select_backend(model: nn.Module, sample_batch: dict, candidates: Sequence[str] | None = None,
                   max_prob_diff: float = 0.02, min_agreement: float = 0.99, *, device="cpu", repeats: int = 3,
                   backend_options: dict | None = None,
                   factories: dict[str, BackendFactory] | None = None) -> BackendSelection:
    """The fastest candidate whose probabilities on ``sample_batch`` stay within ``max_prob_diff`` of
    fp32 eager with argmax agreement ≥ ``min_agreement``; fp32 eager when none qualifies (or none is faster).

    Candidates that fail to build or run are skipped with their error recorded. ``factories``
    overrides/extends the registry (tests inject broken backends this way).
    """
    device = as_device(device)
    registry = {**BACKENDS, **(factories or {})}
    candidates = list(candidates) if candidates is not None else [b for b in BACKENDS if b != "compile"]
    ref_runner = prepare_backend(model, "fp32", device=device)
    ref = ref_runner.predict_proba(sample_batch)
    ref_ms = float(np.median(time_runner(ref_runner, sample_batch, repeats, 1, device)))
    report = [{"name": "fp32", "ok": True, "latency_ms": ref_ms, "max_prob_diff": 0.0, "argmax_agreement": 1.0}]
    best_name, best_runner, best_ms = "fp32", ref_runner, ref_ms
    for name in candidates:
        if name == "fp32":
            continue
        rec: dict = {"name": name, "ok": False}
        try:
            if name not in registry:
                raise UnknownBackendError(f"unknown backend {name!r}")
            if name in CPU_ONLY and device.type != "cpu":
                raise BackendError(f"{name} runs on CPU only")
            runner = registry[name](model, device=device, sample_batch=sample_batch,
                                    **(backend_options or {}).get(name, {}))
            probs = runner.predict_proba(sample_batch)
            rec.update(compare_probs(ref, probs))
            if not (rec["max_prob_diff"] <= max_prob_diff and rec["argmax_agreement"] >= min_agreement):
                rec["reason"] = (f"accuracy check failed: max prob diff {rec['max_prob_diff']:.4g} "
                                 f"(limit {max_prob_diff}), argmax agreement {rec['argmax_agreement']:.3f} "
                                 f"(min {min_agreement})")
            else:
                rec["latency_ms"] = float(np.median(time_runner(runner, sample_batch, repeats, 1, device)))
                rec["ok"] = True
                if rec["latency_ms"] < best_ms:
                    best_name, best_runner, best_ms = name, runner, rec["latency_ms"]
        except Exception as e:  # noqa: BLE001 — a failing candidate must never take the service down
            rec["reason"], rec["error"] = f"{type(e).__name__}: {e}", True  # a fault, not a failed accuracy check
        report.append(rec)
    return BackendSelection(best_name, best_runner, report)


def probs_over(runner: Callable[[dict], dict], batches: Iterable[dict]) -> np.ndarray:
    """Concatenated softmax probabilities of ``runner`` over ``batches``."""
    out = [torch.softmax(runner(b)["logits"].float(), -1).cpu().numpy() for b in batches]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
