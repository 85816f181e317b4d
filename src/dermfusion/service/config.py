"""service.yaml: the triage policy, uncertainty cut-offs, limits, workers, auth and audit settings.

Validated by pydantic (unknown keys are errors, so a typo cannot silently fall back to a default).
Secrets can come from the environment instead of the file:

  DERMFUSION_API_KEYS       comma-separated API keys (added to ``auth.api_keys``)
  DERMFUSION_AUDIT_DB_URL   overrides ``audit.db_url``
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import read_yaml_mapping
from ..errors import DermfusionError

DISCLAIMER = (
    "Decision support only — not a diagnosis. This output was produced by a machine-learning model and "
    "must be interpreted by a qualified clinician together with the history, examination and, where "
    "indicated, histopathology. It must not be used to rule out malignancy or to delay referral."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TriageConfig(_Strict):
    """Cut-offs that turn the calibrated output into an action (defaults are for primary care, where
    missing a melanoma costs far more than an extra referral)."""

    urgent_risk: float = Field(50.0, ge=0, le=100, description="urgent referral when risk score ≥ this")
    routine_risk: float = Field(15.0, ge=0, le=100, description="routine referral when risk score ≥ this")
    urgent_class_probability: dict[str, float] = Field(
        default_factory=lambda: {"MEL": 0.30, "SCCKA": 0.40, "SCC": 0.40, "MAL_OTH": 0.40},
        description="urgent referral when a class' calibrated probability ≥ its cut (classes not in the task are ignored)")
    routine_class_probability: dict[str, float] = Field(
        default_factory=lambda: {"BCC": 0.25, "AKIEC": 0.30, "AK": 0.30},
        description="routine referral when a class' calibrated probability ≥ its cut")

    @field_validator("urgent_class_probability", "routine_class_probability")
    @classmethod
    def _probabilities(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: p for k, p in v.items() if not 0.0 <= float(p) <= 1.0}
        if bad:
            raise ValueError(f"class probability cut-offs must lie in [0, 1]: {bad}")
        return v

    @model_validator(mode="after")
    def _ordered(self):
        if self.routine_risk > self.urgent_risk:
            raise ValueError(f"routine_risk ({self.routine_risk}) must not exceed urgent_risk ({self.urgent_risk})")
        return self


class UncertaintyConfig(_Strict):
    max_normalized_entropy: float = Field(0.70, ge=0, le=1, description="review when entropy / ln(C) exceeds this")
    min_top_probability: float = Field(0.45, ge=0, le=1, description="review when the top class is less likely than this")
    review_on_missing_image: bool = True
    review_on_missing_metadata: bool = True


class QualityConfig(_Strict):
    """The "cannot assess" gate (``evaluation.quality_gate``): an image that fails a check gets the action
    ``cannot_assess`` ("image not assessable — retake") instead of a referral. Image cut-offs are on the centre
    square the model sees (≤ 224 px, CIE L*a*b*); defaults were chosen on the 5,984 HAM10000 training images and
    pass ≥ 99 % of the 1,512 ISIC 2018 test images (BENCHMARKS.md). The model check compares the top calibrated
    probability with the served bundle's out-of-fold quantiles (``drift_reference.json``); the familiarity check
    compares the image's intermediate-layer statistics with the bundle's reference lesions
    (``embedding_reference.npz``, ``evaluation.embedding_reference``)."""

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


class LimitsConfig(_Strict):
    max_upload_bytes: int = Field(15 * 2**20, gt=0, description="per image file; larger → 413")
    max_request_bytes: int = Field(32 * 2**20, gt=0, description="whole request body; larger → 413")
    max_pixels: int = Field(40_000_000, gt=0, description="decoded pixels per image (decompression-bomb guard)")
    max_side: int = Field(10_000, gt=0, description="pixels on the longer side; more → 413 (checked from the header)")
    max_aspect_ratio: float = Field(5.0, ge=1, description="longer side / shorter side; more → 422 (from the header)")
    min_side: int = Field(16, ge=1, description="images smaller than this on either side are refused")
    allowed_content_types: list[str] = Field(
        default_factory=lambda: ["image/jpeg", "image/png", "image/webp", "image/tiff", "image/bmp"])


class WorkersConfig(_Strict):
    workers: int = Field(2, ge=1, description="analyses running at once (threads)")
    queue_size: int = Field(16, ge=0, description="analyses allowed to wait; beyond → 503 + Retry-After")
    queue_timeout_s: float = Field(30.0, gt=0, description="a queued analysis waiting longer gets 503")
    request_timeout_s: float = Field(60.0, gt=0, description=(
        "budget per analysis request from its first byte: a body still arriving after it → 408, an answer not "
        "ready within it → 503 + Retry-After (nothing audited)"))
    max_connections: int = Field(500, ge=1, description=(
        "open connections uvicorn accepts (`dermfusion serve`); beyond, its bare 503 — keep it well above "
        "workers + queue_size, so clients normally get the service's 503 + Retry-After"))
    backlog: int = Field(2048, ge=1, description="connections waiting to be accepted by the listening socket")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (default: torch's)")


class AuthConfig(_Strict):
    api_keys: list[str] = Field(default_factory=list, description="empty = no authentication")
    header: str = "X-API-Key"
    protect_metrics: bool = False


def user_data_dir(env: dict | None = None) -> Path:
    """This user's dermfusion data folder: $XDG_DATA_HOME/dermfusion (else ~/.local/share/dermfusion); on Windows
    %LOCALAPPDATA%\\dermfusion, on macOS ~/Library/Application Support/dermfusion."""
    env = os.environ if env is None else env
    if sys.platform == "win32" and env.get("LOCALAPPDATA"):
        return Path(env["LOCALAPPDATA"]) / "dermfusion"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "dermfusion"
    xdg = env.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"  # XDG: ignore relative
    return base / "dermfusion"


def default_audit_url() -> str:
    """SQLite in the user's data folder (not the current directory): sqlite:///<data dir>/audit.db."""
    return f"sqlite:///{user_data_dir() / 'audit.db'}"


class AuditConfig(_Strict):
    db_url: str = Field(default_factory=default_audit_url, description=(
        "SQLAlchemy URL; default sqlite:///$XDG_DATA_HOME/dermfusion/audit.db (~/.local/share/dermfusion/audit.db)"))
    required: bool = Field(True, description="fail the request (503) when the audit record cannot be written")
    store_images: bool = False
    image_dir: str = Field(default_factory=lambda: str(user_data_dir() / "images"),
                           description="where store_images puts uploads (default: the data folder's images/)")


class DriftConfig(_Strict):
    window: int = Field(500, ge=10, description="recent analyses compared with the bundle's reference")
    min_samples: int = Field(30, ge=1, description="no drift gauge until this many analyses are in the window")


class ExplainConfig(_Strict):
    enabled: bool = True
    max_side: int = Field(512, ge=32, description="overlay PNGs are at most this many pixels on the long side")
    alpha: float = Field(0.5, ge=0, le=1)
    colormap: str = "jet"


class ConceptScorerConfig(_Strict):
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


class RegistryConfig(_Strict):
    """Serve from a model registry (``dermfusion registry``) instead of one bundle: its promoted version answers,
    its shadow version (if any) is run and audited beside it, or answers a canary share."""
    dir: Optional[str] = Field(None, description="registry directory (dermfusion serve --registry DIR); null = off")
    poll_s: float = Field(2.0, gt=0, description="how often registry.json is checked for a promotion / rollback made "
                                                 "with the CLI (the admin endpoints apply theirs at once)")


class ServiceConfig(_Strict):
    triage: TriageConfig = Field(default_factory=TriageConfig)
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    concepts: ConceptScorerConfig = Field(default_factory=ConceptScorerConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    device: str = "cpu"
    backend: str = Field("auto", description="auto = the fastest backend matching fp32 eager on real images "
                                             "(fp32 if none) | trained | fp32 | bf16 | autocast | int8 | onnx | "
                                             "onnx-int8 | compile")
    disclaimer: str = DISCLAIMER
    cors_origins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _limits(self):
        if self.limits.max_upload_bytes > self.limits.max_request_bytes:
            raise ValueError("limits.max_upload_bytes must not exceed limits.max_request_bytes")
        return self


class ServiceConfigError(DermfusionError, ValueError):
    pass


def load_service_config(path: str | Path | None = None, env: dict | None = None, **overrides) -> ServiceConfig:
    """Read service.yaml (or the defaults), then apply the environment, then keyword overrides
    (section=dict, e.g. ``audit={"db_url": ...}``)."""
    env = os.environ if env is None else env
    raw: dict = {}
    if path is not None:
        raw = read_yaml_mapping(path, ServiceConfigError, "service config")
    if env.get("DERMFUSION_API_KEYS"):
        keys = [k.strip() for k in env["DERMFUSION_API_KEYS"].split(",") if k.strip()]
        raw.setdefault("auth", {})
        raw["auth"]["api_keys"] = list(raw["auth"].get("api_keys", [])) + keys
    if env.get("DERMFUSION_AUDIT_DB_URL"):
        raw.setdefault("audit", {})["db_url"] = env["DERMFUSION_AUDIT_DB_URL"]
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    try:
        return ServiceConfig.model_validate(raw)
    except ValidationError as e:
        raise ServiceConfigError(f"invalid service config{f' {path}' if path else ''}:\n{e}") from None


def default_config_yaml() -> str:
    """The defaults as YAML (``dermfusion serve --print-config``)."""
    return yaml.safe_dump(ServiceConfig().model_dump(), sort_keys=False, allow_unicode=True, width=100)
