"""The model's life in the clinic, over HTTP: predictions run but not returned (shadow, canary), clinicians' confirmed
diagnoses (``POST /v1/feedback``), the performance report with its A/B comparison (``GET /v1/performance``) and
promotion / shadow / rollback (``POST /v1/admin/…``, which need the service's API key and a registry)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal, Optional

from fastapi import FastAPI, Query, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field

from ..bundle.registry import RegistryError, previous_promoted
from ..tasks import get_task
from .audit import FEEDBACK_CONFIRMATIONS
from .inputs import InputError
from .integrity import BundleIntegrityError
from .performance import performance_report
from .schemas import ErrorResponse
from .state import AuditUnavailable, ServiceState, ensure_audit

log = logging.getLogger("dermfusion.service")

Confirmation = Literal["histology", "follow_up", "consensus", "confocal"]
assert set(Confirmation.__args__) == set(FEEDBACK_CONFIRMATIONS)


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., pattern=r"^[A-Za-z0-9._-]{8,64}$", description="the analysis' request id")
    diagnosis: str = Field(..., pattern=r"^[A-Z_]{2,16}$", description="one of the task's class codes, e.g. MEL")
    confirmation: Confirmation = Field(..., description="how the diagnosis was confirmed")


class Promote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(..., max_length=64)
    force: bool = Field(False, description="promote a version whose release gate failed or is missing (recorded)")


class Shadow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Optional[str] = Field(..., max_length=64, description="null stops the shadow")
    share: float = Field(0.0, ge=0, le=1, description="share of requests the shadow answers (canary); 0 = none")
    force: bool = False


def record_feedback(store, request_id: str, diagnosis: str, confirmation: str, client: str | None) -> dict:
    """Validate against the audited row (it must exist; the diagnosis must be one of its task's classes) and store."""
    row = store.get(request_id)
    if row is None:
        raise InputError(404, "unknown_request_id", "no analysis with this request id in the audit trail",
                         "request_id")
    classes = get_task(row["task"]).classes
    if diagnosis not in classes:
        raise InputError(422, "invalid_diagnosis", f"diagnosis must be one of {', '.join(classes)} (the task of "
                         "that analysis)", "diagnosis")
    if confirmation not in FEEDBACK_CONFIRMATIONS:
        raise InputError(422, "invalid_confirmation", "confirmation must be one of "
                         + ", ".join(FEEDBACK_CONFIRMATIONS), "confirmation")
    rec = store.write_feedback(request_id, diagnosis, confirmation, client)
    return {"request_id": request_id, "diagnosis": diagnosis, "confirmation": confirmation,
            "recorded_at": rec["created_at"].isoformat()}


def run_unreturned(state: ServiceState, models: list, uploads: dict, meta, rid: str) -> None:
    """Run the models whose answers are not returned and audit each prediction with its version. A failure here
    never fails the request (it is logged and counted)."""
    for m in models:
        t = time.perf_counter()
        try:
            a = m.analyzer.analyze(uploads, meta, request_id=rid, explain=False).audit
            store = state.audit
            if store is not None:
                store.write_shadow({**a, "registry_version": m.version or f"hash:{a['model_hash'][:12]}",
                                    "model_role": m.role or "shadow", "latency_ms": (time.perf_counter() - t) * 1000})
            state.metrics.unreturned.labels(m.version or "none", "audited").inc()
        except Exception as e:  # noqa: BLE001
            state.metrics.unreturned.labels(m.version or "none", "failed").inc()
            log.error("unreturned prediction of version %s failed for request %s: %s", m.version, rid,
                      type(e).__name__)


def add_lifecycle_routes(app: FastAPI, state: ServiceState) -> None:
    api_key = APIKeyHeader(name=state.config.auth.header, auto_error=False, description="this service's API key")
    auth = [Security(api_key)] if state.key_digests else []
    errors = {k: {"model": ErrorResponse} for k in (403, 404, 409, 422, 503)}

    def store():
        s = ensure_audit(state)
        if s is None:
            raise AuditUnavailable("the audit store is not open; retry shortly")
        return s

    @app.post("/v1/feedback", tags=["lifecycle"], dependencies=auth, status_code=201, responses=errors)
    async def feedback(body: Feedback, request: Request):
        """A clinician's confirmed diagnosis for an analysed lesion: enumerated values only, no free text."""
        client = getattr(request.state, "client", None)
        return await asyncio.to_thread(record_feedback, store(), body.request_id, body.diagnosis,
                                       body.confirmation, client)

    @app.get("/v1/performance", tags=["lifecycle"], dependencies=auth, responses=errors)
    async def performance(a: Optional[str] = Query(None, max_length=64, description="version A (default: promoted)"),
                          b: Optional[str] = Query(None, max_length=64, description="version B (default: shadow)"),
                          delta: float = Query(0.05, gt=0, lt=1, description="difference the caveat sizes for")):
        """Per-version performance on confirmed cases and the A/B comparison (McNemar's exact test)."""
        dep = state.deployment
        a = a or getattr(dep, "version", None)
        b = b or getattr(dep, "shadow_version", None)
        return await asyncio.to_thread(performance_report, store(), a, b, delta)

    def admin(request: Request):
        if not state.key_digests:
            raise InputError(403, "admin_disabled", "admin endpoints need API keys (auth.api_keys): without "
                             "authentication nobody may change the served model")
        if state.registry is None:
            raise InputError(409, "no_registry", "this service serves one bundle, not a model registry "
                             "(dermfusion serve --registry DIR)")
        return f"api:{getattr(request.state, 'client', None)}"

    async def apply(change, preload: list[str]):
        w = state.registry

        def run():
            try:
                for v in preload:  # load, verify and warm before anything changes: a bad bundle changes nothing
                    w.analyzer(v)
                change()
                w.refresh(force=True)
            except RegistryError as e:
                raise InputError(409, "registry_refused", str(e)) from None
            except BundleIntegrityError as e:
                raise InputError(409, "bundle_integrity", str(e)) from None
            return registry_view(state)
        return await asyncio.to_thread(run)

    @app.post("/v1/admin/promote", tags=["admin"], dependencies=auth, responses=errors)
    async def promote(body: Promote, request: Request):
        """Promote a registered version (its gate must have passed unless ``force``); effective when this returns."""
        by = admin(request)
        return await apply(lambda: state.registry.registry.promote(body.version, by=by, force=body.force),
                           [body.version])

    @app.post("/v1/admin/rollback", tags=["admin"], dependencies=auth, responses=errors)
    async def rollback(request: Request):
        """Back to the previously promoted version; effective when this returns."""
        by = admin(request)
        target = previous_promoted(state.registry.registry.read()["history"])
        return await apply(lambda: state.registry.registry.rollback(by=by), [target] if target else [])

    @app.post("/v1/admin/shadow", tags=["admin"], dependencies=auth, responses=errors)
    async def shadow(body: Shadow, request: Request):
        """Run a version beside the promoted one (audited, not returned), or as a canary answering ``share``."""
        by = admin(request)
        return await apply(lambda: state.registry.registry.shadow(body.version, body.share, by=by, force=body.force),
                           [body.version] if body.version else [])

    @app.get("/v1/admin/registry", tags=["admin"], dependencies=auth, responses=errors)
    async def registry(request: Request):
        """The registry's versions and the deployment being served."""
        admin(request)
        return registry_view(state)


def registry_view(state: ServiceState) -> dict:
    dep = state.deployment
    reg = state.registry.registry
    return {"serving": {"promoted": getattr(dep, "version", None), "shadow": getattr(dep, "shadow_version", None),
                        "share": getattr(dep, "share", 0.0)},
            "versions": reg.listing(), "history": reg.read()["history"][-20:]}
