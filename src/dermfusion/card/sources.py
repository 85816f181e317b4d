"""Shared pieces of the model card: metric names, where a figure came from (``source_ref``), number and CI checks,
JSON conversion."""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..evaluation.report_html import LABELS


N_BOOTSTRAP = 200
METRIC_LABELS = {**LABELS,  # the evaluation report's names, plus the calibration block's two
                 "official_raw": "Official score (raw probabilities)",
                 "nested_cut_score": "Official score (nested cut-tuned)"}
CARD_METRICS = ("official", "balanced_accuracy", "macro_f1", "accuracy", "macro_auroc", "melanoma_sensitivity",
                "melanoma_specificity", "malignant_sensitivity", "malignant_specificity", "ece", "brier", "log_loss")


def utc_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def source_ref(path, date: str | None = None, what: str = "") -> dict:
    p = Path(path)
    d = date or (utc_date(p.stat().st_mtime) if p.exists() else None)
    return {"file": str(p), "date": d, **({"what": what} if what else {})}


def read_json(path) -> dict | None:
    try:
        d = json.loads(Path(path).read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def as_number(v):
    """A finite float or None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def ci_pair(v):
    if isinstance(v, (list, tuple)) and len(v) == 2 and as_number(v[0]) is not None and as_number(v[1]) is not None:
        return [float(v[0]), float(v[1])]
    return None


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def fmt_value(v) -> str:
    f = as_number(v)
    return f"{f:.3g}" if f is not None and not isinstance(v, (bool, int)) else str(v)
