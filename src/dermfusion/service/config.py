"""service.yaml: the triage policy, uncertainty cut-offs, limits, workers, auth and audit settings.

Validated by pydantic (unknown keys are errors, so a typo cannot silently fall back to a default).
Secrets can come from the environment instead of the file:

  DERMFUSION_API_KEYS       comma-separated keys ``ID:SCOPE+SCOPE:SECRET`` (e.g. ``web:analyze:Xy…,ops:admin:Ab…``;
                            SECRET may also be a stored hash ``sha256:…``), added to ``auth.keys`` — a secret is
                            hashed when read and not kept; a bare ``SECRET`` is the deprecated form
                            (``auth.api_keys``: scope ``analyze`` only)
  DERMFUSION_AUDIT_DB_URL   overrides ``audit.db_url``
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from ..clinical.settings import ClinicalSettings
from ..config import read_yaml_mapping
from ..errors import DermfusionError
from .auth import KEY_ID, SCOPES, hash_key, parse_hash

DISCLAIMER = (
    "Decision support only — not a diagnosis. This output was produced by a machine-learning model and "
    "must be interpreted by a qualified clinician together with the history, examination and, where "
    "indicated, histopathology. It must not be used to rule out malignancy or to delay referral."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LimitsConfig(_Strict):
    max_upload_bytes: int = Field(15 * 2**20, gt=0, description="per image file; larger → 413")
    max_request_bytes: int = Field(32 * 2**20, gt=0, description="whole request body; larger → 413")
    max_pixels: int = Field(40_000_000, gt=0, description="decoded pixels per image (decompression-bomb guard)")
    max_side: int = Field(10_000, gt=0, description="pixels on the longer side; more → 413 (checked from the header)")
    max_aspect_ratio: float = Field(5.0, ge=1, description="longer side / shorter side; more → 422 (from the header)")
    min_side: int = Field(16, ge=1, description="images smaller than this on either side are refused")
    allowed_content_types: list[str] = Field(
        default_factory=lambda: ["image/jpeg", "image/png", "image/webp", "image/tiff", "image/bmp"])
    max_json_bytes: int = Field(4096, gt=0, le=65536, description=(
        "body of a JSON route (feedback, admin); larger → 413 before it is read"))


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
    header_timeout_s: float = Field(10.0, gt=0, description=(
        "a connection must deliver a request's complete header within this (from its start, or from the end of "
        "the previous answer); else 408 and closed — an idle or trickling socket holds no connection slot"))
    keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this many seconds")


class ApiKeyConfig(_Strict):
    """One named key (``dermfusion keys new ID --scope …`` prints this entry): only a salted hash of the secret."""
    id: str = Field(..., description="short name recorded in audit, feedback and registry-history rows "
                                     "(lower case, digits, . _ -; at most 32)")
    scopes: list[Literal[SCOPES]] = Field(..., min_length=1, description="analyze | feedback | admin | metrics")
    hash: str = Field(..., description="sha256:<salt>:<digest> of the secret (never the secret itself)")
    analyses_per_minute: Optional[float] = Field(None, ge=0, description="this key's rate (default: rate_limits)")
    analyses_per_day: Optional[int] = Field(None, ge=0, description="this key's daily quota (default: rate_limits)")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not KEY_ID.match(v):
            raise ValueError("a key id is 1–32 characters: lower-case letters, digits, '.', '_' or '-'")
        return v

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        parse_hash(v)
        return v


class AuthConfig(_Strict):
    """Named keys with scopes (``service.auth``). Empty = no authentication: analysis only, for a local demo."""
    keys: list[ApiKeyConfig] = Field(default_factory=list, description="named keys with scopes; empty = open "
                                                                       "analysis, no feedback / admin")
    api_keys: list[str] = Field(default_factory=list, description=(
        "deprecated: plain secrets, each read as key 'key-<n>' with the analyze scope only; use keys"))
    header: str = "X-API-Key"
    protect_metrics: bool = Field(True, description="with keys configured, /metrics needs the metrics or admin scope")
    _plaintext: int = PrivateAttr(0)   # how many secrets arrived in plain text from the file (a warning at start)

    @model_validator(mode="after")
    def _hash_plain_keys(self):
        """Deprecated plain secrets become hashed ``analyze`` keys; the plain text is not kept."""
        if self.api_keys:
            taken = {k.id for k in self.keys}
            for i, secret in enumerate(s for s in self.api_keys if s):
                kid = f"key-{i + 1}"
                while kid in taken:
                    kid += "x"
                taken.add(kid)
                self.keys.append(ApiKeyConfig(id=kid, scopes=["analyze"], hash=hash_key(secret)))
            self._plaintext = len(self.api_keys)
            self.api_keys = []
        ids = [k.id for k in self.keys]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"auth.keys: key id(s) {', '.join(dupes)} used more than once")
        return self


class RateLimitConfig(_Strict):
    """Per key, in this process (with keys configured; several processes each keep their own count — put a
    global limit in the reverse proxy). Beyond a rate: 429 ``rate_limited`` + Retry-After; beyond the day's quota:
    429 ``quota_exceeded`` + Retry-After until 00:00 UTC."""
    analyses_per_minute: float = Field(120.0, ge=0, description="POST /v1/analyze per key per minute (0 = no limit)")
    analysis_burst: int = Field(30, ge=1, description="analyses a key may send at once before the rate applies")
    requests_per_minute: float = Field(600.0, ge=0, description="every other keyed route per key per minute (0 = off)")
    request_burst: int = Field(120, ge=1)
    analyses_per_day: int = Field(0, ge=0, description="analyses per key per UTC day (0 = no quota)")


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
    store_images: bool = Field(False, description=(
        "keep each analysed image, re-encoded as PNG without any metadata (EXIF, XMP, ICC, comments), 0600"))
    image_dir: str = Field(default_factory=lambda: str(user_data_dir() / "images"),
                           description="where store_images puts uploads (default: the data folder's images/)")
    retention_days: Optional[int] = Field(None, ge=1, description=(
        "stored images older than this are deleted by `dermfusion audit purge` (run it daily); null = kept"))


class DriftConfig(_Strict):
    window: int = Field(500, ge=10, description="recent analyses compared with the bundle's reference")
    min_samples: int = Field(30, ge=1, description="no drift gauge until this many analyses are in the window")


class RegistryConfig(_Strict):
    """Serve from a model registry (``dermfusion registry``) instead of one bundle: its promoted version answers,
    its shadow version (if any) is run and audited beside it, or answers a canary share."""
    dir: Optional[str] = Field(None, description="registry directory (dermfusion serve --registry DIR); null = off")
    poll_s: float = Field(2.0, gt=0, description="how often registry.json is checked for a promotion / rollback made "
                                                 "with the CLI (the admin endpoints apply theirs at once)")


class ServiceConfig(ClinicalSettings):
    """service.yaml: the engine's clinical settings (``clinical.settings.ClinicalSettings``: triage, uncertainty,
    quality, prior, differential, explain, concepts, backend) plus what only the service has."""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rate_limits: RateLimitConfig = Field(default_factory=RateLimitConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    device: str = "cpu"
    backend: str = Field("auto", description="auto = the one policy (inference.backend_policy): the fastest exact "
                                             "backend, or an approximate one the bundle's agreement record approves "
                                             "for this CPU, matching fp32 eager on real images (fp32 if none) | "
                                             "trained | fp32 | bf16 | autocast | int8 | onnx | onnx-int8 | compile")
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
        auth = raw.setdefault("auth", {})
        for entry in (e.strip() for e in env["DERMFUSION_API_KEYS"].split(",")):
            if entry.count(":") >= 2:  # ID:SCOPE+SCOPE:SECRET (or a stored hash sha256:…)
                kid, scopes, secret = entry.split(":", 2)
                auth.setdefault("keys", []).append({
                    "id": kid.strip(), "scopes": [s.strip() for s in scopes.split("+") if s.strip()],
                    "hash": secret if secret.startswith("sha256:") else hash_key(secret)})
            elif entry:
                auth["api_keys"] = list(auth.get("api_keys", [])) + [entry]
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
