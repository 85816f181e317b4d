"""Metrics a challenge judge, a clinician and a regulator ask for — plain numpy, fast enough to bootstrap.

The MILK10k score is ISIC's: per class, truth = value > 0.5 and prediction = probability *strictly*
> 0.5; Dice = 2TP / (2TP + FP + FN); a class with TP + FP + FN = 0 scores 1.0; the score is the mean
over the classes. It is multi-label (no argmax). Everything else here is argmax-based unless it says
otherwise, because that is how a single diagnosis is read off a differential.

The argmax follows the official ISIC 2018 / 2019 scorer (``isic-challenge-scoring``): a row whose
maximum is *not unique* names no class (the scorer's "undecided") and counts as wrong — an all-equal
row, e.g. all zeros, is never right (see ``predicted_class``). Balanced accuracy, accuracy, the
confusion matrix, per-class precision / recall / F1, macro-F1 and the melanoma / malignant operating
points all read the prediction this way, so the headline balanced accuracy is exactly the mean of the
per-class recalls. Top-k accuracy (a ranking) and the top-label calibration bins keep the plain argmax.

Conventions: ``y_true`` is N×C (one-hot or soft; argmax-based metrics use its argmax) or N class
indices; ``y_prob`` is N×C. A per-class value that is undefined on the data (no positives, no
predictions) is NaN rather than a made-up 0 or 1 — except in the MILK10k Dice, whose 1.0 is the rule.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import rankdata

from ..tasks import TaskSpec

_EPS = 1e-12
NAN = float("nan")


# ---------------------------------------------------------------------------- inputs
def _as_arrays(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(N×C labels, N×C probabilities) as float arrays; class indices become one-hot."""
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim != 2:
        raise ValueError(f"y_prob must be N×C, got shape {y_prob.shape}")
    y_true = np.asarray(y_true)
    if y_true.ndim == 1:
        y_true = np.eye(y_prob.shape[1])[y_true.astype(int)]
    y_true = y_true.astype(float, copy=False)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} must have the same shape")
    return y_true, y_prob


def _idx(y) -> np.ndarray:
    """Class index per lesion (argmax of a label matrix, or the indices themselves)."""
    y = np.asarray(y)
    return y.argmax(1) if y.ndim == 2 else y.astype(int)


UNDECIDED = -1


def predicted_class(y_prob) -> np.ndarray:
    """The predicted class index per row: the argmax, or ``UNDECIDED`` (-1) where the row's maximum is
    not unique — the official ISIC scorer's rule, under which such a row counts as wrong whatever its
    true class (an all-equal row, e.g. all zeros, is never right). Values are compared exactly."""
    y_prob = np.asarray(y_prob, dtype=float)
    tied = (y_prob == y_prob.max(1, keepdims=True)).sum(1) > 1
    return np.where(tied, UNDECIDED, y_prob.argmax(1))


# ---------------------------------------------------------------------------- official scores
def dice_per_class(y_true, pred) -> np.ndarray:
    """Per-class Dice of binary predictions (bool N×C) against labels (> 0.5 is positive); 1.0 when
    a class has TP + FP + FN = 0, as in ISIC's scorer."""
    t = np.asarray(y_true) > 0.5
    p = np.asarray(pred).astype(bool)
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
    denom = 2 * tp + fp + fn
    return np.where(denom == 0, 1.0, 2 * tp / np.maximum(denom, 1))


def per_class_dice(y_true, y_prob) -> np.ndarray:
    """MILK10k per-class Dice: prediction = probability strictly above 0.5 (0.5 itself is negative)."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    return dice_per_class(y_true, y_prob > 0.5)


def milk10k_score(y_true, y_prob) -> float:
    """The official MILK10k score: mean per-class Dice of (probability > 0.5)."""
    return float(per_class_dice(y_true, y_prob).mean())


def balanced_accuracy(y_true, y_prob) -> float:
    """Mean recall over the classes present in the truth — the ISIC 2018 / 2019 metric exactly as the
    official scorer computes it: a row whose maximum is not unique counts as wrong (``predicted_class``).
    Without ties it equals sklearn's ``balanced_accuracy_score`` of the argmax."""
    t, p = _idx(y_true), predicted_class(y_prob)
    return float(np.mean([(p[t == c] == c).mean() for c in np.unique(t)]))


def official_score(task: TaskSpec, y_true, y_prob) -> float:
    """The task's leaderboard metric (``task.metric``)."""
    if task.metric == "milk10k_dice":
        return milk10k_score(y_true, y_prob)
    if task.metric == "balanced_accuracy":
        return balanced_accuracy(y_true, y_prob)
    raise ValueError(f"task {task.name!r} has unknown metric {task.metric!r}")


# ---------------------------------------------------------------------------- argmax metrics
def confusion_matrix(y_true, y_prob) -> np.ndarray:
    """C×C counts, rows = true class, columns = argmax prediction. A row whose maximum is not unique
    predicts no class and is left out (as in the official scorer), so a row of the matrix can sum to less
    than the class's support; recall and balanced accuracy still count such rows as misses."""
    C = np.asarray(y_prob).shape[1]
    t, p = _idx(y_true), predicted_class(y_prob)
    keep = p != UNDECIDED
    return np.bincount(t[keep] * C + p[keep], minlength=C * C).reshape(C, C)


def _support(y_true, C: int) -> np.ndarray:
    """Lesions per true class (including those whose prediction is undecided)."""
    return np.bincount(_idx(y_true), minlength=C)


def accuracy(y_true, y_prob) -> float:
    """Share of rows whose unique argmax is the true class (a tied maximum is wrong)."""
    return float((predicted_class(y_prob) == _idx(y_true)).mean())


def macro_f1(y_true, y_prob) -> float:
    """Argmax macro-F1 over the classes seen in the truth or the predictions (sklearn's convention);
    a row with a tied maximum is a false negative of its true class and a false positive of none."""
    cm = confusion_matrix(y_true, y_prob)
    tp, pred_n, true_n = np.diag(cm), cm.sum(0), _support(y_true, cm.shape[0])
    used = (pred_n + true_n) > 0  # pred_n + true_n = 2TP + FP + FN
    return float((2 * tp / np.maximum(pred_n + true_n, 1))[used].mean())


def top_k_accuracy(y_true, y_prob, k: int = 2) -> float:
    """Share of lesions whose true class is among the k most probable — how a differential is read."""
    top = np.argsort(-np.asarray(y_prob), axis=1, kind="stable")[:, :k]
    return float((top == _idx(y_true)[:, None]).any(1).mean())


def log_loss(y_true, y_prob) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    y_prob = np.asarray(y_prob, float)
    t = _idx(y_true)
    return float(-np.mean(np.log(np.clip(y_prob[np.arange(len(t)), t], _EPS, 1.0))))


def per_class_prf(y_true, y_prob) -> dict[str, np.ndarray]:
    """Argmax precision, recall, F1 and support per class; NaN where the ratio is 0/0. Support counts
    every lesion of the class, so a tied (undecided) row lowers its class's recall — the mean recall over
    the classes present is ``balanced_accuracy``."""
    cm = confusion_matrix(y_true, y_prob)
    tp, pred_n = np.diag(cm).astype(float), cm.sum(0).astype(float)
    true_n = _support(y_true, cm.shape[0]).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred_n > 0, tp / pred_n, NAN)
        recall = np.where(true_n > 0, tp / true_n, NAN)
        denom = pred_n + true_n  # = 2TP + FP + FN
        f1 = np.where(denom > 0, 2 * tp / denom, NAN)
    return {"precision": precision, "recall": recall, "f1": f1, "support": true_n.astype(int)}


# ---------------------------------------------------------------------------- ranking metrics
def auroc_per_class(y_true, y_prob) -> np.ndarray:
    """One-vs-rest AUROC per class via the Mann–Whitney rank sum (ties averaged, as sklearn);
    NaN for a class without both positives and negatives. Vectorised over classes for bootstrapping."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    t = y_true > 0.5
    P = t.sum(0).astype(float)
    Nn = len(t) - P
    ranks = rankdata(y_prob, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * t).sum(0) - P * (P + 1) / 2) / (P * Nn)
    return np.where((P > 0) & (Nn > 0), auc, NAN)


def average_precision_per_class(y_true, y_prob) -> np.ndarray:
    """Average precision per class, sklearn's step-wise definition Σ (R_k − R_{k−1}) · P_k over distinct
    scores; NaN for a class with no positives."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    out = np.full(y_prob.shape[1], NAN)
    for c in range(y_prob.shape[1]):
        t = y_true[:, c] > 0.5
        P = t.sum()
        if P == 0:
            continue
        order = np.argsort(-y_prob[:, c], kind="mergesort")
        s, tt = y_prob[order, c], t[order]
        last = np.r_[s[1:] != s[:-1], True]  # last row of each group of tied scores
        tp = np.cumsum(tt)[last]
        k = np.flatnonzero(last) + 1
        recall = tp / P
        out[c] = float(np.sum(np.diff(np.r_[0.0, recall]) * tp / k))
    return out


# ---------------------------------------------------------------------------- clinical operating points
def sensitivity_specificity(truth, pred) -> tuple[float, float]:
    """Binary sensitivity and specificity; NaN when there are no positives / negatives."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    sens = float((pred & truth).sum() / truth.sum()) if truth.any() else NAN
    spec = float((~pred & ~truth).sum() / (~truth).sum()) if (~truth).any() else NAN
    return sens, spec


def melanoma_operating_point(task: TaskSpec, y_true, y_prob, cut: float | None = None) -> dict:
    """Melanoma sensitivity/specificity at argmax == MEL, or at P(MEL) > cut when a cut is given
    (the cut a triage rule would use). NaN for tasks without a MEL class. A row with a tied maximum is
    no melanoma call (``predicted_class``), so the sensitivity equals MEL's per-class recall."""
    if task.melanoma_class is None:
        return {"melanoma_sensitivity": NAN, "melanoma_specificity": NAN}
    j = task.index(task.melanoma_class)
    y_prob = np.asarray(y_prob)
    truth = _idx(y_true) == j
    pred = (y_prob[:, j] > cut) if cut is not None else (predicted_class(y_prob) == j)
    sens, spec = sensitivity_specificity(truth, pred)
    return {"melanoma_sensitivity": sens, "melanoma_specificity": spec}


def malignant_operating_point(task: TaskSpec, y_true, y_prob) -> dict:
    """Any malignant class (the task's malignant set) vs benign, prediction by argmax: the miss rate
    that matters most clinically is 1 − this sensitivity. A row with a tied maximum names no class and
    so is no malignant call."""
    mal = np.array(task.malignant_indices, dtype=int)
    truth = np.isin(_idx(y_true), mal)
    pred = np.isin(predicted_class(y_prob), mal)
    sens, spec = sensitivity_specificity(truth, pred)
    return {"malignant_sensitivity": sens, "malignant_specificity": spec}


# ---------------------------------------------------------------------------- calibration quality
def reliability_bins(y_true, y_prob, n_bins: int = 15) -> dict:
    """Top-label reliability: per equal-width confidence bin (lo, hi], mean confidence, accuracy, count.
    The top label here is the plain argmax (the first of tied maxima), as in Guo et al."""
    y_prob = np.asarray(y_prob, float)
    conf = y_prob.max(1)
    correct = (y_prob.argmax(1) == _idx(y_true)).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, n_bins) / count
        acc = np.bincount(which, correct, n_bins) / count
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": np.where(count > 0, mean_conf, NAN).tolist(),
            "accuracy": np.where(count > 0, acc, NAN).tolist()}


def expected_calibration_error(y_true, y_prob, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): Σ_bins |B|/N · |accuracy(B) − confidence(B)|, 15 equal bins."""
    r = reliability_bins(y_true, y_prob, n_bins)
    count = np.asarray(r["count"], float)
    gap = np.abs(np.nan_to_num(np.asarray(r["accuracy"]) - np.asarray(r["confidence"])))
    return float((count * gap).sum() / max(count.sum(), 1))


def brier_score(y_true, y_prob) -> float:
    """Multiclass Brier score: mean over lesions of Σ_c (p_c − y_c)² (0 perfect, 2 worst)."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    return float(((y_prob - y_true) ** 2).sum(1).mean())


# ---------------------------------------------------------------------------- summaries
HEADLINE = ("official", "balanced_accuracy", "macro_f1", "accuracy", "top2_accuracy", "top3_accuracy",
            "milk10k_score", "macro_auroc", "melanoma_sensitivity", "melanoma_specificity",
            "malignant_sensitivity", "malignant_specificity", "ece", "brier", "log_loss")
PER_CLASS = ("precision", "recall", "f1", "dice", "auroc", "average_precision")


def headline_metrics(task: TaskSpec, y_true, y_prob) -> dict[str, float]:
    """The flat scalar metrics (no per-class table): cheap enough to recompute per bootstrap resample."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    m = {"official": official_score(task, y_true, y_prob), "balanced_accuracy": balanced_accuracy(y_true, y_prob),
         "macro_f1": macro_f1(y_true, y_prob), "accuracy": accuracy(y_true, y_prob),
         "top2_accuracy": top_k_accuracy(y_true, y_prob, 2), "top3_accuracy": top_k_accuracy(y_true, y_prob, 3),
         "milk10k_score": milk10k_score(y_true, y_prob)}
    auc = auroc_per_class(y_true, y_prob)
    m["macro_auroc"] = float(np.nanmean(auc)) if np.isfinite(auc).any() else NAN
    m.update(melanoma_operating_point(task, y_true, y_prob))
    m.update(malignant_operating_point(task, y_true, y_prob))
    m.update(ece=expected_calibration_error(y_true, y_prob), brier=brier_score(y_true, y_prob),
             log_loss=log_loss(y_true, y_prob))
    return m


def per_class_metrics(task: TaskSpec, y_true, y_prob) -> dict[str, dict[str, float]]:
    """{class: {support, precision, recall, f1, dice, auroc, average_precision}} in task order."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    prf = per_class_prf(y_true, y_prob)
    cols = {**prf, "dice": per_class_dice(y_true, y_prob), "auroc": auroc_per_class(y_true, y_prob),
            "average_precision": average_precision_per_class(y_true, y_prob)}
    return {c: {"support": int(prf["support"][j]), **{k: float(cols[k][j]) for k in PER_CLASS}}
            for j, c in enumerate(task.classes)}


def compute_metrics(task: TaskSpec, y_true, y_prob) -> dict:
    """Everything for one set of predictions: flat headline metrics, ``per_class`` and the confusion
    matrix. Validates that the class count matches the task."""
    y_true, y_prob = _as_arrays(y_true, y_prob)
    if y_prob.shape[1] != task.num_classes:
        raise ValueError(f"{y_prob.shape[1]} probability columns for task {task.name!r} "
                         f"with {task.num_classes} classes ({', '.join(task.classes)})")
    return {"n": int(len(y_true)), "official_metric": task.metric, **headline_metrics(task, y_true, y_prob),
            "per_class": per_class_metrics(task, y_true, y_prob),
            "confusion_matrix": confusion_matrix(y_true, y_prob).tolist()}


# ---------------------------------------------------------------------------- uncertainty
def bootstrap_ci(fn: Callable, y_true, y_prob, n: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Percentile (1 − alpha) CI of ``fn(y_true, y_prob)``, resampling lesions (rows) with replacement.

    ``fn`` may return a float, a 1-D array or a flat dict of floats; the result has the same shape:
    ``(lo, hi)``, ``(lo_array, hi_array)`` or ``{key: (lo, hi)}``. NaN resamples (e.g. a class absent
    from a resample) are ignored; a value NaN in every resample gets a (NaN, NaN) interval.
    """
    y_true, y_prob = _as_arrays(y_true, y_prob)
    rng = np.random.default_rng(seed)
    N = len(y_true)
    first = fn(y_true, y_prob)
    keys = list(first) if isinstance(first, dict) else None

    def flat(v) -> np.ndarray:
        return np.asarray([v[k] for k in keys] if keys is not None else v, dtype=float).ravel()

    # one resample at a time keeps memory O(N); the metric functions themselves are vectorised over classes
    vals = np.stack([flat(fn(y_true[i], y_prob[i])) for i in (rng.integers(0, N, N) for _ in range(n))])
    lo, hi = np.full(vals.shape[1], NAN), np.full(vals.shape[1], NAN)
    ok = np.isfinite(vals).any(0)
    if ok.any():
        lo[ok], hi[ok] = np.nanquantile(vals[:, ok], [alpha / 2, 1 - alpha / 2], axis=0)
    if keys is not None:
        return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(keys)}
    if np.ndim(first) == 0:
        return float(lo[0]), float(hi[0])
    return lo, hi


def bootstrap_metrics(task: TaskSpec, y_true, y_prob, n: int = 200, seed: int = 0, alpha: float = 0.05) -> dict:
    """95% CIs of the headline metrics and of each class's F1 / recall / AUROC, from one bootstrap."""
    C = task.num_classes

    def fn(t, p):
        out = headline_metrics(task, t, p)
        prf = per_class_prf(t, p)
        auc = auroc_per_class(t, p)
        for j, c in enumerate(task.classes):
            out[f"f1/{c}"], out[f"recall/{c}"], out[f"auroc/{c}"] = prf["f1"][j], prf["recall"][j], auc[j]
        return out

    ci = bootstrap_ci(fn, y_true, y_prob, n=n, seed=seed, alpha=alpha)
    per_class = {c: {m: ci.pop(f"{m}/{c}") for m in ("f1", "recall", "auroc")} for c in task.classes[:C]}
    return {"headline": ci, "per_class": per_class, "n_resamples": n, "alpha": alpha}
