"""Input and prediction drift: reference statistics stored in the bundle, compared with recent traffic.

Signals (one value per analysed lesion):

  <modality>.brightness   mean luminance (0–1)          <modality>.contrast    luminance std
  <modality>.red/green/blue  mean channel value (colour)   <modality>.saturation  mean HSV saturation
  confidence              top calibrated probability      predicted_class        the argmax class

The reference (``drift_reference.json`` in the bundle) holds, per numeric signal, decile bin edges
and the share of reference lesions in each bin; per categorical signal the class shares. The
service keeps a rolling window of recent analyses and reports the Population Stability Index per
signal: PSI = Σ (cur − ref) · ln(cur / ref). Rule of thumb: < 0.1 stable, 0.1–0.25 moderate shift,
> 0.25 major shift — look at the inputs (new camera? new clinic?) before trusting the outputs.
"""
from __future__ import annotations

import json
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

REFERENCE_FILE = "drift_reference.json"
FORMAT = 1
IMAGE_STATS = ("brightness", "contrast", "red", "green", "blue", "saturation")
PSI_EPS = 1e-4


def image_stats(img: Image.Image) -> dict[str, float]:
    """Cheap global statistics of an RGB image (computed on a ≤128 px thumbnail)."""
    small = img.convert("RGB")
    if max(small.size) > 128:
        small = small.copy()
        small.thumbnail((128, 128), Image.BILINEAR)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    sat = np.asarray(small.convert("HSV"), dtype=np.float32)[..., 1] / 255.0
    return {"brightness": float(y.mean()), "contrast": float(y.std()), "red": float(rgb[..., 0].mean()),
            "green": float(rgb[..., 1].mean()), "blue": float(rgb[..., 2].mean()), "saturation": float(sat.mean())}


def observation(image_stats_by_modality: dict[str, dict[str, float]], probs: np.ndarray | None,
                classes: list[str] | tuple[str, ...]) -> dict:
    """One lesion's signal values (what the rolling window and the audit-based report consume)."""
    obs: dict = {f"{m}.{k}": float(v) for m, st in image_stats_by_modality.items() for k, v in st.items()}
    if probs is not None and len(probs):
        obs["confidence"] = float(np.max(probs))
        obs["predicted_class"] = str(classes[int(np.argmax(probs))])
    return obs


# ------------------------------------------------------------------------------------------- reference
def numeric_reference(values, bins: int = 10) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"type": "numeric", "edges": [], "probs": [1.0], "n": 0}
    edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
    return {"type": "numeric", "edges": edges.tolist(), "probs": (counts / counts.sum()).tolist(), "n": int(len(v)),
            "mean": float(v.mean()), "std": float(v.std())}


def categorical_reference(values, categories) -> dict:
    cats = [str(c) for c in categories]
    counts = np.array([sum(1 for x in values if x == c) for c in cats], dtype=np.float64)
    n = counts.sum()
    probs = counts / n if n else np.full(len(cats), 1.0 / max(len(cats), 1))
    return {"type": "categorical", "categories": cats, "probs": probs.tolist(), "n": int(n)}


def compute_reference_stats(predictor, manifest_df, *, probs=None, bins: int = 10, max_lesions: int | None = None,
                            progress: bool = False) -> dict:
    """Reference statistics for a bundle, from the lesions it was trained / validated on.

    Decodes every image once (thumbnail statistics), runs ``predictor.predict_proba`` for the
    confidence and predicted-class distributions — or uses ``probs`` (N×C calibrated probabilities
    for the rows of ``manifest_df``, e.g. the out-of-fold predictions) to skip that pass — and
    records the label prior when labels exist.
    """
    from ..data.images import ImageError, read_image
    from ..data.manifest import IMAGE_COLUMNS

    df = manifest_df.reset_index(drop=True)
    if probs is not None and len(probs) != len(df):
        raise ValueError(f"probs has {len(probs)} rows for {len(df)} manifest rows")
    if max_lesions is not None and len(df) > max_lesions:
        keep = df.sample(n=max_lesions, random_state=0).index
        probs = None if probs is None else np.asarray(probs)[keep]
        df = df.loc[keep].reset_index(drop=True)
    task = predictor.task
    spec = getattr(predictor, "spec", None)
    modalities = list(getattr(spec, "modalities", None) or task.modalities)
    values: dict[str, list[float]] = {}
    unreadable = 0
    for m in modalities:
        col = IMAGE_COLUMNS.get(m)
        if col is None or col not in df.columns:
            continue
        for path in df[col].fillna("").astype(str):
            if not path:
                continue
            try:
                st = image_stats(read_image(path))
            except ImageError:
                unreadable += 1
                continue
            for k, v in st.items():
                values.setdefault(f"{m}.{k}", []).append(v)
    signals = {name: numeric_reference(v, bins) for name, v in values.items()}
    calibrated = True
    if probs is None:
        try:
            probs = predictor.predict_proba(df, progress=progress)
        except ImportError:  # calibration module not available: raw probabilities
            probs = predictor.predict_raw(df, progress=progress)
            calibrated = False
    probs = np.asarray(probs, dtype=np.float64)
    classes = list(task.classes)
    if len(probs):
        signals["confidence"] = numeric_reference(probs.max(1).tolist(), bins)
        signals["predicted_class"] = categorical_reference([classes[i] for i in probs.argmax(1)], classes)
    label_cols = task.label_columns()
    prior = None
    if all(c in df.columns for c in label_cols):
        y = df[label_cols].to_numpy(dtype=np.float64)
        ok = ~np.isnan(y).any(1)
        if ok.any():
            prior = dict(zip(classes, (y[ok].sum(0) / y[ok].sum()).tolist()))
    return {"format": FORMAT, "created_at": datetime.now(timezone.utc).isoformat(), "task": task.name,
            "n_lesions": int(len(df)), "unreadable_images": unreadable, "calibrated": calibrated,
            "class_prior": prior, "signals": signals}


def write_reference_stats(bundle_dir: str | Path, stats: dict) -> Path:
    """Write ``drift_reference.json`` into a bundle (monitoring data: not part of the model hash)."""
    path = Path(bundle_dir) / REFERENCE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stats, indent=1, default=float))
    tmp.replace(path)
    return path


def read_reference_stats(bundle_dir: str | Path) -> dict | None:
    path = Path(bundle_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) and data.get("signals") else None


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
    out = []
    for r in rows:
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
    from ..inference.bundle import read_bundle
    from .audit import AuditStore

    bundle = read_bundle(bundle_dir)
    reference = read_reference_stats(bundle_dir)
    if reference is None:
        raise FileNotFoundError(f"{bundle_dir} has no {REFERENCE_FILE}: compute it with "
                                "dermfusion.service.drift.compute_reference_stats and write_reference_stats")
    store = AuditStore(db_url, create=False)
    try:
        rows = store.recent(limit=limit, since=since, model_hash=bundle.content_hash or None)
    finally:
        store.close()
    signals = drift_psi(reference, observations_from_audit(rows), min_samples)
    return {"bundle": str(bundle_dir), "model_hash": bundle.content_hash, "analyses": len(rows),
            "window_start": rows[-1]["created_at"] if rows else None, "window_end": rows[0]["created_at"] if rows else None,
            "signals": signals, "max_psi": max((s["psi"] for s in signals.values()), default=0.0)}
