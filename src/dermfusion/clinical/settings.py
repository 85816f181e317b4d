"""What the clinical engine can be told: triage cut-offs (or the bundle's operating point), review rules, the "cannot
assess" gate, the deployment prior, the differential's coverage, explanations and computed concept scores.

The service reads these from ``service.yaml`` (``service.config.ServiceConfig`` holds one of each), ``dermfusion
gate`` / ``explain`` / ``predict`` from the same file (``--service-config`` / ``--config``). Validated by pydantic:
unknown keys are errors, so a typo never falls back to a default silently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import read_yaml_mapping
from ..errors import DermfusionError

# the cut-offs a service used before operating points were chosen on evidence; now only the fallback for a bundle
# that carries no operating point (a warning says so)
LEGACY_TRIAGE = {"urgent_risk": 50.0, "routine_risk": 15.0,
                 "urgent_class_probability": {"MEL": 0.30, "SCCKA": 0.40, "SCC": 0.40, "MAL_OTH": 0.40},
                 "routine_class_probability": {"BCC": 0.25, "AKIEC": 0.30, "AK": 0.30}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TriageConfig(Strict):
    """The operating point: cut-offs that turn posteriors (under the training prior) into monitor / routine referral
    / urgent referral. Leave them all unset to use the bundle's operating point (``dermfusion operating-point``,
    chosen on out-of-fold posteriors for written targets); set any of them to override it — the service then prints
    what the override does on the bundle's out-of-fold lesions at start. Unset fields of an override, and every
    field for a bundle without an operating point, take the old hand-typed defaults (``LEGACY_TRIAGE``)."""

    urgent_risk: Optional[float] = Field(None, ge=0, le=101, description="urgent referral when risk score ≥ this "
                                                                         "(101 = never by risk)")
    routine_risk: Optional[float] = Field(None, ge=0, le=101, description="routine referral when risk score ≥ this")
    urgent_class_probability: Optional[dict[str, float]] = Field(
        None, description="urgent referral when a class' posterior ≥ its cut (classes not in the task are ignored)")
    routine_class_probability: Optional[dict[str, float]] = Field(
        None, description="routine referral when a class' posterior ≥ its cut")

    @field_validator("urgent_class_probability", "routine_class_probability")
    @classmethod
    def _probabilities(cls, v):
        bad = {k: p for k, p in (v or {}).items() if not 0.0 <= float(p) <= 1.0}
        if bad:
            raise ValueError(f"class probability cut-offs must lie in [0, 1]: {bad}")
        return v

    @model_validator(mode="after")
    def _ordered(self):
        if self.routine_risk is not None and self.urgent_risk is not None and self.routine_risk > self.urgent_risk:
            raise ValueError(f"routine_risk ({self.routine_risk}) must not exceed urgent_risk ({self.urgent_risk})")
        return self

    @property
    def is_override(self) -> bool:
        return any(getattr(self, k) is not None for k in LEGACY_TRIAGE)

    def cut_offs(self, fallback: dict | None = None) -> dict:
        """The four cut-offs: this config's where set, else ``fallback``'s (the bundle's operating point), else
        ``LEGACY_TRIAGE``'s."""
        base = dict(LEGACY_TRIAGE if fallback is None else {**LEGACY_TRIAGE, **fallback})
        return {k: (getattr(self, k) if getattr(self, k) is not None else base[k]) for k in LEGACY_TRIAGE}


class UncertaintyConfig(Strict):
    max_normalized_entropy: float = Field(0.70, ge=0, le=1, description="review when entropy / ln(C) exceeds this")
    min_top_probability: float = Field(0.45, ge=0, le=1, description="review when the top class is less likely than this")
    review_on_missing_image: bool = True
    review_on_missing_metadata: bool = True


class QualityConfig(Strict):
    """The "cannot assess" gate (``evaluation.quality_gate``): an image that fails a check gets the action
    ``cannot_assess`` ("image not assessable — retake") instead of a referral. Image cut-offs are on the centre
    square the model sees (≤ 224 px, CIE L*a*b*); defaults were chosen on the 5,984 HAM10000 training images and
    pass ≥ 99 % of the 1,512 ISIC 2018 test images (BENCHMARKS.md). The model check compares the top posterior with
    the served bundle's out-of-fold quantiles (``drift_reference.json``); the familiarity check compares the image's
    intermediate-layer statistics with the bundle's reference lesions (``embedding_reference.npz``,
    ``evaluation.embedding_reference``)."""

    enabled: bool = True
    min_colour_spread: float = Field(2.0, ge=0, description="blank / one colour: largest L*a*b* channel std below this")
    max_dark_fraction: float = Field(0.90, ge=0, le=1, description="too dark: share of near-black pixels (L* < 15) above this")
    max_bright_fraction: float = Field(0.60, ge=0, le=1, description="overexposed: share of clipped pixels (L* > 95) above this")
    min_sharpness: float = Field(0.6, ge=0, description="too blurred: variance of the Laplacian of L* below this")
    min_skin_fraction: float = Field(0.50, ge=0, le=1, description="not skin: share of the coloured pixels with a skin hue below this")
    model_check: bool = Field(True, description="refuse when the model's top probability is below the OOF cut")
    oof_rejection_rate: float = Field(0.0, ge=0, le=0.05, description=(
        "share of the bundle's out-of-fold lesions the model check would have refused (0 = none: the cut is the "
        "lowest top probability any of them had)"))
    min_top_probability: Optional[float] = Field(None, ge=0, le=1, description=(
        "a fixed cut instead of the bundle's out-of-fold one (needed for bundles without that reference)"))
    min_reference_lesions: int = Field(100, ge=1, description="ignore an out-of-fold reference of fewer lesions")
    familiarity_check: bool = Field(True, description=(
        "refuse an image unlike the bundle's reference lesions inside the network (embedding_reference.npz: "
        "intermediate-layer statistics; catches skin-coloured photos of other things)"))
    familiarity_margin: float = Field(1.0, gt=0, description=(
        "the cut: this × the largest cross-fitted unfamiliarity score of the reference lesions"))

    def image_cuts(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("min_colour_spread", "max_dark_fraction", "max_bright_fraction",
                                              "min_sharpness", "min_skin_fraction")}


class PriorConfig(Strict):
    """The case mix the shown posteriors assume. ``training``: the bundle's training prior (the class mix of the
    lesions its calibration was fitted on). ``deployment``: a clinic's own mix, {class: share} (normalised), applied
    by Bayes' rule. Triage and the differential are computed on posteriors under the training prior either way —
    fixed functions of the lesion, whose per-class sensitivity and coverage do not depend on the case mix."""

    deployment: Optional[dict[str, float]] = Field(None, description="{class: share}; null = the training prior")
    estimate_window: int = Field(500, ge=20, description="recent analyses whose case mix is estimated (EM) for the "
                                                         "prior-shift metric")

    @field_validator("deployment")
    @classmethod
    def _shares(cls, v):
        if v is not None:
            if any(float(x) < 0 for x in v.values()) or sum(float(x) for x in v.values()) <= 0:
                raise ValueError(f"deployment prior shares must be non-negative with a positive sum: {v}")
        return v


class DifferentialConfig(Strict):
    level: Optional[float] = Field(None, ge=0.5, lt=1.0, description="coverage of the prediction set (default: the "
                                                                      "level the bundle's conformal calibration was "
                                                                      "fitted for, 0.95)")


class ExplainConfig(Strict):
    enabled: bool = True
    max_side: int = Field(512, ge=32, description="overlay PNGs are at most this many pixels on the long side")
    alpha: float = Field(0.5, ge=0, le=1)
    colormap: str = "jet"


class ConceptScorerConfig(Strict):
    """Concept scores computed from the uploaded images when a request sends none (``dermfusion.concepts``); off
    unless ``model`` names a scorer. Only for models that use concept scores; supplied scores are always kept."""
    model: Optional[str] = Field(None, description="monet:<weights file> | open_clip:<dir> | open_clip:<arch> (with "
                                                   "weights) | dermlip:PanDerm-base-w-PubMed-256 (with weights); "
                                                   "null = off")
    weights: Optional[str] = Field(None, description="local weights: a file for open_clip:<arch>, the download "
                                                     "directory for dermlip:…")
    concept_set: str = Field("milk10k", description="milk10k | seven_point | a YAML file of prompts")
    mapping: Optional[str] = Field(None, description="monotone map onto MILK10k's scale (JSON from `dermfusion "
                                                     "concepts --fit-mapping`) for bundles that carry none; a bundle's "
                                                     "own concept_mapping.json is used first (`dermfusion bundle "
                                                     "concept-mapping`)")
    cache_dir: Optional[str] = Field(None, description="score cache by image sha256 (default: the user cache dir)")


class ClinicalSettings(Strict):
    """Everything the engine decides with (the clinical part of ``service.yaml``)."""

    triage: TriageConfig = Field(default_factory=TriageConfig)
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    differential: DifferentialConfig = Field(default_factory=DifferentialConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    concepts: ConceptScorerConfig = Field(default_factory=ConceptScorerConfig)
    backend: str = Field("auto", description="inference backend: auto (the one policy, inference.backend_policy) "
                                             "| trained | a backend name (inference.backends)")

    @classmethod
    def of(cls, config) -> "ClinicalSettings":
        """The clinical settings of a service config (or of anything with the same fields)."""
        if isinstance(config, ClinicalSettings):
            return config
        if config is None:
            return cls()
        return cls(**{k: getattr(config, k) for k in cls.model_fields if getattr(config, k, None) is not None})


class SettingsError(DermfusionError, ValueError):
    """A service.yaml whose clinical settings cannot be used; the message names the key."""


def load_clinical_settings(path=None) -> ClinicalSettings:
    """The clinical part of a ``service.yaml`` (``triage``, ``uncertainty``, ``quality``, ``prior``, ``differential``,
    ``explain``, ``concepts``, ``backend``), validated; the rest of the file (limits, auth, audit …) is the service's
    and is validated when it is served. None: the defaults."""
    if path is None:
        return ClinicalSettings()
    raw = read_yaml_mapping(Path(path), SettingsError, "service config")
    picked = {k: v for k, v in raw.items() if k in ClinicalSettings.model_fields}
    try:
        return ClinicalSettings.model_validate(picked)
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise SettingsError(f"invalid clinical settings in {path}: {why}") from None
