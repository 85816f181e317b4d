"""The model's life in the clinic, over HTTP: predictions run but not returned (shadow, canary), clinicians' confirmed
diagnoses (``POST /v1/feedback``: the ``feedback`` scope), the performance report with its A/B comparison
(``GET /v1/performance``) and promotion / shadow / rollback (``POST /v1/admin/…``: the ``admin`` scope and a
registry). Who may call which is decided in the middleware (``auth``), before the body is read.

Over HTTP nothing can be forced: a version whose release gate failed is promoted (or made a canary) only with the
CLI, ``--force --reason``, recorded with the operator. A refused change is a 409 with a code and a fixed message —
never the version asked for or a server path (the full reason goes to the server log)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal, Optional

from fastapi import FastAPI, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..bundle.registry import SEMVER, RegistryError, previous_promoted
from ..tasks import get_task
from .audit import AMENDMENT_REASONS, FEEDBACK_CONFIRMATIONS
from .inputs import InputError
from .integrity import BundleIntegrityError
from .performance import performance_report
from .schemas import ErrorResponse
from .state import AuditUnavailable, ServiceState, ensure_audit

log = logging.getLogger("dermfusion.service")

Confirmation = Literal["histology", "follow_up", "consensus", "confocal"]
assert set(Confirmation.__args__) == set(FEEDBACK_CONFIRMATIONS)
AmendmentReason = Literal["entry_error", "revised_report", "second_review", "wrong_lesion"]
assert set(AmendmentReason.__args__) == set(AMENDMENT_REASONS)
VERSION = SEMVER.pattern  # a version asked for over HTTP is a semantic version, or a 422 (never echoed)
NO_FORCE = ("force is not available over HTTP: overriding a release gate is done with the CLI (dermfusion registry "
            "promote VERSION --force --reason TEXT), recorded with the operator and the reason")


class Amendment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: AmendmentReason = Field(..., description="why the confirmed diagnosis that counts is replaced")


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., pattern=r"^[A-Za-z0-9._-]{8,64}$", description="the analysis' request id")
    diagnosis: str = Field(..., pattern=r"^[A-Z_]{2,16}$", description="one of the task's class codes, e.g. MEL")
    confirmation: Confirmation = Field(..., description="how the diagnosis was confirmed (histology > confocal > "
                                                        "follow_up > consensus)")
    amendment: Optional[Amendment] = Field(None, description=(
        "replace the confirmed diagnosis that counts, whatever its confirmation (kept beside it, never over it); "
        "without it a weaker confirmation never replaces a stronger one"))


class _NoForce(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_force(cls, data):
        if isinstance(data, dict) and "force" in data:
            raise ValueError(NO_FORCE)
        return data


class Promote(_NoForce):
    version: str = Field(..., max_length=64, pattern=VERSION, description="a registered semantic version")


class Shadow(_NoForce):
    version: Optional[str] = Field(..., max_length=64, pattern=VERSION, description="null stops the shadow")
    share: float = Field(0.0, ge=0, le=1, description="share of requests the shadow answers (canary; needs a passed "
                                                      "gate); 0 = none; 1 = every request, i.e. a promotion")


FEEDBACK_STATUS = {"recorded": 201, "upgraded": 201, "amended": 201, "kept": 200, "unchanged": 200}


def record_feedback(store, request_id: str, diagnosis: str, confirmation: str, client: str | None,
                    amendment_reason: str | None = None) -> dict:
    """Validate against the audited row (it must exist; the diagnosis must be one of its task's classes) and store
    by the feedback rules (``audit.resolve_feedback``). A weaker or equal confirmation of another diagnosis is kept
    and flagged, then refused with 409 ``conflicting_confirmation``; an amendment with nothing to amend is a 409."""
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
    if amendment_reason is not None and amendment_reason not in AMENDMENT_REASONS:
        raise InputError(422, "invalid_amendment", "an amendment's reason must be one of "
                         + ", ".join(AMENDMENT_REASONS), "amendment")
    rec = store.write_feedback(request_id, diagnosis, confirmation, client, amendment_reason)
    status = rec["status"]
    if status == "nothing_to_amend":
        raise InputError(409, "nothing_to_amend", "this analysis has no confirmed diagnosis to amend; send it "
                         "without an amendment", "amendment")
    if status == "conflict":
        counted = rec["counted"]
        raise InputError(409, "conflicting_confirmation", f"a {counted['confirmation']} confirmation of another "
                         "diagnosis counts for this analysis and this one is not stronger: it is recorded and flagged "
                         "as a conflict (GET /v1/performance), but does not replace it — send an amendment with a "
                         "reason to replace it", "confirmation",
                         {"recorded": True, "counted_confirmation": counted["confirmation"]})
    return {"feedback_id": rec.get("id"), "request_id": request_id, "diagnosis": rec["diagnosis"],
            "confirmation": rec["confirmation"], "status": status,
            "amends": rec.get("amends"), "reason": rec.get("reason"),
            "recorded_at": rec["created_at"].isoformat()}


# what a refused registry change answers over HTTP: a code and a fixed message (the full reason is logged)
REFUSALS = {
    "unknown_version": "that version is not registered",
    "gate_failed": "that version failed its release gate; a promotion or canary needs a passed gate (an override is "
                   "made with the CLI, recorded with the operator and a reason)",
    "gate_missing": "that version has no release-gate record; a promotion or canary needs a passed gate",
    "already_promoted": "that version is already the promoted one",
    "is_promoted": "that version is the promoted one; shadow another version",
    "nothing_promoted": "nothing is promoted",
    "no_previous": "there is no earlier promoted version to roll back to",
    "invalid_share": "share must lie in [0, 1]",
}


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
    auth = [Security(api_key)] if state.keys else []  # declared in OpenAPI only when it is enforced
    errors = {k: {"model": ErrorResponse} for k in (401, 403, 404, 409, 413, 422, 429, 503)}

    def store():
        s = ensure_audit(state)
        if s is None:
            raise AuditUnavailable("the audit store is not open; retry shortly")
        return s

    @app.post("/v1/feedback", tags=["lifecycle"], dependencies=auth, status_code=201, responses=errors)
    async def feedback(body: Feedback, request: Request):
        """A clinician's confirmed diagnosis for an analysed lesion (the ``feedback`` scope): enumerated values only,
        no free text. 201 when it counts (the first, a stronger confirmation, or an amendment); 200 when kept beside
        a stronger one of the same diagnosis (or identical); 409 ``conflicting_confirmation`` when it disagrees with
        a stronger or equal one (recorded and flagged; amend to replace)."""
        client = getattr(request.state, "client", None)
        rec = await asyncio.to_thread(record_feedback, store(), body.request_id, body.diagnosis, body.confirmation,
                                      client, body.amendment.reason if body.amendment else None)
        return JSONResponse(rec, status_code=FEEDBACK_STATUS[rec["status"]])

    @app.get("/v1/performance", tags=["lifecycle"], dependencies=auth, responses=errors)
    async def performance(a: Optional[str] = Query(None, max_length=64, pattern=VERSION,
                                                   description="version A (default: promoted)"),
                          b: Optional[str] = Query(None, max_length=64, pattern=VERSION,
                                                   description="version B (default: shadow)"),
                          delta: float = Query(0.05, gt=0, lt=1, description="difference the caveat sizes for")):
        """Per-version performance on confirmed cases, the A/B comparison (McNemar's exact test) and the feedback's
        integrity: conflicting confirmations flagged (the ``admin`` scope)."""
        dep = state.deployment
        a = a or getattr(dep, "version", None)
        b = b or getattr(dep, "shadow_version", None)
        return await asyncio.to_thread(performance_report, store(), a, b, delta)

    def admin(request: Request):
        if not state.keys:  # the middleware refuses first; kept so the route is safe on its own
            raise InputError(403, "auth_not_configured", "admin endpoints need named API keys with the admin scope "
                             "(auth.keys): without them nobody may change the served model")
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
                log.warning("admin change refused (%s): %s", e.code, e)
                raise InputError(409, e.code if e.code in REFUSALS else "registry_refused",
                                 REFUSALS.get(e.code, "the registry refused the change")) from None
            except BundleIntegrityError as e:
                log.error("admin change refused (bundle integrity): %s", e)
                raise InputError(409, "bundle_integrity", "that version's bundle is not the one registered (its "
                                 "content changed since); register it as a new version") from None
            return registry_view(state)
        return await asyncio.to_thread(run)

    def known(version: str | None) -> list[str]:
        """``version`` to preload when it is registered (an unknown one is refused by the registry's own rule)."""
        if version is None:
            return []
        return [version] if version in state.registry.registry.read()["versions"] else []

    @app.post("/v1/admin/promote", tags=["admin"], dependencies=auth, responses=errors)
    async def promote(body: Promote, request: Request):
        """Promote a registered version whose release gate passed (the ``admin`` scope); effective when this
        returns. Nothing can be forced over HTTP."""
        by = admin(request)
        return await apply(lambda: state.registry.registry.promote(body.version, by=by), known(body.version))

    @app.post("/v1/admin/rollback", tags=["admin"], dependencies=auth, responses=errors)
    async def rollback(request: Request):
        """Back to the previously promoted version, stopping any shadow or canary; effective when this returns."""
        by = admin(request)
        target = previous_promoted(state.registry.registry.read()["history"])
        return await apply(lambda: state.registry.registry.rollback(by=by), [target] if target else [])

    @app.post("/v1/admin/shadow", tags=["admin"], dependencies=auth, responses=errors)
    async def shadow(body: Shadow, request: Request):
        """Run a version beside the promoted one (audited, not returned), or as a canary answering ``share`` (needs
        a passed gate; ``share`` 1 is a promotion, by the promotion's rules)."""
        by = admin(request)
        return await apply(lambda: state.registry.registry.shadow(body.version, body.share, by=by),
                           known(body.version))

    @app.get("/v1/admin/registry", tags=["admin"], dependencies=auth, responses=errors)
    async def registry(request: Request):
        """The registry's versions (no paths, no user names) and the deployment being served."""
        admin(request)
        return registry_view(state)


def registry_view(state: ServiceState) -> dict:
    dep = state.deployment
    return {"serving": {"promoted": getattr(dep, "version", None), "shadow": getattr(dep, "shadow_version", None),
                        "share": getattr(dep, "share", 0.0)},
            **state.registry.registry.public_view()}
