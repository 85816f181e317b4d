"""The triage policy: calibrated probabilities -> risk score, action, and whether a human must review.

Deliberately simple and configurable (service.yaml), so a clinical team can read and sign off on it:

- risk score = 100 × calibrated probability of the task's malignant classes (summed);
- urgent referral when the risk score or any listed class probability reaches its urgent cut;
  routine referral likewise; otherwise monitor;
- review recommended when the model is uncertain (normalised entropy high, top probability low)
  or an input the model uses was missing. Review never *lowers* the action;
- the "cannot assess" gate overrules all of it: an image that fails a quality check (blank, badly exposed,
  blurred, not skin) or a model answer less confident than the training lesions' (``QualityGate``) gets the
  action ``cannot_assess`` — "image not assessable — retake" — and no referral advice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..evaluation.embedding_reference import score_threshold, unfamiliarity
from ..evaluation.quality_gate import (REASONS, confidence_threshold, familiarity_findings, image_findings,
                                       image_measures, model_findings)
from ..tasks import TaskSpec
from .config import QualityConfig, TriageConfig, UncertaintyConfig

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


class QualityGate:
    """The service's side of the "cannot assess" gate: the ``quality`` settings' cut-offs, and the model check's
    cut from the served bundle's out-of-fold reference (``drift_reference.json``: ``quality_gate``) unless the
    settings fix one."""

    def __init__(self, config: QualityConfig, reference: dict | None = None, familiarity: dict | None = None):
        self.config = config
        self.familiarity, self.max_unfamiliarity = None, None
        if config.familiarity_check and familiarity is not None:
            self.familiarity = familiarity
            self.max_unfamiliarity = score_threshold(familiarity, config.familiarity_margin)
        ref = (reference or {}).get("quality_gate")
        self.min_top_probability, self.source = None, "off (quality.model_check: false)"
        if not config.model_check:
            return
        if config.min_top_probability is not None:
            self.min_top_probability, self.source = config.min_top_probability, "service config"
            return
        self.min_top_probability = confidence_threshold(ref, config.oof_rejection_rate, config.min_reference_lesions)
        self.source = (f"bundle out-of-fold reference ({ref['n']} lesions, rate {config.oof_rejection_rate:g})"
                       if self.min_top_probability is not None else
                       "off: the bundle has no out-of-fold reference of at least "
                       f"{config.min_reference_lesions} lesions (set quality.min_top_probability)")

    def check_images(self, images: dict) -> tuple[list[tuple[str, str]], dict[str, dict[str, float]]]:
        """(findings, measures per image type) for the images the model analyses."""
        if not self.config.enabled or not images:
            return [], {}
        measures = {m: image_measures(img) for m, img in images.items()}
        cuts = self.config.image_cuts()
        return [(code, f"{m} image: {msg}") for m, ms in measures.items()
                for code, msg in image_findings(ms, **cuts)], measures

    def check_model(self, probs) -> list[tuple[str, str]]:
        return model_findings(probs, self.min_top_probability) if self.config.enabled else []

    @property
    def familiarity_modality(self) -> str | None:
        """The image whose layer statistics the familiarity check needs (None: the check is off)."""
        return self.familiarity.get("modality") or None if self.familiarity and self.config.enabled else None

    def unfamiliarity(self, stats) -> float | None:
        return None if stats is None or self.familiarity is None else float(unfamiliarity(self.familiarity,
                                                                                          stats)[0])

    def check_familiarity(self, score: float | None) -> list[tuple[str, str]]:
        return familiarity_findings(score, self.max_unfamiliarity) if self.config.enabled else []

    def describe(self) -> dict:
        fam = self.familiarity
        return {**self.config.model_dump(), "min_top_probability": self.min_top_probability,
                "min_top_probability_source": self.source, "max_unfamiliarity": self.max_unfamiliarity,
                "familiarity_reference": (f"{fam['n']} lesions ({fam['source']})" if fam else
                                          "none: the bundle has no embedding_reference.npz (dermfusion bundle "
                                          "reference adds one)" if self.config.familiarity_check else "off"),
                "reasons": dict(REASONS)}


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
