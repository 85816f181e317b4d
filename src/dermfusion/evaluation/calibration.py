"""Calibration fitted on out-of-fold predictions: temperature, post-hoc prior (logit) adjustment and
per-class cuts for the MILK10k score.

Why each piece exists
- Temperature: networks trained with label smoothing / mixup / focal loss are mis-calibrated; one
  scalar fitted by NLL fixes most of it without changing the argmax.
- Prior adjustment (−τ·log prior added to the logits): balanced accuracy rewards rare-class recall,
  which a model trained on the natural class mix under-predicts (Menon et al. 2021, logit adjustment).
- Cuts: the MILK10k score is a sum of per-class Dice terms at a *fixed* 0.5 threshold, so each class's
  best cut is tuned on its own and applied by *rescaling* probabilities so the tuned cut t lands on
  0.5 (p > t  <=>  rescaled > 0.5). Cuts tuned on the rows they are scored on are optimistic;
  `nested_cut_estimate` scores every fold with cuts fitted on the other folds only.

The serialised form (`Calibration.to_dict`) is the contract in docs/CONTRACTS.md: bundles store it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from ..tasks import TaskSpec
from .decision_rules import balanced_scores
from .metrics import bootstrap_ci as _bootstrap, dice_per_class, expected_calibration_error, log_loss, official_score
from .posterior import apply_bias_temperature

_EPS = 1e-12
CUT_MIN, CUT_MAX = 1e-4, 1.0 - 1e-4
# the smallest value strictly above 0.5: where a probability just above its cut must land
_ABOVE_HALF = float(np.nextafter(0.5, 1.0))
DEFAULT_GRID = np.round(np.arange(0.05, 0.9501, 0.01), 2)


# ---------------------------------------------------------------------------- transforms
def apply_temperature(probs, temperature: float = 1.0, prior_adjustment=None) -> np.ndarray:
    """softmax(log(clip(p)) / T + adj): temperature on log-probabilities (= logits up to a constant), plus an
    additive per-class term (a bias, or the older folded-in prior adjustment)."""
    return apply_bias_temperature(probs, temperature, prior_adjustment)


def rescale_cuts(probs, cuts) -> np.ndarray:
    """Per class, map cut t to 0.5 piecewise-linearly: p ≤ t → 0.5·p/t, p > t → 0.5 + 0.5·(p−t)/(1−t).

    Order within a class is preserved. A probability strictly above its cut lands strictly above 0.5
    (floored at the next float after 0.5, because 0.5 + a tiny number rounds to 0.5 and the official
    scorer's ">" would then drop it); one at or below the cut lands at or below 0.5.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.clip(np.asarray(cuts, dtype=np.float64), CUT_MIN, CUT_MAX)[None, :]
    if t.shape[1] != p.shape[1]:
        raise ValueError(f"{t.shape[1]} cuts for {p.shape[1]} classes")
    above = p > t
    low = 0.5 * p / t
    high = np.maximum(0.5 + 0.5 * (p - t) / (1.0 - t), _ABOVE_HALF)
    return np.clip(np.where(above, high, low), 0.0, 1.0)


@dataclass
class Calibration:
    """A bundle's ``calibration.json``: how raw network output becomes **posteriors** — temperature and per-class
    bias on the log-probabilities (``evaluation.posterior``), under the class ``prior`` stored beside them — and
    the **balanced rule** built on them (divide by ``prior ** prior_strength``), plus optional per-class cut
    rescaling for the multi-label MILK10k submission. The identity by default.

    ``prior_adjustment`` is the older form of the balanced rule (a logit shift folded into the calibration, bundles
    written before posteriors and decisions were kept apart): ``balanced`` still honours it, ``posterior`` ignores
    it — those bundles' posteriors are then under the prior their sampler trained with (``prior`` unknown)."""

    temperature: float = 1.0
    prior_adjustment: list[float] | None = None
    cuts: list[float] | None = None
    bias: list[float] | None = None
    prior: list[float] | None = None
    prior_strength: float = 1.0

    def __post_init__(self):
        self.temperature = float(self.temperature)
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        for name in ("prior_adjustment", "cuts", "bias", "prior"):
            v = getattr(self, name)
            setattr(self, name, None if v is None else [float(x) for x in v])
        self.prior_strength = float(self.prior_strength)

    def to_dict(self) -> dict:
        d = {"temperature": self.temperature, "prior_adjustment": self.prior_adjustment, "cuts": self.cuts}
        if self.bias is not None or self.prior is not None:
            d.update(bias=self.bias, prior=self.prior, prior_strength=self.prior_strength)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        """Read a bundle's calibration.json; None / {} is the identity, unknown keys are ignored."""
        d = d or {}
        return cls(d.get("temperature", 1.0) or 1.0, d.get("prior_adjustment"), d.get("cuts"), d.get("bias"),
                   d.get("prior"), d.get("prior_strength", 1.0) if d.get("prior_strength") is not None else 1.0)

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.prior_adjustment is None and self.cuts is None and self.bias is None \
            and (self.prior is None or self.prior_strength == 0)

    def _check(self, C: int) -> None:
        for name in ("prior_adjustment", "cuts", "bias", "prior"):
            v = getattr(self, name)
            if v is not None and len(v) != C:
                raise ValueError(f"calibration has {len(v)} {name} values for {C} classes")

    def posterior(self, probs) -> np.ndarray:
        """N×C posteriors under ``prior`` (rows sum to 1): softmax(log p / T + bias)."""
        probs = np.asarray(probs, float)
        self._check(probs.shape[1])
        return apply_temperature(probs, self.temperature, self.bias)

    def balanced(self, probs) -> np.ndarray:
        """N×C scores of the balanced-accuracy rule (rows sum to 1): posteriors divided by ``prior ** strength``
        (or, for an older bundle, its folded-in ``prior_adjustment``). Decision scores, not probabilities."""
        probs = np.asarray(probs, float)
        self._check(probs.shape[1])
        if self.prior is not None:
            return balanced_scores(self.posterior(probs), self.prior, self.prior_strength)
        adj = self.prior_adjustment if self.bias is None else (
            None if self.prior_adjustment is None else (np.asarray(self.prior_adjustment) + np.asarray(self.bias)))
        return apply_temperature(probs, self.temperature, adj if adj is not None else self.bias)

    def apply(self, probs, rescale_cuts: bool = False) -> np.ndarray:
        """The balanced rule's scores (``balanced``); with ``rescale_cuts`` the submission scores, whose rows no
        longer sum to 1 but whose > 0.5 decisions equal score > cut."""
        out = self.balanced(probs)
        if rescale_cuts and self.cuts is not None:
            out = _rescale(out, self.cuts)
        return out


_rescale = rescale_cuts  # Calibration.apply's argument shadows the function's name


# ---------------------------------------------------------------------------- fitting
def fit_temperature(y_true, probs, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature minimising the NLL of the true class (bounded search over log T)."""
    probs = np.asarray(probs, float)
    res = minimize_scalar(lambda lt: log_loss(y_true, apply_temperature(probs, float(np.exp(lt)))),
                          bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def fit_prior_adjustment(class_priors, tau: float = 1.0) -> list[float]:
    """Post-hoc logit adjustment −τ·log(prior), added to the log-probabilities (favours rare classes)."""
    return (-float(tau) * np.log(np.clip(np.asarray(class_priors, float), 1e-12, None))).tolist()


def training_prior(class_counts, sampler_power: float) -> np.ndarray:
    """The class prior a model sees when lesions are drawn with weight count(class)^-power:
    ∝ count^(1 − power) (0 = natural frequencies, 0.5 = square root, 1 = uniform)."""
    counts = np.clip(np.asarray(class_counts, float), 1e-12, None)
    prior = counts ** (1.0 - float(sampler_power))
    return prior / prior.sum()


def score_with_cuts(y_true, probs, cuts) -> tuple[float, np.ndarray]:
    """(MILK10k score, per-class Dice) when class c is predicted iff p_c > cuts[c]."""
    per = dice_per_class(y_true, np.asarray(probs) > np.asarray(cuts)[None, :])
    return float(per.mean()), per


def _plateau_middle(scores: np.ndarray) -> int:
    """Index in the middle of the first run of maximal scores: a cut far from both edges of the
    optimum generalises better than its first point."""
    start = int(np.argmax(scores))
    end = start
    while end + 1 < len(scores) and scores[end + 1] == scores[start]:
        end += 1
    return (start + end) // 2


def tune_cut(y, p, eval_size: int | None = None, grid=None) -> float:
    """Cut t maximising the Dice of (p > t) for one class.

    Exact by default: every distinct score is a candidate and the cut is the midpoint between it and
    the next lower score. With ``grid`` only those cuts are tried (ties → middle of the best plateau).
    A class without positives gets CUT_MAX: predicting nothing scores 1.0.
    eval_size: size of the set the submission will be scored on. A class with no positive there scores
    1.0 only if nothing is predicted, which happens with probability ~(1 − prevalence)^eval_size; for a
    class so rare that this beats the best Dice reachable on these rows, predict nothing (CUT_MAX).
    """
    y = np.asarray(y) > 0.5
    p = np.asarray(p, float)
    P = int(y.sum())
    if P == 0:
        return CUT_MAX
    if grid is not None:
        g = np.asarray(grid, float)
        pred = p[:, None] > g[None, :]
        tp = (pred & y[:, None]).sum(0)
        dice = 2 * tp / (pred.sum(0) + P)
        j = _plateau_middle(dice)
        best_dice, cut = float(dice[j]), float(g[j])
    else:
        order = np.argsort(-p, kind="mergesort")
        ps, ys = p[order], y[order]
        tp = np.cumsum(ys)
        k = np.arange(1, len(p) + 1)
        ok = np.r_[ps[1:] < ps[:-1], True]  # only the last of tied scores is reachable by a strict cut
        dice = np.where(ok, 2 * tp / (k + P), -1.0)
        best = int(np.argmax(dice))
        lo = ps[best + 1] if best + 1 < len(ps) else 0.0
        best_dice, cut = float(dice[best]), float((ps[best] + lo) / 2.0)
    if eval_size and (1.0 - P / len(y)) ** eval_size > best_dice:
        return CUT_MAX
    return float(np.clip(cut, CUT_MIN, CUT_MAX))


def tune_cuts(y_true, probs, metric: str = "milk10k_dice", *, eval_size: int | None = None, grid=None) -> np.ndarray:
    """Per-class cuts maximising per-class Dice. The MILK10k score is a sum of per-class terms, so
    tuning each class on its own is exact (coordinate-wise = joint)."""
    if metric != "milk10k_dice":
        raise ValueError(f"cuts are only defined for the milk10k_dice metric, not {metric!r}")
    y_true, probs = np.asarray(y_true), np.asarray(probs, float)
    return np.array([tune_cut(y_true[:, c], probs[:, c], eval_size, grid) for c in range(probs.shape[1])])


def _valid_folds(folds, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The given folds when there are at least 2, else 5 random folds (said so in the report)."""
    if folds is not None:
        f = np.asarray(folds)
        if len(f) != n:
            raise ValueError(f"folds has {len(f)} entries for {n} rows")
        if len(np.unique(f[f >= 0])) >= 2 and (f >= 0).all():
            return f, "given"
    return np.random.default_rng(seed).permutation(np.arange(n) % 5), "random 5-fold (no usable folds given)"


def nested_cut_estimate(probs, y_true, folds, eval_size: int | None = None, *, temperature: bool = True,
                        grid=None) -> dict:
    """Honest estimate of the cut-tuned MILK10k score.

    For each outer fold, temperature (if asked) and cuts are fitted on the *other* folds only and applied
    to that fold; the pooled binary predictions are scored once. Returns ``score``, ``per_class``,
    ``fold_cuts`` / ``fold_temperatures`` (keyed by fold), ``cuts`` fitted on all rows, the optimistic
    ``in_sample_score`` of those cuts, and ``pred`` (N×C bool, for bootstrapping; not JSON).
    """
    probs, y_true = np.asarray(probs, float), np.asarray(y_true, float)
    folds, _ = _valid_folds(folds, len(probs))
    pred = np.zeros(probs.shape, dtype=bool)
    fold_cuts, fold_T = {}, {}
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        T = fit_temperature(y_true[tr], probs[tr]) if temperature else 1.0
        cuts = tune_cuts(y_true[tr], apply_temperature(probs[tr], T), eval_size=eval_size, grid=grid)
        pred[te] = apply_temperature(probs[te], T) > cuts[None, :]
        fold_cuts[str(f)], fold_T[str(f)] = cuts.tolist(), T
    per = dice_per_class(y_true, pred)
    T_all = fit_temperature(y_true, probs) if temperature else 1.0
    cuts_all = tune_cuts(y_true, apply_temperature(probs, T_all), eval_size=eval_size, grid=grid)
    return {"score": float(per.mean()), "per_class": per.tolist(), "fold_cuts": fold_cuts,
            "fold_temperatures": fold_T, "cuts": cuts_all.tolist(), "temperature": T_all,
            "in_sample_score": score_with_cuts(y_true, apply_temperature(probs, T_all), cuts_all)[0],
            "pred": pred}


def calibrate_oof(task: TaskSpec, y_true, probs, folds=None, *, temperature: bool = True,
                  cuts: bool | None = None, logit_adjust: bool | float = False,
                  eval_size: int | None = None) -> tuple[Calibration, dict]:
    """Calibration for a run, fitted on its out-of-fold predictions, plus a JSON-ready report.

    cuts default to the task's metric (MILK10k: yes). logit_adjust: True (τ = 1) or a τ adds the
    prior adjustment −τ·log(training prior). The report puts the nested (honest) estimate of the
    cut-tuned official score next to the untuned one and the optimistic in-sample one.
    """
    y_true, probs = np.asarray(y_true, float), np.asarray(probs, float)
    if y_true.ndim == 1:
        y_true = np.eye(probs.shape[1])[y_true.astype(int)]
    if probs.shape != y_true.shape or probs.shape[1] != task.num_classes:
        raise ValueError(f"probs {probs.shape} / y_true {y_true.shape} do not match task {task.name!r} "
                         f"({task.num_classes} classes)")
    cuts = (task.metric == "milk10k_dice") if cuts is None else bool(cuts)
    T = fit_temperature(y_true, probs) if temperature else 1.0
    adj = None
    if logit_adjust is not False and logit_adjust is not None:
        tau = 1.0 if logit_adjust is True else float(logit_adjust)
        adj = fit_prior_adjustment(y_true.mean(0), tau)
    cal = Calibration(T, adj)
    after = cal.apply(probs)
    report: dict = {"n": int(len(probs)), "temperature": T, "prior_adjustment": adj,
                    "nll_before": log_loss(y_true, probs), "nll_after": log_loss(y_true, after),
                    "ece_before": expected_calibration_error(y_true, probs),
                    "ece_after": expected_calibration_error(y_true, after),
                    "official_before": official_score(task, y_true, probs),
                    "official_after": official_score(task, y_true, after)}
    if cuts:
        f, how = _valid_folds(folds, len(probs))
        cal.cuts = tune_cuts(y_true, after, eval_size=eval_size).tolist()
        nested = nested_cut_estimate(probs, y_true, f, eval_size=eval_size, temperature=temperature)
        report["cuts"] = {
            "folds": how,
            "official_untuned": float(dice_per_class(y_true, after > 0.5).mean()),
            "nested_score": nested["score"], "nested_per_class": dict(zip(task.classes, nested["per_class"])),
            "in_sample_score": score_with_cuts(y_true, after, cal.cuts)[0],
            "fold_cuts": nested["fold_cuts"], "cuts": dict(zip(task.classes, cal.cuts))}
        # flat aliases kept for callers written against the earlier stand-in
        report.update(official_untuned=report["cuts"]["official_untuned"], nested_cut_score=nested["score"],
                      nested_per_class=nested["per_class"], in_sample_cut_score=report["cuts"]["in_sample_score"])
    return cal, report


def fit_calibration(*args, **kwargs):
    """Two call forms, one job.

    ``fit_calibration(task, y_true, oof_probs, folds, temperature=True, cuts=None, logit_adjust=False)``
    → (Calibration, report): the run-level fit, same as `calibrate_oof`.
    ``fit_calibration(probs, y_true, metric="milk10k_dice", eval_size=None)`` → Calibration: temperature
    by NLL and, for the MILK10k metric, cuts tuned on the temperature-scaled probabilities (the form the
    tabular stage uses).
    """
    if (args and isinstance(args[0], TaskSpec)) or isinstance(kwargs.get("task"), TaskSpec):
        return calibrate_oof(*args, **kwargs)
    return _fit_arrays(*args, **kwargs)


def _fit_arrays(probs, y_true, metric: str = "milk10k_dice", eval_size: int | None = None) -> Calibration:
    probs, y_true = np.asarray(probs, float), np.asarray(y_true, float)
    T = fit_temperature(y_true, probs)
    cuts = tune_cuts(y_true, apply_temperature(probs, T), eval_size=eval_size) if metric == "milk10k_dice" else None
    return Calibration(T, None, None if cuts is None else cuts.tolist())


# ---------------------------------------------------------------------------- uncertainty of the tuned score
def bootstrap_ci(y_true, pred, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of the MILK10k score of fixed binary predictions (e.g. ``nested['pred']``)."""
    return _bootstrap(lambda t, p: float(dice_per_class(t, p > 0.5).mean()), y_true, np.asarray(pred, float),
                      n=n, seed=seed, alpha=alpha)


def subsample_score(y_true, pred, size: int, n: int = 1000, seed: int = 0) -> dict:
    """Expected score (and 95% range) on a test set of `size` lesions drawn from these rows without
    replacement: the official score of a small set differs from the pooled one for very rare classes."""
    rng = np.random.default_rng(seed)
    t = np.asarray(y_true) > 0.5
    p = np.asarray(pred).astype(bool)
    scores = np.array([dice_per_class(t[idx], p[idx]).mean()
                       for idx in (rng.choice(len(t), size, replace=False) for _ in range(n))])
    return {"mean": float(scores.mean()), "lo": float(np.quantile(scores, 0.025)),
            "hi": float(np.quantile(scores, 0.975))}
