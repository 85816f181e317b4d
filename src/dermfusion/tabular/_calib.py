"""Scores, temperature and per-class cuts used by the tabular stage.

Private stand-ins for `dermfusion.evaluation.metrics` / `.calibration` while those are being written;
the calibration dict (`temperature`, `prior_adjustment`, `cuts`) follows the contract in CONTRACTS.md
so that `Calibration.from_dict` of the evaluation package reads what is written here.

The MILK10k score (ISIC's scoring code): per class truth = y > 0.5, prediction = p strictly > 0.5,
Dice = 2TP/(2TP+FP+FN), a class with TP+FP+FN = 0 scores 1.0, mean over the classes. The score is a
sum of per-class terms, so each class's cut can be tuned on its own.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

_EPS = 1e-12
CUT_MIN, CUT_MAX = 1e-4, 1.0 - 1e-4


def dice_per_class(y_true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    t = np.asarray(y_true) > 0.5
    p = np.asarray(pred).astype(bool)
    tp = (t & p).sum(0)
    fp = (~t & p).sum(0)
    fn = (t & ~p).sum(0)
    denom = 2 * tp + fp + fn
    return np.where(denom == 0, 1.0, 2 * tp / np.maximum(denom, 1))


def milk10k_score(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """(official score, per-class Dice) of probabilities as submitted (prediction = p > 0.5)."""
    per = dice_per_class(y_true, np.asarray(probs) > 0.5)
    return float(per.mean()), per


def score_with_cuts(y_true, probs, cuts) -> tuple[float, np.ndarray]:
    per = dice_per_class(y_true, np.asarray(probs) > np.asarray(cuts)[None, :])
    return float(per.mean()), per


def balanced_accuracy(y_idx: np.ndarray, probs: np.ndarray) -> float:
    pred = np.asarray(probs).argmax(1)
    classes = np.unique(y_idx)
    return float(np.mean([(pred[y_idx == c] == c).mean() for c in classes]))


def macro_f1(y_idx: np.ndarray, probs: np.ndarray) -> float:
    C = probs.shape[1]
    pred = np.asarray(probs).argmax(1)
    onehot_t = np.eye(C)[y_idx]
    onehot_p = np.eye(C)[pred]
    present = onehot_t.sum(0) > 0
    return float(dice_per_class(onehot_t, onehot_p)[present].mean())


def log_loss(y_idx: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y_idx)), y_idx], _EPS, 1.0))))


# ---------------------------------------------------------------------- calibration
def apply_temperature(probs: np.ndarray, temperature: float, prior_adjustment=None) -> np.ndarray:
    z = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    if prior_adjustment is not None:
        z = z + np.asarray(prior_adjustment)[None, :]
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def rescale_cuts(probs: np.ndarray, cuts) -> np.ndarray:
    """Per class: p < t -> 0.5·p/t, else 0.5 + 0.5·(p−t)/(1−t); p > t  <=>  rescaled > 0.5."""
    t = np.asarray(cuts, float)[None, :]
    return np.where(probs < t, 0.5 * probs / t, 0.5 + 0.5 * (probs - t) / (1.0 - t))


def fit_temperature(probs: np.ndarray, y_idx: np.ndarray) -> float:
    res = minimize_scalar(lambda lt: log_loss(y_idx, apply_temperature(probs, float(np.exp(lt)))),
                          bounds=(np.log(0.2), np.log(5.0)), method="bounded")
    return float(np.exp(res.x))


def tune_cut(y: np.ndarray, p: np.ndarray, eval_size: int | None = None) -> float:
    """Cut t maximising Dice of (p > t) for one class; midpoint between neighbouring scores.

    eval_size: size of the set the submission will be scored on. A class with no positive there scores
    1.0 only if nothing is predicted, which happens with probability ~(1 − prevalence)^eval_size; for a
    class so rare that this beats the best Dice reachable on these rows, predict nothing (cut = CUT_MAX).
    """
    y = np.asarray(y) > 0.5
    P = int(y.sum())
    if P == 0:
        return CUT_MAX  # nothing to find: predicting nothing scores 1.0
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    k = np.arange(1, len(p) + 1)
    # only positions where the next score differs are reachable by a strict cut
    ok = np.r_[ps[1:] < ps[:-1], True]
    dice = np.where(ok, 2 * tp / (k + P), -1.0)
    best = int(np.argmax(dice))
    if eval_size and (1.0 - P / len(y)) ** eval_size > dice[best]:
        return CUT_MAX
    lo = ps[best + 1] if best + 1 < len(ps) else 0.0
    return float(np.clip((ps[best] + lo) / 2.0, CUT_MIN, CUT_MAX))


def tune_cuts(y_true: np.ndarray, probs: np.ndarray, eval_size: int | None = None) -> np.ndarray:
    return np.array([tune_cut(y_true[:, c], probs[:, c], eval_size) for c in range(probs.shape[1])])


class Calibration:
    """Temperature (+ optional prior adjustment) then optional per-class cut rescaling."""

    def __init__(self, temperature: float = 1.0, prior_adjustment=None, cuts=None):
        self.temperature = float(temperature)
        self.prior_adjustment = None if prior_adjustment is None else [float(v) for v in prior_adjustment]
        self.cuts = None if cuts is None else [float(v) for v in cuts]

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "prior_adjustment": self.prior_adjustment, "cuts": self.cuts}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        d = d or {}
        return cls(d.get("temperature", 1.0), d.get("prior_adjustment"), d.get("cuts"))

    def apply(self, probs: np.ndarray, rescale_cuts: bool = False) -> np.ndarray:
        out = apply_temperature(np.asarray(probs, float), self.temperature, self.prior_adjustment)
        if rescale_cuts and self.cuts is not None:
            out = globals()["rescale_cuts"](out, self.cuts)
        return out


def fit_calibration(probs: np.ndarray, y_true: np.ndarray, metric: str = "milk10k_dice",
                    eval_size: int | None = None) -> Calibration:
    """Temperature by NLL; per-class cuts (milk10k only) tuned on the temperature-scaled probabilities."""
    y_idx = y_true.argmax(1)
    T = fit_temperature(probs, y_idx)
    cuts = tune_cuts(y_true, apply_temperature(probs, T), eval_size) if metric == "milk10k_dice" else None
    return Calibration(T, None, None if cuts is None else cuts.tolist())


def nested_cut_estimate(probs: np.ndarray, y_true: np.ndarray, folds: np.ndarray,
                        eval_size: int | None = None) -> dict:
    """Honest estimate of the cut-tuned score: each fold's rows are scored with a temperature and cuts
    fitted on the *other* folds' out-of-fold rows only; binary predictions are pooled, then scored."""
    probs, y_true, folds = np.asarray(probs, float), np.asarray(y_true), np.asarray(folds)
    pred = np.zeros_like(probs, dtype=bool)
    fold_cuts = {}
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        cal = fit_calibration(probs[tr], y_true[tr], eval_size=eval_size)
        pred[te] = cal.apply(probs[te]) > np.asarray(cal.cuts)[None, :]
        fold_cuts[int(f)] = cal.cuts
    per = dice_per_class(y_true, pred)
    return {"score": float(per.mean()), "per_class": per.tolist(), "fold_cuts": fold_cuts, "pred": pred}


def bootstrap_ci(y_true: np.ndarray, pred: np.ndarray, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of the score of fixed binary predictions, resampling lesions with replacement."""
    rng = np.random.default_rng(seed)
    t = np.asarray(y_true) > 0.5
    p = np.asarray(pred).astype(bool)
    N = len(t)
    scores = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, N, N)
        scores[i] = dice_per_class(t[idx], p[idx]).mean()
    return float(np.quantile(scores, alpha / 2)), float(np.quantile(scores, 1 - alpha / 2))


def subsample_score(y_true: np.ndarray, pred: np.ndarray, size: int, n: int = 1000, seed: int = 0) -> dict:
    """Expected score (and 95% range) on a test set of `size` lesions drawn from these rows without
    replacement: the official score of a small set differs from the pooled one for very rare classes."""
    rng = np.random.default_rng(seed)
    t = np.asarray(y_true) > 0.5
    p = np.asarray(pred).astype(bool)
    scores = np.array([dice_per_class(t[idx], p[idx]).mean()
                       for idx in (rng.choice(len(t), size, replace=False) for _ in range(n))])
    return {"mean": float(scores.mean()), "lo": float(np.quantile(scores, 0.025)),
            "hi": float(np.quantile(scores, 0.975))}
