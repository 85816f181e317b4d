"""Drift reference statistics: what a bundle's validation lesions looked like, stored in the bundle as
``drift_reference.json`` at the end of training, for the service to compare live traffic with.

Signals (one value per lesion):

  <modality>.brightness   mean luminance (0–1)          <modality>.contrast    luminance std
  <modality>.red/green/blue  mean channel value (colour)   <modality>.saturation  mean HSV saturation
  confidence              top calibrated probability      predicted_class        the argmax class

Per numeric signal the reference holds decile bin edges and the share of reference lesions in each bin; per
categorical signal the class shares. The comparison (PSI, rolling window, audit-based report) is
``service.drift``. Beside the signals, ``quality_gate`` holds the lower-tail quantiles of the top calibrated
probability (``evaluation.quality_gate.confidence_reference``): the service's "cannot assess" model check.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import ImageError, read_image
from ..data.manifest import IMAGE_COLUMNS
from .quality_gate import confidence_reference

REFERENCE_FILE = "drift_reference.json"
FORMAT = 1
IMAGE_STATS = ("brightness", "contrast", "red", "green", "blue", "saturation")


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
            "class_prior": prior, "signals": signals,
            "quality_gate": confidence_reference(probs) if len(probs) and calibrated else None}


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


