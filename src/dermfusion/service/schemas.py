"""The API contract: pydantic models for the metadata a client sends and every response it gets.

FastAPI publishes them as the OpenAPI schema (``/openapi.json``, docs at ``/docs``).
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..data.features import AGE_RANGE, MISSING_TOKENS, SITE_ALIASES, SITES, canonical_site
from ..evaluation.quality_gate import REASONS
from ..tasks import MODALITIES

Action = Literal["monitor", "routine_referral", "urgent_referral", "cannot_assess"]


# the MONET concepts of MILK10k (``MONET_<name>`` columns): with the served model's own concept names, the only
# concept names a request may carry, so no free text reaches the audit trail through them
MONET_CONCEPTS = ("ulceration_crust", "hair", "vasculature_vessels", "vessels", "erythema", "pigmented",
                  "gel_water_drop_fluid_dermoscopy_liquid", "skin_markings_pen_ink_purple_pen")


def known_concepts(model_concepts=()) -> frozenset[str]:
    """Concept names a request may send: the MONET set and those of the model's ``concept_<modality>_<name>``
    columns — the enumeration ``PatientMetadata`` checks names against (validation context ``concepts``)."""
    names = set(MONET_CONCEPTS)
    for col in model_concepts:
        for m in MODALITIES:
            if col.startswith(f"concept_{m}_"):
                names.add(col[len(f"concept_{m}_"):])
    return frozenset(names)


class _Model(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# ------------------------------------------------------------------------------------------------ input
class PatientMetadata(_Model):
    """Everything optional; unknown keys are refused (so no free text can slip in and be stored)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    age: Optional[float] = Field(None, ge=AGE_RANGE[0], le=AGE_RANGE[1], description="years, 0–120")
    sex: Optional[Literal["female", "male"]] = Field(None, description="female | male (m/f accepted)")
    skin_tone: Optional[int] = Field(None, ge=0, le=5, description="skin tone class 0–5 (as in MILK10k)")
    site: Optional[str] = Field(None, description="anatomical site: " + ", ".join(SITES)
                                + " (common synonyms such as 'back' or 'face' are mapped)")
    elevation: Optional[Literal["flat", "palpable", "nodular"]] = Field(
        None, description="the lesion's elevation: flat | palpable | nodular (read by e.g. derm7pt_recommended)")
    concepts: Optional[dict[str, dict[str, float]]] = Field(
        None, description='MONET concept scores in [0, 1] per image, e.g. {"dermoscopic": {"pigmented": 0.8}}')

    @field_validator("sex", mode="before")
    @classmethod
    def _sex(cls, v):
        if v is None:
            return None
        if not isinstance(v, str):
            raise ValueError("sex must be a string: female or male")
        s = v.strip().lower()
        if s in MISSING_TOKENS:
            return None
        return {"f": "female", "m": "male"}.get(s, s)

    @field_validator("elevation", mode="before")
    @classmethod
    def _elevation(cls, v):  # " Nodular " -> nodular, "n/a" -> unknown; anything else is refused by the Literal
        s = v.strip().lower() if isinstance(v, str) else v
        return None if isinstance(s, str) and s in MISSING_TOKENS else s

    @field_validator("skin_tone", mode="before")
    @classmethod
    def _skin_tone(cls, v):
        if isinstance(v, str) and v.strip().lower() in MISSING_TOKENS:
            return None
        if isinstance(v, bool):
            raise ValueError("skin_tone must be an integer 0–5")
        return v

    @field_validator("age", mode="before")
    @classmethod
    def _age(cls, v):
        if isinstance(v, str) and v.strip().lower() in MISSING_TOKENS:
            return None
        if isinstance(v, bool):
            raise ValueError("age must be a number of years")
        return v

    @field_validator("site", mode="before")
    @classmethod
    def _site(cls, v):
        if v is None:
            return None
        if not isinstance(v, str):
            raise ValueError("site must be a string")
        if v.strip().lower() in MISSING_TOKENS:
            return None
        site = canonical_site(v)
        if not site:
            raise ValueError(f"unknown site; use one of: {', '.join(SITES)}")  # the input is never echoed
        return site

    @field_validator("concepts")
    @classmethod
    def _concepts(cls, v, info: ValidationInfo):
        if v is None:
            return None
        known = (info.context or {}).get("concepts")  # the service passes known_concepts(model's)
        out = {}
        for modality, scores in v.items():
            if modality not in MODALITIES:
                raise ValueError(f"concept scores are keyed by image type ({', '.join(MODALITIES)})")
            clean = {}
            for name, score in scores.items():
                key = name.strip().lower().removeprefix("monet_").replace(" ", "_").replace("-", "_")
                if not key or not all(ch.isalnum() or ch == "_" for ch in key) or len(key) > 64:
                    raise ValueError(f"invalid concept name in {modality} (letters, digits and _ only)")
                if known is not None and key not in known:
                    raise ValueError(f"unknown concept name in {modality}; known: {', '.join(sorted(known))}")
                if not 0.0 <= score <= 1.0:
                    raise ValueError(f"concept score {modality}.{key} is outside [0, 1]")
                clean[key] = float(score)
            out[modality] = clean
        return out

    def manifest_fields(self) -> dict:
        """Manifest-style fields for a ``clinical.Lesion``'s metadata (missing ones left out = unknown)."""
        d: dict = {}
        if self.age is not None:
            d["age"] = float(self.age)
        if self.sex is not None:
            d["sex"] = self.sex
        if self.skin_tone is not None:
            d["skin_tone"] = str(int(self.skin_tone))
        if self.site is not None:
            d["site"] = self.site
        if self.elevation is not None:
            d["elevation"] = self.elevation
        for m, scores in (self.concepts or {}).items():
            for name, s in scores.items():
                d[f"concept_{m}_{name}"] = s
        return d


# ----------------------------------------------------------------------------------------------- output
class ErrorBody(_Model):
    code: str = Field(..., description="machine-readable, e.g. invalid_image, payload_too_large")
    message: str = Field(..., description="what is wrong and how to fix it")
    field: Optional[str] = Field(None, description="the offending input, when there is one")
    details: Optional[list[dict]] = None


class ErrorResponse(_Model):
    error: ErrorBody
    request_id: Optional[str] = None


class ClassProbability(_Model):
    code: str = Field(..., description="class code from the task, e.g. MEL")
    name: str = Field(..., description="human-readable class name")
    probability: float = Field(..., ge=0, le=1, description="posterior probability under the stated prior (see "
                                                            "`prior`)")
    malignant: bool
    in_prediction_set: Optional[bool] = Field(None, description="whether the class is in the conformal prediction "
                                                                "set (None: the bundle has no conformal calibration)")


class PredictionSet(_Model):
    level: float = Field(..., description="the coverage the set is calibrated for, e.g. 0.95")
    classes: list[str] = Field(..., description="class codes in the set, most probable first")
    names: list[str]
    text: str = Field(..., description="e.g. 'with 95% confidence: MEL, NV or BKL'")
    method: Optional[str] = None
    melanoma_in_set: Optional[bool] = Field(None, description="whether melanoma cannot be ruled out at this level")


class PriorInfo(_Model):
    name: Literal["training", "deployment", "unknown"] = Field(..., description="the case mix the posteriors assume")
    source: str
    values: Optional[dict[str, float]] = None


class OperatingPointInfo(_Model):
    source: str = Field(..., description="bundle (chosen on out-of-fold posteriors) | service config (override) | "
                                         "built-in defaults (not chosen on evidence)")
    urgent_risk: float
    routine_risk: float
    urgent_class_probability: dict[str, float]
    routine_class_probability: dict[str, float]
    applied_to: str
    targets: Optional[dict] = None
    out_of_fold: Optional[dict] = Field(None, description="what it did where it was chosen (cross-validated)")
    evidence: Optional[str] = Field(None, description="where it was chosen: out_of_fold | local_sample (a clinic's "
                                                      "labelled lesions, `operating-point --local`)")


class ModelRef(_Model):
    name: str
    version: str
    hash: str = Field(..., description="content hash of the served bundle (a run: its first fold's)")
    task: str
    kind: str
    members: list[dict] = Field(default_factory=list, description=(
        "every bundle whose output goes into the answer (each fold of a run, each ensemble member): name, "
        "version, hash — recorded in every audit row"))
    registry_version: Optional[str] = Field(None, description="the model registry's version that answered (null "
                                                              "when served without a registry)")
    role: Optional[str] = Field(None, description="promoted | canary (null without a registry)")


class Uncertainty(_Model):
    normalized_entropy: float = Field(..., description="entropy / ln(number of classes), 0 = certain, 1 = uniform")
    top_probability: float
    margin: float = Field(..., description="top − second probability")


class QualityReason(_Model):
    code: Literal[tuple(REASONS)]  # type: ignore[valid-type]  # blank, underexposed, …, model_unsure
    message: str = Field(..., description="e.g. 'dermoscopic image: image too blurred (sharpness 0.4 < 2)'")


class QualityReport(_Model):
    assessable: bool = Field(..., description="false → action is cannot_assess: image not assessable, retake it")
    reasons: list[QualityReason] = Field(default_factory=list)
    measures: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per image type: colour_spread, dark_fraction, bright_fraction, "
                                          "sharpness, skin_fraction (evaluation.quality_gate)")
    min_top_probability: Optional[float] = Field(None, description="the model check's cut (None: check off)")
    unfamiliarity: Optional[float] = Field(None, description=(
        "how unlike the bundle's reference lesions the image is inside the network (≈ 1 typical; None: not "
        "checked — no reference, or an image check already refused it)"))
    max_unfamiliarity: Optional[float] = Field(None, description="the familiarity check's cut (None: check off)")


class InputSummary(_Model):
    modalities_received: list[str]
    modalities_used: list[str]
    modalities_missing: list[str] = Field(..., description="image types the model uses that were not uploaded")
    metadata_used: dict = Field(default_factory=dict, description="validated metadata the model saw")
    metadata_missing: list[str] = Field(default_factory=list)
    image_sha256: dict[str, str] = Field(default_factory=dict)
    image_size: dict[str, list[int]] = Field(default_factory=dict, description="[width, height] after EXIF rotation")
    concepts_supplied: list[str] = Field(default_factory=list, description=(
        "concept scores the model used as sent with the request (concept_<modality>_<name>)"))
    concepts_computed: list[str] = Field(default_factory=list, description=(
        "concept scores the service computed from the uploaded images (service config `concepts.model`)"))


class Heatmap(_Model):
    modality: str
    method: str = Field(..., description="fusion_weighted_attention_rollout | attention_rollout | grad_cam | input_gradient")
    overlay_png_base64: str = Field(..., description="heat map over the uploaded image, original aspect ratio")
    width: int
    height: int
    original_width: int
    original_height: int
    model_region: list[int] = Field(..., description="[left, top, right, bottom] of the part the model saw, in overlay pixels")


class Contribution(_Model):
    name: str
    label: str
    weight: float = Field(..., description="share of the fusion pooling attention")
    present: bool


class FusionExplanation(_Model):
    image: dict[str, float] = Field(default_factory=dict, description="attention share per image type")
    concepts: list[Contribution] = Field(default_factory=list)
    metadata: list[Contribution] = Field(default_factory=list)
    none: float = Field(0.0, description="share on the learned 'nothing' token")


class Explanations(_Model):
    heatmaps: list[Heatmap] = Field(default_factory=list)
    fusion: Optional[FusionExplanation] = None
    note: str = ("Heat maps show where the model looked, not proof of a finding; contributions are "
                 "attention shares, not causal effects.")


class CriterionPrediction(_Model):
    criterion: str
    label: str = Field(..., description="the most likely grouped label")
    probabilities: dict[str, float]


class CriteriaReport(_Model):
    set: str = Field(..., description="the criteria set, e.g. seven_point (the 7-point checklist)")
    items: list[CriterionPrediction]
    seven_point_score: int = Field(..., description="the 7-point checklist score of the predicted labels "
                                                    "(2 per major, 1 per minor criterion; ≥ 3 suggests melanoma)")


class AnalyzeResponse(_Model):
    request_id: str
    created_at: datetime
    model: ModelRef
    differential: list[ClassProbability] = Field(..., description="every class, most likely first")
    primary_diagnosis: ClassProbability
    prediction_set: Optional[PredictionSet] = Field(None, description="the conformal differential: the diagnosis is "
                                                                      "among these classes with the stated confidence")
    prior: PriorInfo
    operating_point: OperatingPointInfo
    risk_score: float = Field(..., ge=0, le=100, description="100 × posterior probability of a malignant class under "
                                                             "the stated prior")
    risk_score_training_prior: float = Field(..., ge=0, le=100, description="the same under the training prior: what "
                                                                            "the operating point is applied to")
    risk_classes: list[str] = Field(..., description="the classes counted as malignant")
    action: Action = Field(..., description="cannot_assess: the input failed the quality gate (see quality) — "
                                            "no referral advice; the differential is not to be used")
    action_reasons: list[str]
    review_recommended: bool
    review_reasons: list[str]
    uncertainty: Uncertainty
    quality: Optional[QualityReport] = None
    inputs: InputSummary
    warnings: list[str] = Field(default_factory=list)
    explanations: Explanations
    criteria: Optional[CriteriaReport] = Field(None, description="a multi-task model's dermoscopic criteria "
                                                                 "(uncalibrated); absent for other models")
    calibrated: bool = Field(..., description="whether the bundle's calibration was applied")
    timings_ms: dict[str, float]
    disclaimer: str


class ModelInfo(_Model):
    model: ModelRef
    task: str
    task_description: str
    classes: list[str]
    class_names: dict[str, str]
    malignant: list[str]
    modalities: list[str] = Field(..., description="image types the model uses")
    metadata_fields: list[str]
    concepts: list[str]
    sites: list[str] = Field(default_factory=lambda: list(SITES))
    site_aliases: dict[str, str] = Field(default_factory=lambda: dict(SITE_ALIASES))
    calibration: dict
    calibrated: bool
    thresholds: dict = Field(..., description="the operating point in force (source, cut-offs, out-of-fold evidence)")
    decisions: dict = Field(default_factory=dict, description="prior, operating point and differential in force")
    uncertainty: dict
    quality: dict = Field(default_factory=dict, description="the cannot-assess gate's cut-offs")
    limits: dict
    explanations: bool
    drift_reference: bool
    auth_required: bool
    backends: list[str] = Field(default_factory=list, description="inference backend of each network member")
    disclaimer: str


class Health(_Model):
    status: str
    ready: Optional[bool] = None
    detail: Optional[str] = None
    warnings: list[str] = Field(default_factory=list, description="e.g. a fast inference backend that failed at "
                                                                  "start-up (the member runs on fp32 instead)")
