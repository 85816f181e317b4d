"""Clinical performance from confirmed diagnoses, and the A/B comparison of two model versions on the same cases.

Inputs are plain arrays (the service joins its audit trail with clinicians' confirmed diagnoses and hands them
here): per version the calibrated probabilities and whether the triage referred the lesion, per case the
confirmed class. ``version_performance`` gives n, per-class sensitivity (argmax), melanoma sensitivity (share of
confirmed melanomas *referred*: urgent or routine — the release gate's operating point; a ``cannot_assess`` answer
is not a referral), accuracy and one-vs-rest AUROC where a class has both positives and negatives.
``mcnemar_exact`` compares paired correctness: only the discordant pairs (one version right, the other wrong)
carry information; under "no difference" each falls either way with probability 1/2, so the two-sided p-value is
an exact binomial tail. ``sample_size_note`` spells out what the comparison can and cannot show yet.
"""
from __future__ import annotations

import math

import numpy as np

from ..tasks import TaskSpec
from .metrics import auroc_per_class, predicted_class

MELANOMA = "MEL"


def version_performance(task: TaskSpec, truth: list[str], probs: np.ndarray, referred: np.ndarray) -> dict:
    """Performance of one version on its confirmed cases: ``truth`` class codes, ``probs`` N×C (task order),
    ``referred`` bool N."""
    classes = list(task.classes)
    n = len(truth)
    out: dict = {"n": n, "per_class": {}, "melanoma_sensitivity": None, "accuracy": None, "auroc": {},
                 "auroc_macro": None}
    if n == 0:
        return out
    y = np.array([classes.index(t) for t in truth])
    pred = predicted_class(probs)
    correct = pred == y
    out["accuracy"] = float(correct.mean())
    for i, c in enumerate(classes):
        k = int((y == i).sum())
        out["per_class"][c] = {"n": k, "sensitivity": float(correct[y == i].mean()) if k else None}
    if MELANOMA in classes:
        mel = y == classes.index(MELANOMA)
        out["melanoma_sensitivity"] = float(np.asarray(referred)[mel].mean()) if mel.any() else None
        out["melanoma_n"] = int(mel.sum())
    auc = auroc_per_class(y, probs)
    out["auroc"] = {c: (None if math.isnan(a) else float(a)) for c, a in zip(classes, auc)}
    finite = [a for a in auc if not math.isnan(a)]
    out["auroc_macro"] = float(np.mean(finite)) if finite else None
    return out


def correct_of(task: TaskSpec, truth: list[str], probs: np.ndarray) -> np.ndarray:
    classes = list(task.classes)
    return predicted_class(probs) == np.array([classes.index(t) for t in truth])


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials at p = 1/2 (twice the smaller tail, at most 1)."""
    if n == 0:
        return 1.0
    try:
        from scipy.stats import binomtest  # scipy is a dependency of the metrics; the fallback is exact too
        return float(binomtest(k, n, 0.5).pvalue)
    except ImportError:
        tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
        return min(1.0, 2 * tail)


def mcnemar_exact(correct_a, correct_b) -> dict:
    """McNemar's exact test on paired correctness: b = A right & B wrong, c = A wrong & B right."""
    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    return {"n_pairs": int(len(a)), "a_right_b_wrong": b, "a_wrong_b_right": c, "discordant": b + c,
            "p_value": binomial_two_sided(min(b, c), b + c),
            "accuracy_a": float(a.mean()) if len(a) else None, "accuracy_b": float(b_.mean()) if len(a) else None}


def min_discordant_for(alpha: float = 0.05) -> int:
    """The fewest discordant pairs with which the exact test can reach p < alpha at all (all favouring one side)."""
    n = 1
    while 2 * 0.5 ** n >= alpha:
        n += 1
    return n


def pairs_needed(delta: float, discordance: float, alpha: float = 0.05, power: float = 0.80) -> int | None:
    """Paired cases needed to detect an accuracy difference ``delta`` with McNemar's test (Connor 1987):
    n = (z_{α/2}·√ψ + z_β·√(ψ − δ²))² / δ², ψ the share of discordant pairs (must exceed δ)."""
    from statistics import NormalDist

    if discordance <= delta or delta <= 0:
        return None
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    return math.ceil((za * math.sqrt(discordance) + zb * math.sqrt(discordance - delta ** 2)) ** 2 / delta ** 2)


def sample_size_note(test: dict, delta: float = 0.05, alpha: float = 0.05, power: float = 0.80,
                     assumed_discordance: float = 0.10) -> str:
    """One paragraph saying how much the comparison can show with the pairs collected so far."""
    n, d = test["n_pairs"], test["discordant"]
    psi = d / n if n and d else assumed_discordance
    where = "observed" if n and d else "assumed (none observed yet)"
    need = pairs_needed(delta, max(psi, delta + 0.01), alpha, power)
    text = (f"{n} paired confirmed case(s), {d} discordant (one version right, the other wrong); only discordant "
            f"pairs carry evidence. The exact test cannot reach p < {alpha:g} with fewer than "
            f"{min_discordant_for(alpha)} discordant pairs, even if all favour one version. To detect a "
            f"{100 * delta:.0f}-point difference in accuracy with {100 * power:.0f} % power at α = {alpha:g}, given the "
            f"{where} discordance rate of {100 * psi:.1f} %, about {need} paired confirmed cases "
            f"(≈ {math.ceil(need * psi)} discordant pairs) are needed")
    if n < need:
        return text + f" — {need - n} more than collected: a non-significant result here is not evidence of " \
                      "equivalence."
    return text + "."
