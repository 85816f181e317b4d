"""Dermoscopic criteria predicted beside the diagnosis: the 7-point checklist (Argenziano 1998) as Derm7pt
publishes it, with each criterion's grouped labels, and the 7-point score computed from them.

A criterion's grouped labels follow the Derm7pt paper (Kawahara et al. 2019): pigment network absent /
typical / atypical; streaks, pigmentation, dots and globules and vascular structures absent / regular /
irregular; regression structures and blue-whitish veil absent / present. The score adds 2 points for each
*major* criterion present (atypical pigment network, blue-whitish veil, atypical — here "irregular" — vascular
pattern) and 1 for each *minor* one (irregular streaks, pigmentation or dots/globules; regression
structures); ≥ 3 is the checklist's usual melanoma cut-off.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TaskError


@dataclass(frozen=True)
class Criterion:
    name: str
    labels: tuple[str, ...]                       # grouped labels; the first is "absent"
    points: dict[str, int] = field(default_factory=dict, compare=False, hash=False)  # label -> 7-point points
    raw: dict[str, str] = field(default_factory=dict, compare=False, hash=False)     # published value -> label

    def group(self, value) -> str:
        """The grouped label of a published value ('' when unknown)."""
        v = "" if value is None else str(value).strip().lower()
        if not v or v == "nan":
            return ""
        if v in self.labels:
            return v
        if v not in self.raw:
            raise TaskError(f"criterion {self.name}: unknown value {value!r} (known: "
                            f"{', '.join(sorted(set(self.raw) | set(self.labels)))})")
        return self.raw[v]


_THREE = ("absent", "regular", "irregular")
SEVEN_POINT: tuple[Criterion, ...] = (
    Criterion("pigment_network", ("absent", "typical", "atypical"), {"atypical": 2}),
    Criterion("streaks", _THREE, {"irregular": 1}),
    Criterion("pigmentation", _THREE, {"irregular": 1},
              {"diffuse regular": "regular", "localized regular": "regular",
               "diffuse irregular": "irregular", "localized irregular": "irregular"}),
    Criterion("regression_structures", ("absent", "present"), {"present": 1},
              {"blue areas": "present", "white areas": "present", "combinations": "present"}),
    Criterion("dots_and_globules", _THREE, {"irregular": 1}),
    Criterion("blue_whitish_veil", ("absent", "present"), {"present": 2}),
    Criterion("vascular_structures", _THREE, {"irregular": 2},
              {"arborizing": "regular", "comma": "regular", "hairpin": "regular", "within regression": "regular",
               "wreath": "regular", "dotted": "irregular", "linear irregular": "irregular"}),
)

CRITERIA_SETS: dict[str, tuple[Criterion, ...]] = {"seven_point": SEVEN_POINT}


def get_criteria(name: str) -> tuple[Criterion, ...]:
    try:
        return CRITERIA_SETS[name]
    except KeyError:
        raise TaskError(f"unknown criteria set {name!r}; known: {', '.join(sorted(CRITERIA_SETS))}") from None


def criteria_column(criterion: Criterion | str) -> str:
    """The manifest column holding a criterion's grouped label."""
    return f"aux_{criterion if isinstance(criterion, str) else criterion.name}"


def seven_point_score(labels: dict[str, str], criteria: tuple[Criterion, ...] = SEVEN_POINT) -> int:
    """The 7-point checklist score of one lesion's grouped criterion labels."""
    return sum(c.points.get(labels.get(c.name, ""), 0) for c in criteria)


def label_prior(codes, weights, criteria: tuple[Criterion, ...]) -> dict[str, list[float]]:
    """Each criterion's label frequencies among the annotated lesions (``codes``: N×K label indices, −1 = not
    annotated), each lesion counted with its ``weights`` (the sampler's, so the prior is the one training saw).
    Dividing a head's probabilities by it picks labels for balanced accuracy, as the diagnosis' prior division
    does; a label never seen gets the smallest frequency of the others (no division by zero)."""
    import numpy as np  # the vocabulary layer stays import-light; only training computes priors

    codes, weights = np.asarray(codes), np.asarray(weights, float)
    out = {}
    for j, c in enumerate(criteria):
        known = codes[:, j] >= 0
        f = np.bincount(codes[known, j], weights=weights[known], minlength=len(c.labels))
        f = f / f.sum() if f.sum() > 0 else np.full(len(c.labels), 1 / len(c.labels))
        seen = f[f > 0]
        out[c.name] = np.where(f > 0, f, seen.min() if len(seen) else 1.0).tolist()
    return out
