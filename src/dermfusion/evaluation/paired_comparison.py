"""The release rule of a model change, on paired cases: the new model and the one it replaces, on the same
held-out lesions.

For each lesion, is the diagnosis right (the balanced rule's class = the truth) under each model? The difference
of the two proportions, new − old, gets Newcombe's hybrid score interval for *paired* proportions (Newcombe 1998,
Stat Med 17:2635, method 10: Wilson intervals of each proportion combined with the correlation of the pairs), and
the discordant pairs McNemar's exact test (``ab_compare.mcnemar_exact``). Two written criteria:

- **non-inferiority overall**: the interval's lower bound (one-sided at (1 − confidence) / 2) is above −margin —
  the new model is not worse than the old by more than the margin;
- **superiority on a subset** (e.g. Derm7pt's ``level_of_diagnostic_difficulty = high``, the atypical lesions): the
  lower bound is above the required difference (default 0).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from .ab_compare import mcnemar_exact


def wilson_interval(k: int, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def newcombe_paired_difference(correct_new, correct_old, confidence: float = 0.95) -> dict:
    """Difference of paired proportions (new − old) with Newcombe's hybrid score interval (method 10)."""
    a_new = np.asarray(correct_new, dtype=bool)
    a_old = np.asarray(correct_old, dtype=bool)
    if a_new.shape != a_old.shape:
        raise ValueError("the two models must be judged on the same lesions")
    n = int(len(a_new))
    a = int((a_new & a_old).sum())
    b = int((a_new & ~a_old).sum())
    c = int((~a_new & a_old).sum())
    d = int((~a_new & ~a_old).sum())
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    if n == 0:
        return {"n": 0, "difference": float("nan"), "ci": [float("nan"), float("nan")]}
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / np.sqrt(denom) if denom > 0 else 0.0
    delta = np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    eps = np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    diff = p1 - p2
    return {"n": n, "new": p1, "old": p2, "difference": float(diff),
            "ci": [float(max(diff - delta, -1.0)), float(min(diff + eps, 1.0))],
            "table": {"both_right": a, "only_new_right": b, "only_old_right": c, "both_wrong": d},
            "mcnemar": mcnemar_exact(a_new, a_old)}


def change_rule(correct_new, correct_old, subset, *, margin: float, subset_min_difference: float = 0.0,
                confidence: float = 0.95, subset_name: str = "subset") -> dict:
    """Non-inferiority overall (lower bound > −margin) and superiority on ``subset`` (lower bound >
    ``subset_min_difference``), each from Newcombe's interval; returns both verdicts and the figures."""
    subset = np.asarray(subset, dtype=bool)
    overall = newcombe_paired_difference(correct_new, correct_old, confidence)
    sub = newcombe_paired_difference(np.asarray(correct_new)[subset], np.asarray(correct_old)[subset], confidence)
    ni = bool(np.isfinite(overall["ci"][0]) and overall["ci"][0] > -margin)
    sup = bool(sub["n"] > 0 and np.isfinite(sub["ci"][0]) and sub["ci"][0] > subset_min_difference)
    return {"measure": "correct diagnosis (balanced rule) per lesion, paired", "confidence": confidence,
            "noninferiority": {"margin": margin, "passed": ni, **overall},
            "superiority": {"subset": subset_name, "min_difference": subset_min_difference, "passed": sup, **sub},
            "passed": ni and sup}
