"""The service's shared state and what every route needs from it: the loaded analyzer (or a 503), the model
card, the audit store (writes that must succeed before an answer goes out), stored images, JSON error bodies."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.responses import JSONResponse

from ..card import card_for_service
from ..errors import DermfusionError
from ..inference import load_run
from .analyzer import Analyzer
from .config import ServiceConfig
from .drift import DriftMonitor
from .inputs import InputError
from .metrics import Metrics
from . import retention
from .pool import InferencePool

log = logging.getLogger("dermfusion.service")


class AuditUnavailable(DermfusionError):
    pass


@dataclass
class ServiceState:
    config: ServiceConfig
    metrics: Metrics
    pool: InferencePool
    bundle_path: Path | None = None
    analyzer: Analyzer | None = None
    audit: object | None = None
    drift: DriftMonitor = field(default_factory=lambda: DriftMonitor(None))
    case_mix: object | None = None     # case_mix.CaseMixMonitor: the EM estimate of recent traffic's class prior
    ready: bool = False
    status: str = "starting"
    detail: str | None = None
    keys: object | None = None         # auth.KeyRing: named keys with scopes (falsy: no authentication)
    limiter: object | None = None      # ratelimit.RateLimiter: per-key rates and daily quota
    routes: list | None = None         # the app's routes: unknown paths are refused before the body is read
    model_card: dict | None = None
    audit_keeper: object | None = None  # health.AuditKeeper: opens (and reopens) ``audit``, probes it for /readyz
    verified: dict = field(default_factory=dict)      # {bundle dir: bundle.Integrity}, checked at start
    integrity: list = field(default_factory=list)     # the served predictor's bundles, verified
    request_ids: set = field(default_factory=set)     # client-supplied request ids in flight (guards)
    deployment: object | None = None   # deployment.Deployment: what answers; a request reads it once, at its start
    registry: object | None = None     # deployment.RegistryWatcher when serving from a model registry


def error_body(status: int, code: str, message: str, request_id: str | None = None, field: str | None = None,
               details=None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message}, "request_id": request_id}
    if field:
        body["error"]["field"] = field
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def load_served_predictor(target: Path, device: str):
    """The predictor behind ``dermfusion serve TARGET``: a bundle, a training run (network: its fold bundles
    averaged; tabular: its calibrated refit) or a directory holding RUN/bundle — ``bundle.resolve_run``."""
    return load_run(target, device=device)


def ready_analyzer(state: ServiceState) -> Analyzer:
    if not state.ready or state.analyzer is None:
        raise InputError(503, "not_ready", "the model is still loading; retry shortly"
                         if state.status != "error" else f"the model failed to load ({state.detail})")
    return state.analyzer


def current_deployment(state: ServiceState):
    """The deployment answering this request (read once per request: a swap never mixes versions within one)."""
    dep = state.deployment
    if not state.ready or dep is None:
        ready_analyzer(state)  # the same 503 as every other route
    return dep


def served_model_card(state: ServiceState) -> dict:
    """The served model's card, built once (files only: cheap, but not per request)."""
    if state.model_card is None:
        an = ready_analyzer(state)
        served = getattr(an.bundle, "path", None)
        members = [m.bundle.path for m in getattr(an.predictor, "members", None) or []
                   if getattr(getattr(m, "bundle", None), "path", None)]
        if not served and not members:
            raise InputError(404, "no_model_card", "the served model has no bundle directory to describe")
        state.model_card = card_for_service(Path(served) if served else None, members)
    return state.model_card


def ensure_audit(state: ServiceState):
    """The open audit store; None while it is not (``audit.required`` → AuditUnavailable) — the keeper
    (``health.AuditKeeper``) keeps reopening it, a request never waits for that."""
    if state.audit is None and state.config.audit.required:
        raise AuditUnavailable("the audit store cannot be reached; retry shortly")
    return state.audit


def write_audit(state: ServiceState, record: dict) -> None:
    try:
        store = ensure_audit(state)
        if store is not None:
            store.write(record)
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "IntegrityError":  # the id was audited meanwhile by another process (guards: 409 first)
            raise InputError(409, "duplicate_request_id", "this X-Request-ID is already recorded in the audit "
                             "trail; send a new id per request") from None
        log.error("audit write failed for request %s: %s", record.get("request_id"), type(e).__name__)
        if state.audit_keeper is not None:
            state.audit_keeper.failed()  # /readyz probes afresh
        if state.config.audit.required:
            raise AuditUnavailable("the analysis could not be recorded in the audit trail, so no result is "
                                   "returned; retry shortly") from None


def store_images(config: ServiceConfig, rid: str, images: dict) -> list[str]:
    """The analysis' images kept without metadata, 0600 (``retention.store_images``); the paths written."""
    return retention.store_images(config, rid, images)
