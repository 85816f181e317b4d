"""Decision rules on calibrated posteriors: the balanced-accuracy rule and the triage operating point.

A posterior says how likely each diagnosis is; a *decision* says what to do, and depends on what an error costs.
Two rules live here, both applied to the posteriors under the training prior (``evaluation.posterior``):

- ``balanced``: divide by the training prior (raised to a strength k, default 1) and take the argmax — the rule
  that maximises balanced accuracy (every class counts equally), i.e. the challenge rule. Its scores are *not*
  probabilities of anything a clinician meets; the official-format files carry them because the challenge scores
  the argmax.
- ``triage``: an operating point — routine referral when the malignancy risk (100 × the summed posterior of the
  task's malignant classes) or a listed class's posterior reaches its cut, urgent referral likewise with higher
  cuts; otherwise monitor. ``choose_operating_point`` picks the cuts on out-of-fold posteriors for written
  targets (melanoma sensitivity, malignant sensitivity, a ceiling on the urgent rate) and
  ``operating_point_report`` states what they cost, with bootstrap intervals and a cross-validated estimate.

Under label shift (a class looks the same in every clinic, only its frequency changes) a rule that is a fixed
function of the lesion keeps its sensitivity per class; rates that mix classes (referral, urgent) follow the case
mix, so they are re-weighted to a deployment prior with ``posterior.prior_weights``.
"""
from __future__ import annotations

import numpy as np

from ..tasks import TaskSpec
from .posterior import normalise_prior

ACTIONS = ("monitor", "routine_referral", "urgent_referral")
EVIDENCE_FILE = "oof_posteriors.npz"   # in a bundle: the out-of-fold posteriors its decisions were fitted on
MONITOR, ROUTINE, URGENT = 0, 1, 2


# ---------------------------------------------------------------------------- balanced rule
def balanced_scores(posteriors, prior, strength: float = 1.0) -> np.ndarray:
    """Posteriors divided by ``prior ** strength``, renormalised: the balanced-accuracy rule's scores."""
    p = np.asarray(posteriors, dtype=np.float64)
    q = p / normalise_prior(prior)[None, :] ** float(strength)
    return q / np.clip(q.sum(1, keepdims=True), 1e-300, None)


# ---------------------------------------------------------------------------- triage operating point
def off_cut() -> float:
    """A risk cut no lesion reaches: the rule is switched off."""
    return 101.0


def risk_scores(task: TaskSpec, posteriors) -> np.ndarray:
    """100 × the summed posterior of the task's malignant classes, per lesion."""
    p = np.asarray(posteriors, dtype=np.float64)
    return np.clip(100.0 * p[:, list(task.malignant_indices)].sum(1), 0.0, 100.0)


def _class_hits(task: TaskSpec, p: np.ndarray, cuts: dict) -> np.ndarray:
    hit = np.zeros(len(p), dtype=bool)
    for c, cut in (cuts or {}).items():
        if c in task.classes:
            hit |= p[:, task.classes.index(c)] >= float(cut)
    return hit


def triage_levels(task: TaskSpec, posteriors, op: dict) -> np.ndarray:
    """0 monitor / 1 routine referral / 2 urgent referral per lesion, for an operating point ``op`` with the keys
    of the service's ``triage`` settings (``urgent_risk``, ``routine_risk`` on 0–100, ``urgent_class_probability``,
    ``routine_class_probability``: {class: cut}). A lesion at a cut counts as reaching it."""
    p = np.asarray(posteriors, dtype=np.float64)
    risk = risk_scores(task, p)
    urgent = (risk >= float(op["urgent_risk"])) | _class_hits(task, p, op.get("urgent_class_probability"))
    routine = (risk >= float(op["routine_risk"])) | _class_hits(task, p, op.get("routine_class_probability"))
    return np.where(urgent, URGENT, np.where(routine, ROUTINE, MONITOR))


def triage_rates(task: TaskSpec, y_idx, levels, weights=None) -> dict:
    """What an operating point did on labelled lesions: sensitivities, specificity, referral and urgent rates
    (weighted means when ``weights`` are given, e.g. re-weighted to a deployment prior)."""
    y = np.asarray(y_idx).astype(int)
    lv = np.asarray(levels)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    malignant = np.isin(y, list(task.malignant_indices))
    referred, urgent = lv >= ROUTINE, lv >= URGENT

    def rate(mask, event):
        ww = w[mask]
        return float((ww * event[mask]).sum() / ww.sum()) if ww.sum() > 0 else float("nan")

    everyone = np.ones(len(y), dtype=bool)
    out = {"n": int(len(y)), "referral_rate": rate(everyone, referred), "urgent_rate": rate(everyone, urgent),
           "malignant_sensitivity": rate(malignant, referred), "specificity": rate(~malignant, ~referred),
           "benign_referral_rate": rate(~malignant, referred)}
    if "MEL" in task.classes:
        mel = y == task.classes.index("MEL")
        out["melanoma_sensitivity"] = rate(mel, referred)
        out["melanoma_urgent_sensitivity"] = rate(mel, urgent)
        out["melanomas"] = int(mel.sum())
    return out


def _lowest_cut_for(scores: np.ndarray, need: int) -> float:
    """The largest cut that ``need`` of ``scores`` still reach (score ≥ cut); +inf when none is needed."""
    if need <= 0:
        return float("inf")
    s = np.sort(scores)[::-1]
    return float(s[min(need, len(s)) - 1])


def choose_operating_point(task: TaskSpec, y_idx, posteriors, *, melanoma_sensitivity: float = 0.95,
                           malignant_sensitivity: float | None = None, max_urgent_rate: float | None = 0.10,
                           weights=None, grid: int = 120) -> dict:
    """Cuts that meet the targets on labelled (out-of-fold) posteriors while referring the fewest benign lesions.

    Routine referral: risk ≥ R or P(MEL) ≥ M. For every R on a grid (quantiles of the risk, and "off"), M is the
    highest cut that still refers ``melanoma_sensitivity`` of the melanomas; R is then raised no further than
    ``malignant_sensitivity`` allows; the pair referring the smallest (weighted) share of benign lesions wins.
    Urgent referral: P(MEL) ≥ U with U the lowest cut whose urgent rate stays within ``max_urgent_rate`` (never
    below M); urgent by risk is off. A task without a MEL class uses the risk alone. Returns the operating point
    (the service's ``triage`` keys) plus ``targets``.
    """
    y = np.asarray(y_idx).astype(int)
    p = np.asarray(posteriors, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("no lesions to choose an operating point on")
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    risk = risk_scores(task, p)
    malignant = np.isin(y, list(task.malignant_indices))
    has_mel = "MEL" in task.classes
    mel_i = task.classes.index("MEL") if has_mel else None
    pm = p[:, mel_i] if has_mel else np.zeros(len(y))
    mel = (y == mel_i) if has_mel else np.zeros(len(y), dtype=bool)
    candidates = np.unique(np.r_[np.quantile(risk, np.linspace(0, 1, grid)), off_cut()])
    best = None
    for r in candidates:
        by_risk = risk >= r
        if has_mel:  # weights are per class (a prior), so a class's sensitivity is a plain count
            need = int(np.ceil(melanoma_sensitivity * mel.sum() - 1e-9)) - int((mel & by_risk).sum())
            m = _lowest_cut_for(pm[mel & ~by_risk], need)
        else:
            m = float("inf")
        referred = by_risk | (pm >= m)
        if not has_mel and malignant.any():
            sens = float((w * referred)[malignant].sum() / w[malignant].sum())
            if sens < melanoma_sensitivity:  # no melanoma class: the target applies to all malignant lesions
                continue
        if malignant_sensitivity is not None and malignant.any():
            if float((w * referred)[malignant].sum() / w[malignant].sum()) < malignant_sensitivity:
                continue
        benign = float((w * referred)[~malignant].sum() / max(w[~malignant].sum(), 1e-12))
        key = (benign, float((w * referred).sum()))
        if best is None or key < best[0]:
            best = (key, float(r), m)
    if best is None:
        raise ValueError("no operating point meets the targets on these lesions")
    _, r, m = best
    routine = {"MEL": _finite(m)} if has_mel and np.isfinite(m) else {}
    urgent: dict = {}
    if has_mel and max_urgent_rate is not None:
        order = np.sort(pm)[::-1]
        cum = np.cumsum(w[np.argsort(-pm)]) / w.sum()
        k = int(np.searchsorted(cum, max_urgent_rate, side="right"))  # lesions that fit under the ceiling
        u = float(order[k]) + 1e-9 if k < len(order) else float(order[-1])
        urgent = {"MEL": _finite(max(u, m if np.isfinite(m) else 0.0))}
    return {"routine_risk": round(min(r, off_cut()), 6), "urgent_risk": off_cut(),
            "routine_class_probability": routine, "urgent_class_probability": urgent,
            "targets": {"melanoma_sensitivity": melanoma_sensitivity, "malignant_sensitivity": malignant_sensitivity,
                        "max_urgent_rate": max_urgent_rate}}


def _finite(x: float) -> float:
    return float(min(max(x, 0.0), 1.0))


def operating_point_keys(op: dict) -> dict:
    """The four keys the service's ``triage`` settings take."""
    return {k: op[k] for k in ("urgent_risk", "routine_risk", "urgent_class_probability", "routine_class_probability")}


def operating_point_report(task: TaskSpec, y_idx, posteriors, op: dict, *, folds=None, weights=None,
                           n_boot: int = 1000, seed: int = 0, choose: dict | None = None) -> dict:
    """What ``op`` does on labelled lesions: each rate with a percentile bootstrap 95 % interval over lesions, and —
    when ``choose`` (the ``choose_operating_point`` targets) is given — the cross-validated estimate: the cuts chosen
    on the other folds (``folds``; fewer than two: 5 random ones), applied to each fold, pooled. The in-sample figures
    of cuts chosen on the same lesions are optimistic; the cross-validated ones are not (on this data)."""
    y = np.asarray(y_idx).astype(int)
    p = np.asarray(posteriors, dtype=np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    levels = triage_levels(task, p, op)
    point = triage_rates(task, y, levels, w)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        boots.append(triage_rates(task, y[i], levels[i], w[i]))
    keys = [k for k, v in point.items() if isinstance(v, float)]
    ci = {k: [float(np.nanquantile([b[k] for b in boots], q)) for q in (0.025, 0.975)] for k in keys}
    out = {"in_sample": point, "ci95": ci, "n_boot": n_boot}
    if choose is not None:
        # one fold (a train → validation run) leaves nothing to choose on: 5 random folds, as the conformal report
        given = folds is not None and len(np.unique(folds)) >= 2
        f = np.asarray(folds) if given else np.random.default_rng(seed).permutation(np.arange(len(y)) % 5)
        out["folds"] = "given" if given else "5 random folds"
        nested = np.zeros(len(y), dtype=int)
        for k in np.unique(f):
            tr, te = f != k, f == k
            try:
                op_k = choose_operating_point(task, y[tr], p[tr], weights=w[tr], **choose)
            except ValueError:  # the other folds cannot meet the targets: this fold refers everyone
                nested[te] = ROUTINE
                continue
            nested[te] = triage_levels(task, p[te], op_k)
        out["cross_validated"] = triage_rates(task, y, nested, w)
        boots = []
        for _ in range(n_boot):
            i = rng.integers(0, len(y), len(y))
            boots.append(triage_rates(task, y[i], nested[i], w[i]))
        out["cross_validated_ci95"] = {k: [float(np.nanquantile([b[k] for b in boots], q)) for q in (0.025, 0.975)]
                                       for k in keys}
    return out


# ---------------------------------------------------------------------------- the evidence kept in a bundle
def write_evidence(path, posteriors, y_idx, folds) -> None:
    """The out-of-fold posteriors (float16), labels and folds the decisions were fitted on, so a service whose
    settings override the operating point can say what the override does on them (``expected_rates``)."""
    with open(path, "wb") as fh:
        np.savez_compressed(fh, posteriors=np.asarray(posteriors, dtype=np.float16),
                            labels=np.asarray(y_idx, dtype=np.int16), folds=np.asarray(folds, dtype=np.int16))


def read_evidence(path, with_folds: bool = False) -> tuple | None:
    """(posteriors, labels[, folds]) of a bundle's evidence file; None when there is none."""
    try:
        with np.load(path) as z:
            out = (z["posteriors"].astype(np.float64), z["labels"].astype(int))
            return out + (z["folds"].astype(int),) if with_folds else out
    except (OSError, KeyError, ValueError):
        return None


def expected_rates(task: TaskSpec, evidence_path, op: dict, weights_fn=None) -> dict | None:
    """What operating point ``op`` does on a bundle's out-of-fold lesions (referral and urgent rates, sensitivities),
    optionally re-weighted (``weights_fn(labels)``, e.g. to a deployment prior); None when the bundle keeps no
    evidence. What a clinic should see live if its lesions are like the out-of-fold ones."""
    ev = read_evidence(evidence_path)
    if ev is None:
        return None
    post, y = ev
    return triage_rates(task, y, triage_levels(task, post, op), None if weights_fn is None else weights_fn(y))
