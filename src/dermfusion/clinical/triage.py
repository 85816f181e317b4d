"""The triage policy: posteriors -> risk score, action, and whether a human must review.

Deliberately simple, so a clinical team can read and sign off on it:

- risk score = 100 × the summed posterior of the task's malignant classes;
- the action follows the **operating point** (``evaluation.decision_rules.triage_levels``, the same function
  ``dermfusion gate`` and ``dermfusion operating-point`` judge): urgent referral when the risk score or a listed
  class's posterior reaches its urgent cut, routine referral likewise, otherwise monitor. The cut-offs come from the
  bundle (chosen on out-of-fold posteriors for written targets) unless the settings override them, and are applied to
  the posteriors under the *training* prior — a fixed function of the lesion, so a class's sensitivity does not move
  with a clinic's case mix;
- review recommended when the model is uncertain (normalised entropy high, top probability low) or an input the model
  uses was missing. Review never *lowers* the action;
- the "cannot assess" gate (``clinical.quality``) overrules all of it: an image that fails a quality check gets the
  action ``cannot_assess`` — "image not assessable — retake" — and no referral advice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..evaluation.decision_rules import ACTIONS as LEVEL_ACTIONS, risk_scores, triage_levels
from ..tasks import TaskSpec
from .settings import UncertaintyConfig

CANNOT_ASSESS = "cannot_assess"
ACTIONS = ("monitor", "routine_referral", "urgent_referral", CANNOT_ASSESS)
RETAKE = "image not assessable — retake"


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
    return float(risk_scores(task, np.asarray(probs, dtype=np.float64)[None])[0])


def uncertainty(probs: np.ndarray) -> tuple[float, float, float, float]:
    """(entropy in nats, entropy / ln C, top probability, top − second)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    p = p / p.sum()
    h = float(-(p * np.log(p)).sum())
    hn = h / np.log(len(p)) if len(p) > 1 else 0.0
    top = np.sort(p)[::-1]
    return h, float(hn), float(top[0]), float(top[0] - (top[1] if len(top) > 1 else 0.0))


def decide(task: TaskSpec, probs: np.ndarray, op: dict, unc: UncertaintyConfig,
           missing_images: list[str] = (), missing_metadata: list[str] = ()) -> TriageDecision:
    """The action for one lesion's posteriors (under the training prior) at operating point ``op`` (the four cut-off
    keys of ``decision_rules.triage_levels``), with the reasons a clinician reads, and the review flags."""
    probs = np.asarray(probs, dtype=np.float64)
    risk = risk_score(task, probs)
    by_class = dict(zip(task.classes, probs.tolist()))
    action = LEVEL_ACTIONS[int(triage_levels(task, probs[None], op)[0])]

    def hits(cuts: dict[str, float]) -> list[str]:
        return [f"P({c}) = {by_class[c]:.2f} ≥ {cut:.2f}" for c, cut in (cuts or {}).items()
                if c in by_class and by_class[c] >= cut]

    def risk_hit(cut: float) -> list[str]:
        return [f"risk score {risk:.0f} ≥ {cut:g}"] if risk >= cut else []

    if action == "urgent_referral":
        reasons = risk_hit(op["urgent_risk"]) + hits(op["urgent_class_probability"])
    elif action == "routine_referral":
        reasons = risk_hit(op["routine_risk"]) + hits(op["routine_class_probability"])
    else:
        reasons = [f"risk score {risk:.0f} < {op['routine_risk']:g} and no class at its referral cut"]

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


def cannot_assess(decision: TriageDecision, findings: list[tuple[str, str]]) -> TriageDecision:
    """The gate overrules the triage policy: no referral advice on an input the model cannot assess."""
    messages = [msg for _, msg in findings]
    return replace(decision, action=CANNOT_ASSESS, action_reasons=messages, review_recommended=True,
                   review_reasons=[f"{RETAKE}: {msg}" for msg in messages])


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
