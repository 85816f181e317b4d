"""Subgroup performance: the same core metrics by skin tone, sex, age band and body site.

Why: an average can hide a subgroup where the model misses cancers — e.g. on darker skin tones,
under-represented in dermoscopy datasets. A slice is *flagged* when its sensitivity for the malignant
set (any malignant class vs benign, by argmax) or its melanoma sensitivity falls more than `margin`
below the whole set's. Slices with fewer than `min_size` lesions are marked "too small" instead of
flagged: their estimates are too noisy to act on, which is itself worth reporting.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..tasks import TaskSpec
from .metrics import (_as_arrays, accuracy, auroc_per_class, balanced_accuracy, macro_f1, malignant_operating_point,
                      melanoma_operating_point)

ATTRIBUTES = ("skin_tone", "sex", "age", "site")
AGE_BANDS = ("<30", "30-49", "50-69", "70+", "unknown")
UNKNOWN = "unknown"
MIN_SLICE = 10


def age_band(age) -> str:
    """Age in years → "<30", "30-49", "50-69", "70+" or "unknown"."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if not np.isfinite(a):
        return UNKNOWN
    return "<30" if a < 30 else "30-49" if a < 50 else "50-69" if a < 70 else "70+"


def slice_labels(meta: pd.DataFrame) -> dict[str, pd.Series]:
    """Group label per lesion for each attribute present in the manifest ("" / NaN → "unknown")."""
    out = {}
    for attr in ATTRIBUTES:
        if attr not in meta.columns:
            continue
        col = meta[attr]
        if attr == "age":
            out[attr] = col.map(age_band)
        else:
            s = col.astype(object).where(col.notna(), "").astype(str).str.strip()
            s = s.str.replace(r"\.0$", "", regex=True).replace({"": UNKNOWN, "nan": UNKNOWN, "None": UNKNOWN})
            out[attr] = ("tone " + s).where(s != UNKNOWN, UNKNOWN) if attr == "skin_tone" else s
    # an attribute nobody recorded has a single "unknown" slice equal to the whole set: leave it out
    return {a: s for a, s in out.items() if (s != UNKNOWN).any()}


def _group_order(attr: str, groups) -> list[str]:
    groups = list(dict.fromkeys(groups))
    if attr == "age":
        return [g for g in AGE_BANDS if g in groups]
    return sorted([g for g in groups if g != UNKNOWN]) + ([UNKNOWN] if UNKNOWN in groups else [])


def slice_metrics(task: TaskSpec, y_true: np.ndarray, y_prob: np.ndarray) -> dict:
    """The core metrics of one slice, with counts so a reader can judge them."""
    t = y_true.argmax(1)
    m = {"n": int(len(t)), "n_malignant": int(np.isin(t, task.malignant_indices).sum()),
         "n_melanoma": int((t == task.index(task.melanoma_class)).sum()) if task.melanoma_class else 0,
         "accuracy": accuracy(y_true, y_prob) if len(t) else np.nan,  # a tied maximum is wrong, as in the headline
         "balanced_accuracy": balanced_accuracy(y_true, y_prob) if len(t) else np.nan,
         "macro_f1": macro_f1(y_true, y_prob) if len(t) else np.nan}
    m.update(malignant_operating_point(task, y_true, y_prob))
    m.update(melanoma_operating_point(task, y_true, y_prob))
    m["malignant_auroc"] = malignant_auroc(task, y_true, y_prob)
    return m


def malignant_auroc(task: TaskSpec, y_true, y_prob) -> float:
    """AUROC of the summed malignant-class probability for "any malignant vs benign" — threshold-free,
    so a slice's ranking quality can be told apart from a shifted operating point. NaN without both."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    mal = task.malignant_indices
    truth = np.isin(y_true.argmax(1), mal).astype(float)
    score = y_prob[:, mal].sum(1)
    return float(auroc_per_class(truth[:, None], score[:, None])[0]) if len(truth) else np.nan


def fairness_table(task: TaskSpec, y_true, y_prob, meta: pd.DataFrame, margin: float = 0.10,
                   min_size: int = MIN_SLICE) -> pd.DataFrame:
    """One row for the whole set, then one per (attribute, group).

    ``meta`` is row-aligned with the predictions (manifest columns age, sex, skin_tone, site; missing
    columns are skipped). ``status`` is "ok", "flagged" or "too small"; ``reason`` says why.
    """
    y_true, y_prob = _as_arrays(y_true, y_prob)
    if len(meta) != len(y_true):
        raise ValueError(f"meta has {len(meta)} rows for {len(y_true)} predictions")
    meta = meta.reset_index(drop=True)
    whole = slice_metrics(task, y_true, y_prob)
    rows = [{"attribute": "all", "group": "all", **whole, "status": "ok", "reason": ""}]
    for attr, labels in slice_labels(meta).items():
        for g in _group_order(attr, labels):
            mask = (labels == g).to_numpy()
            m = slice_metrics(task, y_true[mask], y_prob[mask])
            status, reason = _judge(m, whole, margin, min_size)
            rows.append({"attribute": attr, "group": g, **m, "status": status, "reason": reason})
    return pd.DataFrame(rows)


def _judge(m: dict, whole: dict, margin: float, min_size: int) -> tuple[str, str]:
    if m["n"] < min_size:
        return "too small", f"fewer than {min_size} lesions"
    reasons = []
    for key, name in (("malignant_sensitivity", "malignant sensitivity"), ("melanoma_sensitivity", "melanoma sensitivity")):
        v, ref = m.get(key, np.nan), whole.get(key, np.nan)
        if np.isfinite(v) and np.isfinite(ref) and v < ref - margin:
            reasons.append(f"{name} {v:.2f} vs {ref:.2f} overall")
    return ("flagged", "; ".join(reasons)) if reasons else ("ok", "")


def fairness_slices(task: TaskSpec, manifest_df: pd.DataFrame, y_true, y_prob, margin: float = 0.10,
                    min_count: int = MIN_SLICE) -> pd.DataFrame:
    """Subgroup table for predictions row-aligned with ``manifest_df`` (the manifest rows of the predicted
    lesions, same order): skin tone ("tone 0".."tone 5", unknown), sex, age band (<30, 30-49, 50-69, 70+,
    unknown) and body site ("" → unknown), plus an "all" row.

    Columns: attribute, group, n, n_malignant, n_melanoma, accuracy, balanced_accuracy, macro_f1,
    malignant_sensitivity/specificity (argmax in the malignant set), melanoma_sensitivity/specificity
    (NaN when the task has no MEL), malignant_auroc (summed malignant probability), status ("ok",
    "flagged", "too small") and reason. A slice is flagged when its malignant or melanoma sensitivity is
    more than ``margin`` below the whole set's; slices under ``min_count`` lesions are "too small", never
    flagged. Attributes nobody recorded (all unknown) are left out.
    """
    return fairness_table(task, y_true, y_prob, manifest_df, margin=margin, min_size=min_count)
