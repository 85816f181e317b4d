"""The triage policy: calibrated probabilities -> risk score, action, and whether a human must review.

Deliberately simple and configurable (service.yaml), so a clinical team can read and sign off on it:

- risk score = 100 × calibrated probability of the task's malignant classes (summed);
- urgent referral when the risk score or any listed class probability reaches its urgent cut;
  routine referral likewise; otherwise monitor;
- review recommended when the model is uncertain (normalised entropy high, top probability low)
  or an input the model uses was missing. Review never *lowers* the action.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..tasks import TaskSpec
from .config import TriageConfig, UncertaintyConfig

ACTIONS = ("monitor", "routine_referral", "urgent_referral")


@dataclass
class TriageDecision:
    risk_score: float
    action: str
    action_reasons: list[str]
    review_recommended: bool
    review_reasons: list[str]
    entropy: float
    normalized_entropy: float
    top_probability: float
    margin: float
    extra: dict = field(default_factory=dict)


def risk_score(task: TaskSpec, probs: np.ndarray) -> float:
    return float(np.clip(100.0 * float(np.sum(probs[task.malignant_indices])), 0.0, 100.0))


def uncertainty(probs: np.ndarray) -> tuple[float, float, float, float]:
    """(entropy in nats, entropy / ln C, top probability, top − second)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    p = p / p.sum()
    h = float(-(p * np.log(p)).sum())
    hn = h / np.log(len(p)) if len(p) > 1 else 0.0
    top = np.sort(p)[::-1]
    return h, float(hn), float(top[0]), float(top[0] - (top[1] if len(top) > 1 else 0.0))


def decide(task: TaskSpec, probs: np.ndarray, triage: TriageConfig, unc: UncertaintyConfig,
           missing_images: list[str] = (), missing_metadata: list[str] = ()) -> TriageDecision:
    probs = np.asarray(probs, dtype=np.float64)
    risk = risk_score(task, probs)
    by_class = dict(zip(task.classes, probs.tolist()))

    def hits(cuts: dict[str, float]) -> list[str]:
        return [f"P({c}) = {by_class[c]:.2f} ≥ {cut:.2f}" for c, cut in cuts.items() if c in by_class and by_class[c] >= cut]

    urgent = ([f"risk score {risk:.0f} ≥ {triage.urgent_risk:g}"] if risk >= triage.urgent_risk else []) \
        + hits(triage.urgent_class_probability)
    routine = ([f"risk score {risk:.0f} ≥ {triage.routine_risk:g}"] if risk >= triage.routine_risk else []) \
        + hits(triage.routine_class_probability)
    if urgent:
        action, reasons = "urgent_referral", urgent
    elif routine:
        action, reasons = "routine_referral", routine
    else:
        action, reasons = "monitor", [f"risk score {risk:.0f} < {triage.routine_risk:g} and no class above its cut"]

    h, hn, top, margin = uncertainty(probs)
    review = []
    if hn > unc.max_normalized_entropy:
        review.append(f"uncertain prediction: normalised entropy {hn:.2f} > {unc.max_normalized_entropy:.2f}")
    if top < unc.min_top_probability:
        review.append(f"uncertain prediction: top class probability {top:.2f} < {unc.min_top_probability:.2f}")
    if unc.review_on_missing_image:
        review += [f"missing input: no {m} image (the model uses one)" for m in missing_images]
    if unc.review_on_missing_metadata and missing_metadata:
        names = ", ".join(m.replace("_", " ") for m in missing_metadata)
        review.append(f"missing input: {names} not given (the model uses {'it' if len(missing_metadata) == 1 else 'them'})")
    return TriageDecision(risk, action, reasons, bool(review), review, h, hn, top, margin)


def class_name(task, c: str) -> str:
    """A clinician-readable name for class code ``c`` (the task's description, else a common name)."""
    return task.class_descriptions.get(c) or _DEFAULT_NAMES.get(c, c)


_DEFAULT_NAMES = {
    "MEL": "melanoma", "NV": "melanocytic nevus", "BCC": "basal cell carcinoma",
    "AKIEC": "actinic keratosis / intraepidermal carcinoma", "AK": "actinic keratosis",
    "BKL": "benign keratosis", "DF": "dermatofibroma", "VASC": "vascular lesion", "SCC": "squamous cell carcinoma",
    "NEV": "nevus", "SK": "seborrhoeic keratosis", "MISC": "other", "ACK": "actinic keratosis",
    "SEK": "seborrhoeic keratosis",
}
