"""The conformal differential: "with 95 % confidence the diagnosis is among these".

A class-conditional (Mondrian) split-conformal prediction set, computed by ``crepes`` (Boström, conformal
classifiers with Mondrian categories). Non-conformity of class c for a lesion = 1 − P(c | lesion), the posterior
under the training prior. The calibration scores are the out-of-fold lesions' scores of their *true* class,
grouped by that class; class c enters a lesion's set when its p-value against class c's calibration scores exceeds
1 − level. Because every class has its own calibration group, coverage holds *per class* — melanoma's included —
not only on average, and it survives a change of case mix (label shift): the score is a fixed function of the
lesion and each class is calibrated on its own lesions. Marginal coverage and set size under a deployment prior are
the per-class figures re-weighted (``posterior.prior_weights``).

The bundle stores the calibration scores (``decisions.json``: ``differential``), not a fitted object, so the
set is recomputed from data anyone can read.
"""
from __future__ import annotations

import numpy as np

from ..tasks import TaskSpec


def _crepes():
    try:
        from crepes import ConformalClassifier  # a dependency of dermfusion; imported here to keep start-up quick
    except ImportError as e:  # pragma: no cover - crepes is a declared dependency
        raise ImportError("the conformal differential needs crepes: pip install crepes") from e
    return ConformalClassifier


def fit_conformal(task: TaskSpec, y_idx, posteriors, level: float = 0.95, class_levels: dict | None = None) -> dict:
    """The calibration a prediction set needs: per class, the non-conformity scores (1 − posterior of the true
    class) of the labelled lesions of that class, sorted. JSON-ready. ``class_levels``: a higher coverage for some
    classes (e.g. {"MEL": 0.97}: a missed melanoma costs more than a longer differential) — Mondrian sets calibrate
    each class on its own, so each may have its own level."""
    y = np.asarray(y_idx).astype(int)
    p = np.asarray(posteriors, dtype=np.float64)
    if not 0.5 <= float(level) < 1.0:
        raise ValueError(f"coverage level must lie in [0.5, 1), got {level}")
    scores = {c: np.sort(1.0 - p[y == j, j]).round(6).tolist() for j, c in enumerate(task.classes)}
    levels = {c: float(v) for c, v in (class_levels or {}).items()}
    bad = {c: v for c, v in levels.items() if c not in task.classes or not float(level) <= v < 1.0}
    if bad:
        raise ValueError(f"class levels must name {task.name} classes and lie in [level, 1): {bad}")
    return {"method": "mondrian split-conformal (class-conditional), crepes", "score": "1 - posterior",
            "level": float(level), "class_levels": levels, "n": int(len(y)), "calibration_scores": scores,
            "always_in": always_in(scores, float(level), levels)}


def always_in(scores: dict, level: float, class_levels: dict | None = None) -> dict:
    """The classes too rare among the calibration lesions to be ruled out at their level, with their counts: the
    smallest p-value n calibration lesions allow is 1 / (n + 1), and ``prediction_sets`` keeps a class whose p-value
    exceeds 1 − level, so a class with fewer than ``lesions_needed(level)`` lesions (19 at 95 %) is in every set."""
    levels = class_levels or {}
    return {c: len(v) for c, v in scores.items() if len(v) < lesions_needed(levels.get(c, level))}


def lesions_needed(level: float) -> int:
    """The fewest calibration lesions of a class that let a set leave it out at ``level``: the smallest n with
    1 / (n + 1) ≤ 1 − level, in the floating-point arithmetic ``prediction_sets`` compares with (so the two agree
    exactly: 19 at 95 %, 10 at 90 %, 33 at 97 %)."""
    n = 0
    while 1.0 / (n + 1) > 1.0 - float(level):
        n += 1
    return n


def prediction_sets(task: TaskSpec, posteriors, conformal: dict, level: float | None = None) -> np.ndarray:
    """N×C booleans: class c is in lesion i's set at ``level`` (default: the level it was fitted for, and each
    class's own higher level where the calibration names one; an explicit ``level`` applies to every class).

    Non-smoothed p-values (a lesion's set never depends on a random draw). A class with no calibration lesions is
    always in the set: nothing says it can be ruled out."""
    ConformalClassifier = _crepes()
    p = np.asarray(posteriors, dtype=np.float64)
    per_class = {} if level is not None else dict(conformal.get("class_levels") or {})
    level = float(conformal["level"] if level is None else level)
    alphas = 1.0 - p
    out = np.ones(p.shape, dtype=bool)
    for j, c in enumerate(task.classes):
        cal = np.asarray(conformal["calibration_scores"].get(c, []), dtype=np.float64)
        if len(cal) == 0:
            continue
        cc = ConformalClassifier().fit(cal, bins=np.zeros(len(cal), dtype=int))
        pv = cc.predict_p(alphas[:, [j]], bins=np.zeros(len(p), dtype=int), smoothing=False)[:, 0]
        out[:, j] = pv > 1.0 - per_class.get(c, level)
    return out


def set_labels(task: TaskSpec, sets: np.ndarray, posteriors) -> list[list[str]]:
    """Each lesion's set as class codes, most probable first."""
    p = np.asarray(posteriors, dtype=np.float64)
    return [[task.classes[j] for j in np.argsort(-p[i]) if sets[i, j]] for i in range(len(sets))]


def set_metrics(task: TaskSpec, y_idx, sets, weights=None) -> dict:
    """Coverage (true class in the set), per-class coverage, mean set size and the share of empty sets."""
    y = np.asarray(y_idx).astype(int)
    s = np.asarray(sets, dtype=bool)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    covered = s[np.arange(len(y)), y]
    sizes = s.sum(1)
    out = {"n": int(len(y)), "coverage": float((w * covered).sum() / w.sum()),
           "mean_set_size": float((w * sizes).sum() / w.sum()), "empty_rate": float((w * (sizes == 0)).sum() / w.sum()),
           "coverage_by_class": {}, "n_by_class": {}}
    for j, c in enumerate(task.classes):
        m = y == j
        out["n_by_class"][c] = int(m.sum())
        out["coverage_by_class"][c] = float(covered[m].mean()) if m.any() else float("nan")
    return out


def conformal_report(task: TaskSpec, y_idx, posteriors, level: float = 0.95, *, folds=None, weights=None,
                     n_boot: int = 1000, seed: int = 0, class_levels: dict | None = None) -> dict:
    """The honest estimate of the prediction sets on labelled lesions: sets for each fold calibrated on the
    *other* folds (cross-conformal; without folds, 5 random ones), pooled; coverage, melanoma coverage and mean
    set size with percentile bootstrap 95 % intervals."""
    y = np.asarray(y_idx).astype(int)
    p = np.asarray(posteriors, dtype=np.float64)
    given = folds is not None and len(np.unique(folds)) >= 2
    f = np.asarray(folds) if given else np.random.default_rng(seed).permutation(np.arange(len(y)) % 5)
    sets = np.zeros(p.shape, dtype=bool)
    for k in np.unique(f):
        tr, te = f != k, f == k
        sets[te] = prediction_sets(task, p[te], fit_conformal(task, y[tr], p[tr], level, class_levels))
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    point = set_metrics(task, y, sets, w)
    rng = np.random.default_rng(seed)
    keys = ["coverage", "mean_set_size"]
    mel = task.classes.index("MEL") if "MEL" in task.classes else None
    boots = {k: [] for k in keys + (["melanoma_coverage"] if mel is not None else [])}
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        m = set_metrics(task, y[i], sets[i], w[i])
        for k in keys:
            boots[k].append(m[k])
        if mel is not None:
            boots["melanoma_coverage"].append(m["coverage_by_class"]["MEL"])
    if mel is not None:
        point["melanoma_coverage"] = point["coverage_by_class"]["MEL"]
    return {"level": level, "class_levels": dict(class_levels or {}), "cross_conformal": point,
            "ci95": {k: [float(np.nanquantile(v, q)) for q in (0.025, 0.975)] for k, v in boots.items()},
            "n_boot": n_boot, "folds": "given" if given else "5 random folds"}
