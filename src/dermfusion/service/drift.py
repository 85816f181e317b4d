"""Input and prediction drift: recent traffic compared with the bundle's reference statistics.

The reference (``drift_reference.json``, written at the end of training) and the signals are defined in
``evaluation.drift_reference``. The service keeps a rolling window of recent analyses and reports the Population Stability Index per
signal: PSI = Σ (cur − ref) · ln(cur / ref). Rule of thumb: < 0.1 stable, 0.1–0.25 moderate shift,
> 0.25 major shift — look at the inputs (new camera? new clinic?) before trusting the outputs.
"""
from __future__ import annotations

import threading
from collections import deque
from datetime import datetime
from pathlib import Path

import numpy as np

from ..bundle import read_bundle
from ..evaluation.drift_reference import REFERENCE_FILE, read_reference_stats
from .audit import AuditStore

PSI_EPS = 1e-4


# ----------------------------------------------------------------------------------------------- PSI
def psi(ref_probs, cur_counts) -> float:
    ref = np.clip(np.asarray(ref_probs, dtype=np.float64), PSI_EPS, None)
    counts = np.asarray(cur_counts, dtype=np.float64)
    n = counts.sum()
    if n <= 0:
        return float("nan")
    cur = np.clip(counts / n, PSI_EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def signal_psi(ref: dict, values: list) -> float:
    if ref["type"] == "numeric":
        v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
        if not len(v):
            return float("nan")
        counts = np.bincount(np.searchsorted(np.asarray(ref["edges"]), v, side="right"), minlength=len(ref["probs"]))
        return psi(ref["probs"], counts[:len(ref["probs"])])
    cats = ref["categories"]
    counts = [sum(1 for x in values if x == c) for c in cats]
    return psi(ref["probs"], counts)


def drift_psi(reference: dict, observations: list[dict], min_samples: int = 1) -> dict[str, dict]:
    """{signal: {"psi": value, "n": count, "level": stable|moderate|major}} for signals with enough values."""
    out = {}
    for name, ref in reference.get("signals", {}).items():
        vals = [o[name] for o in observations if name in o]
        if len(vals) < min_samples or not ref.get("probs"):
            continue
        value = signal_psi(ref, vals)
        if np.isfinite(value):
            out[name] = {"psi": value, "n": len(vals), "level": psi_level(value)}
    return out


def psi_level(value: float) -> str:
    return "stable" if value < 0.1 else "moderate" if value < 0.25 else "major"


class DriftMonitor:
    """A rolling window of recent observations compared with the bundle's reference (thread-safe)."""
    def __init__(self, reference: dict | None, window: int = 500, min_samples: int = 30):
        self.reference, self.min_samples = reference, min_samples
        self.window: deque = deque(maxlen=window)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.reference is not None

    def observe(self, obs: dict) -> None:
        with self._lock:
            self.window.append(obs)

    def current(self) -> dict[str, dict]:
        if not self.enabled:
            return {}
        with self._lock:
            obs = list(self.window)
        return drift_psi(self.reference, obs, self.min_samples)


def observations_from_audit(rows: list[dict]) -> list[dict]:
    """Drift observations of audited analyses; "cannot assess" answers are left out (as in the live window)."""
    out = []
    for r in rows:
        if r.get("action") == "cannot_assess":
            continue
        obs = {f"{m}.{k}": v for m, st in (r.get("input_stats") or {}).items() for k, v in st.items()}
        if r.get("top_probability") is not None:
            obs["confidence"] = float(r["top_probability"])
        if r.get("primary_class"):
            obs["predicted_class"] = r["primary_class"]
        out.append(obs)
    return out


def drift_report(db_url: str, bundle_dir: str | Path, *, limit: int = 500, since: datetime | None = None,
                 min_samples: int = 1) -> dict:
    """PSI per signal for the most recent ``limit`` audited analyses of this bundle's model."""
    bundle = read_bundle(bundle_dir)
    reference = read_reference_stats(bundle_dir)
    if reference is None:
        raise FileNotFoundError(f"{bundle_dir} has no {REFERENCE_FILE}: compute it with "
                                "dermfusion.evaluation.drift_reference.compute_reference_stats and write_reference_stats")
    store = AuditStore(db_url, create=False)
    try:
        rows = store.recent(limit=limit, since=since, model_hash=bundle.content_hash or None)
    finally:
        store.close()
    signals = drift_psi(reference, observations_from_audit(rows), min_samples)
    return {"bundle": str(bundle_dir), "model_hash": bundle.content_hash, "analyses": len(rows),
            "window_start": rows[-1]["created_at"] if rows else None, "window_end": rows[0]["created_at"] if rows else None,
            "signals": signals, "max_psi": max((s["psi"] for s in signals.values()), default=0.0)}
