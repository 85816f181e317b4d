"""The engine's side of the "cannot assess" gate: the ``quality`` settings' cut-offs on the image checks, the model
check's cut from the served bundle's out-of-fold reference (``drift_reference.json``: ``quality_gate``) unless the
settings fix one, and the familiarity check against the bundle's reference lesions (``embedding_reference.npz``).
The measures and rules themselves are pure numbers in ``evaluation.quality_gate`` / ``evaluation.embedding_reference``."""
from __future__ import annotations

from ..evaluation.embedding_reference import score_threshold, unfamiliarity
from ..evaluation.quality_gate import (REASONS, confidence_threshold, familiarity_findings, image_findings,
                                       image_measures, model_findings)
from .settings import QualityConfig


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
