"""The FastAPI application: ``create_app(bundle, config)``.

Endpoints: ``POST /v1/analyze`` · ``GET /v1/model`` · ``GET /v1/model-card`` · ``GET /healthz`` · ``GET /readyz`` ·
``GET /metrics`` · ``GET /`` (clinician page) · ``/docs`` + ``/openapi.json``.

Safety properties, each enforced in one place:
- bad input is a 4xx JSON error saying what is wrong (``InputError`` / validation handlers), never a 500;
- authentication and the request-size cap run in the ASGI middleware, *before* a body is read;
- inference runs in a bounded thread pool (``pool.InferencePool``): overload → 503 + Retry-After;
- logs carry request ids, status and timings only — never image bytes or metadata values;
- every analysis writes an audit record before the answer is returned (``audit.required``).
"""
from __future__ import annotations

import asyncio
import hmac
import hashlib
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..tasks import MODALITIES
from .analyzer import Analyzer, InputError, Upload, class_name
from .config import ServiceConfig
from .drift import DriftMonitor, read_reference_stats
from .metrics import Metrics, endpoint_label
from .pool import InferencePool, Overloaded
from .schemas import AnalyzeResponse, ErrorResponse, Health, ModelInfo, PatientMetadata

log = logging.getLogger("dermfusion.service")
WEB_DIR = Path(__file__).parent / "web"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
MAX_METADATA_CHARS = 16_384
FORM_FIELDS = {"clinical", "dermoscopic", "metadata"}


class AuditUnavailable(Exception):
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
    ready: bool = False
    status: str = "starting"
    detail: str | None = None
    key_digests: list[bytes] = field(default_factory=list)
    model_card: dict | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def error_body(status: int, code: str, message: str, request_id: str | None = None, field: str | None = None,
               details=None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message}, "request_id": request_id}
    if field:
        body["error"]["field"] = field
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------- middleware
class ServiceMiddleware:
    """Request id, authentication, body-size cap, latency/status metrics and a privacy-safe log line."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, cfg = self.state, self.state.config
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        scope["state"]["t0"] = t0
        path, method = scope.get("path", ""), scope.get("method", "GET")
        label = endpoint_label(path)
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        async def respond(resp: Response):
            await resp(scope, receive, send_wrapper)

        try:
            protected = path.startswith("/v1/") or (path == "/metrics" and cfg.auth.protect_metrics)
            if protected and st.key_digests and method != "OPTIONS":
                key = headers.get(cfg.auth.header.lower(), "")
                if not key or not any(hmac.compare_digest(_digest(key), d) for d in st.key_digests):
                    st.metrics.rejected.labels("unauthorized").inc()
                    return await respond(error_body(
                        401, "unauthorized", f"missing or invalid API key: send it in the {cfg.auth.header} header",
                        rid, headers={"WWW-Authenticate": "ApiKey"}))
                scope["state"]["client"] = key_fingerprint(key)
            if method in ("POST", "PUT", "PATCH"):
                limit = cfg.limits.max_request_bytes
                try:
                    declared = int(headers.get("content-length", "0") or 0)
                except ValueError:
                    declared = 0
                if declared > limit:
                    st.metrics.rejected.labels("payload_too_large").inc()
                    return await respond(error_body(413, "payload_too_large",
                                                    f"request body of {declared:,} bytes exceeds the limit of {limit:,}",
                                                    rid))
                if path == "/v1/analyze":
                    ctype = headers.get("content-type", "")
                    if not ctype.lower().startswith("multipart/form-data"):
                        st.metrics.rejected.labels("unsupported_media_type").inc()
                        return await respond(error_body(
                            415, "unsupported_media_type",
                            f"send multipart/form-data with image file fields 'clinical' and/or 'dermoscopic' and an "
                            f"optional 'metadata' JSON field (got content type {ctype.split(';')[0] or 'none'!r})", rid))
                if path == "/v1/analyze" and st.ready and st.pool.pending >= st.pool.capacity:
                    # refuse before parsing anything: under overload a refusal must be cheap
                    while (await receive()).get("more_body", False):
                        pass  # drain (not buffered) so the connection stays usable
                    st.metrics.rejected.labels("overloaded").inc()
                    return await respond(error_body(
                        503, "overloaded", f"server busy: {st.pool.pending} analyses running or queued (limit "
                        f"{st.pool.capacity}); retry after the Retry-After interval", rid,
                        headers={"Retry-After": str(st.pool.retry_after())}))
                chunks, total = [], 0
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body = msg.get("body", b"")
                    total += len(body)
                    if total > limit:
                        st.metrics.rejected.labels("payload_too_large").inc()
                        return await respond(error_body(413, "payload_too_large",
                                                        f"request body exceeds the limit of {limit:,} bytes", rid))
                    chunks.append(body)
                    if not msg.get("more_body", False):
                        break
                buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

                async def replay():
                    if buffered:
                        return buffered.pop()
                    return await receive()

                return await self.app(scope, replay, send_wrapper)
            return await self.app(scope, receive, send_wrapper)
        finally:
            dt = time.perf_counter() - t0
            status = status_holder["status"]
            st.metrics.latency.labels(label).observe(dt)
            st.metrics.requests.labels(label, str(status)).inc()
            if label not in ("/metrics", "/healthz", "/readyz", "/static"):
                log.info("request %s %s %s -> %d in %.1f ms", rid, method, label, status, dt * 1000)


# ------------------------------------------------------------------------------------------------ app
def create_app(bundle: str | Path | None = None, config: ServiceConfig | None = None, *, predictor=None,
               analyzer: Analyzer | None = None, warm_in_background: bool = False, warmup: bool = True) -> FastAPI:
    """Build the app. Give a bundle path (loaded at startup), or a ready ``predictor`` / ``analyzer``.

    ``warm_in_background``: start serving /healthz at once and report /readyz 503 until the model is
    loaded and warmed (for ``dermfusion serve``); otherwise startup waits for it (tests).
    """
    config = config or ServiceConfig()
    metrics = Metrics()
    state = ServiceState(config=config, metrics=metrics,
                         pool=InferencePool(config.workers.workers, config.workers.queue_size,
                                            config.workers.queue_timeout_s),
                         bundle_path=Path(bundle) if bundle else None, analyzer=analyzer)
    state.key_digests = [_digest(k) for k in config.auth.api_keys if k]

    def load() -> None:
        try:
            if config.workers.torch_threads:
                import torch
                torch.set_num_threads(config.workers.torch_threads)
            _ensure_audit(state)
            if state.analyzer is None:
                pred = predictor
                if pred is None:
                    if state.bundle_path is None:
                        raise ValueError("create_app needs a bundle, a predictor or an analyzer")
                    pred = _load_predictor(state.bundle_path, config.device)
                state.analyzer = Analyzer(pred, config)
            an = state.analyzer
            ref = read_reference_stats(an.bundle.path) if an.bundle.path else None
            state.drift = DriftMonitor(ref, config.drift.window, config.drift.min_samples)
            ref_ = an.model_ref
            metrics.model_info.labels(ref_["name"], ref_["version"], ref_["hash"][:16], ref_["task"]).set(1)
            if warmup:
                secs = an.warmup()
                log.info("model %s (%s) loaded and warmed in %.2f s", ref_["name"], ref_["hash"][:12], secs)
            else:
                an.ready = True
            state.ready, state.status, state.detail = True, "ready", None
            metrics.ready.set(1)
        except Exception as e:  # noqa: BLE001 — reported by /readyz instead of killing the process
            state.ready, state.status, state.detail = False, "error", f"{type(e).__name__}: {e}"
            log.error("model could not be loaded: %s", state.detail)
            if not warm_in_background:
                raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        if warm_in_background:
            app.state.loader = loop.run_in_executor(None, load)
        else:
            await loop.run_in_executor(None, load)
        try:
            yield
        finally:
            state.pool.shutdown()
            if state.audit is not None:
                state.audit.close()

    app = FastAPI(title="dermfusion triage API", version=__version__, lifespan=lifespan,
                  description="Multi-modal skin-lesion decision support: clinical and/or dermoscopic image + "
                              "metadata → calibrated differential, risk score, triage action, explanations. "
                              + config.disclaimer,
                  responses={401: {"model": ErrorResponse}, 500: {"model": ErrorResponse}})
    app.state.svc = state
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=[config.auth.header, "Content-Type", "X-Request-ID"])
    app.add_middleware(ServiceMiddleware, state=state)
    _install_handlers(app, state)
    api_key = APIKeyHeader(name=config.auth.header, auto_error=False,
                           description="required when the service is configured with API keys")

    # --------------------------------------------------------------------------------- routes
    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["operations"])
    async def readyz():
        """Readiness: model loaded and warmed, audit store reachable."""
        if not state.ready:
            return JSONResponse({"status": state.status, "ready": False, "detail": state.detail}, status_code=503)
        if config.audit.required and (state.audit is None or not await asyncio.to_thread(state.audit.ping)):
            return JSONResponse({"status": "degraded", "ready": False, "detail": "audit store unreachable"},
                                status_code=503)
        return {"status": "ready", "ready": True}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_endpoint():
        """Prometheus metrics."""
        metrics.in_flight.set(state.pool.pending)
        if state.drift.enabled:
            metrics.drift_window.set(len(state.drift.window))
            for name, d in state.drift.current().items():
                metrics.drift.labels(name).set(d["psi"])
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/model", response_model=ModelInfo, tags=["analysis"], dependencies=[Security(api_key)],
             responses={503: {"model": ErrorResponse}})
    async def model_info():
        """The loaded model: task, classes, version, calibration, thresholds."""
        an = _analyzer(state)
        task = an.task
        return {
            "model": an.model_ref, "task": task.name, "task_description": task.description,
            "classes": list(task.classes),
            "class_names": {c: class_name(task, c) for c in task.classes},
            "malignant": sorted(task.malignant), "modalities": an.modalities,
            "metadata_fields": an.metadata_fields, "concepts": an.concepts,
            "calibration": an.calibration, "calibrated": an.calibrated,
            "thresholds": config.triage.model_dump(), "uncertainty": config.uncertainty.model_dump(),
            "limits": {k: v for k, v in config.limits.model_dump().items()},
            "explanations": an.can_explain, "drift_reference": state.drift.enabled,
            "auth_required": bool(state.key_digests), "backends": an.backends, "disclaimer": config.disclaimer,
        }

    card_responses = {200: {"content": {"application/json": {}, "text/html": {}, "text/markdown": {}},
                            "description": "the model card (JSON by default)"},
                      404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    @app.get("/v1/model-card", tags=["analysis"], dependencies=[Security(api_key)], responses=card_responses)
    async def model_card(format: str = Query("json", pattern="^(json|html|md)$",
                                             description="json (default), html (a self-contained page) or md")):
        """The model card of the served model: details, intended use, training data, metrics with 95% CIs,
        subgroups, label provenance, covariate shift, calibration, known failure modes — each with its source.
        The bundle's stored card (written by `dermfusion train` / `dermfusion card`), else one built from the
        bundle alone; a fold ensemble shows its first bundle's card and says how many it averages."""
        card = await asyncio.to_thread(_model_card, state)
        if format == "json":
            return JSONResponse(card)
        from ..evaluation.model_card import render_html, render_markdown

        if format == "md":
            return Response(render_markdown(card), media_type="text/markdown; charset=utf-8")
        return Response(render_html(card), media_type="text/html; charset=utf-8")

    @app.get("/v1/model-card.html", tags=["analysis"], dependencies=[Security(api_key)],
             response_class=Response, responses=card_responses)
    async def model_card_html():
        """The model card as one self-contained HTML page (same as ``/v1/model-card?format=html``)."""
        return await model_card("html")

    @app.post("/v1/analyze", response_model=AnalyzeResponse, tags=["analysis"], dependencies=[Security(api_key)],
              responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                         415: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                         503: {"model": ErrorResponse, "description": "busy (Retry-After) or not ready"}})
    async def analyze(
        request: Request,
        clinical: Optional[UploadFile] = File(None, description="clinical close-up photo (JPEG, PNG, WebP, TIFF)"),
        dermoscopic: Optional[UploadFile] = File(None, description="dermoscopic photo (JPEG, PNG, WebP, TIFF)"),
        metadata: Optional[str] = Form(None, description=(
            'JSON object, every field optional: {"age": 0–120, "sex": "female"|"male", "skin_tone": 0–5, '
            '"site": one of the canonical sites, "concepts": {"clinical": {name: score 0–1}, "dermoscopic": {…}}}')),
        explain: bool = Query(True, description="compute heat maps (slower)"),
    ):
        """Analyse one lesion: at least one image; metadata optional."""
        rid = request.state.request_id
        an = _analyzer(state)
        form = await request.form()
        unknown = sorted(set(form.keys()) - FORM_FIELDS)
        if unknown:
            raise InputError(422, "unknown_field", f"unknown form field(s) {', '.join(repr(u[:40]) for u in unknown)}; "
                             "expected 'clinical', 'dermoscopic' (image files) and 'metadata' (JSON)", unknown[0][:40])
        uploads: dict[str, Upload] = {}
        for modality, up in (("clinical", clinical), ("dermoscopic", dermoscopic)):
            if up is None:
                continue
            uploads[modality] = await _read_upload(modality, up, config)
        meta = _parse_metadata(metadata)
        if not uploads:
            raise InputError(400, "no_image", "no image: upload at least one image file as form field "
                             + " or ".join(f"'{m}'" for m in MODALITIES)
                             + (f" (this model uses {' and '.join(an.modalities)} images)" if an.modalities else ""))
        t_req = request.state.t0
        client = getattr(request.state, "client", None)

        def work():
            analysis = an.analyze(uploads, meta, request_id=rid, explain=explain, client=client)
            t = time.perf_counter()
            stored = _store_images(config, rid, analysis.images) if analysis.images else False
            analysis.audit["images_stored"] = stored
            analysis.audit["latency_ms"] = (time.perf_counter() - t_req) * 1000
            _write_audit(state, analysis.audit)
            analysis.response["timings_ms"]["audit_ms"] = round((time.perf_counter() - t) * 1000, 2)
            return analysis

        analysis, waited = await state.pool.run(work)
        resp = analysis.response
        resp["timings_ms"]["queue_ms"] = round(waited * 1000, 2)
        resp["timings_ms"]["total_ms"] = round((time.perf_counter() - t_req) * 1000, 2)
        metrics.queue_wait.observe(waited)
        metrics.inference.observe(resp["timings_ms"].get("analysis_ms", 0) / 1000)
        metrics.predictions.labels(resp["primary_diagnosis"]["code"]).inc()
        metrics.actions.labels(resp["action"]).inc()
        metrics.confidence.observe(resp["uncertainty"]["top_probability"])
        metrics.risk.observe(resp["risk_score"])
        if resp["review_recommended"]:
            metrics.reviews.inc()
        state.drift.observe(analysis.observation)
        return resp

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(WEB_DIR)), name="static")
    return app


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory dermfusion.service.app:app_from_env`` (or gunicorn):
    DERMFUSION_BUNDLE (required) and DERMFUSION_SERVICE_CONFIG (optional service.yaml)."""
    import os

    from .config import load_service_config

    bundle = os.environ.get("DERMFUSION_BUNDLE")
    if not bundle:
        raise RuntimeError("set DERMFUSION_BUNDLE to the bundle directory to serve")
    return create_app(bundle, load_service_config(os.environ.get("DERMFUSION_SERVICE_CONFIG") or None),
                      warm_in_background=True)


# ------------------------------------------------------------------------------------------ helpers
def _load_predictor(path: Path, device: str):
    from ..inference.bundle import BundleError, load_predictor

    p = Path(path)
    if (p / "config.yaml").exists():
        kw = {"device": device} if _kind(p) == "network" else {}
        return load_predictor(p, **kw)
    summary = p / "summary.json"
    if summary.exists():  # a run directory: its fold bundles, averaged
        from ..inference.loaders import AveragePredictor

        bundles = [p / b for b in json.loads(summary.read_text()).get("bundles", [])]
        preds = [load_predictor(b, **({"device": device} if _kind(b) == "network" else {})) for b in bundles]
        if not preds:
            raise BundleError(f"{p}: run directory lists no bundles")
        return preds[0] if len(preds) == 1 else AveragePredictor(preds)
    if (p / "bundle" / "config.yaml").exists():
        return _load_predictor(p / "bundle", device)
    raise BundleError(f"{p} is neither a bundle nor a run directory")


def _kind(path: Path) -> str:
    import yaml
    return (yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}).get("kind", "")


def _analyzer(state: ServiceState) -> Analyzer:
    if not state.ready or state.analyzer is None:
        raise InputError(503, "not_ready", "the model is still loading; retry shortly"
                         if state.status != "error" else f"the model failed to load ({state.detail})")
    return state.analyzer


def _model_card(state: ServiceState) -> dict:
    """The served model's card, built once (files only: cheap, but not per request)."""
    if state.model_card is None:
        from ..evaluation.model_card import card_for_service

        an = _analyzer(state)
        served = getattr(an.bundle, "path", None)
        members = [m.bundle.path for m in getattr(an.predictor, "members", None) or []
                   if getattr(getattr(m, "bundle", None), "path", None)]
        if not served and not members:
            raise InputError(404, "no_model_card", "the served model has no bundle directory to describe")
        state.model_card = card_for_service(Path(served) if served else None, members)
    return state.model_card


def _ensure_audit(state: ServiceState):
    if state.audit is None:
        from .audit import AuditStore
        try:
            state.audit = AuditStore(state.config.audit.db_url)
            log.info("audit store: %s", state.audit.describe())
        except Exception as e:  # noqa: BLE001
            log.error("audit store unavailable: %s", type(e).__name__)
            if state.config.audit.required:
                raise AuditUnavailable("the audit store cannot be reached") from None
    return state.audit


def _write_audit(state: ServiceState, record: dict) -> None:
    try:
        store = _ensure_audit(state)
        if store is not None:
            store.write(record)
    except Exception as e:  # noqa: BLE001
        log.error("audit write failed for request %s: %s", record.get("request_id"), type(e).__name__)
        if state.config.audit.required:
            raise AuditUnavailable("the analysis could not be recorded in the audit trail, so no result is "
                                   "returned; retry shortly") from None


def _store_images(config: ServiceConfig, rid: str, images: dict) -> bool:
    d = Path(config.audit.image_dir).expanduser() / datetime.utcnow().strftime("%Y%m%d")
    d.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp"}
    for m, (data, fmt) in images.items():
        (d / f"{rid}_{m}.{ext.get(fmt, 'bin')}").write_bytes(data)
    return True


async def _read_upload(modality: str, up: UploadFile, config: ServiceConfig) -> Upload:
    lim = config.limits
    ctype = (up.content_type or "").split(";")[0].strip().lower()
    if ctype not in lim.allowed_content_types:
        raise InputError(415, "unsupported_media_type",
                         f"{modality} image: content type {ctype or 'none'!r} is not accepted; send one of "
                         f"{', '.join(lim.allowed_content_types)}", modality)
    data = await up.read(lim.max_upload_bytes + 1)
    if len(data) > lim.max_upload_bytes:
        raise InputError(413, "payload_too_large",
                         f"{modality} image is larger than the limit of {lim.max_upload_bytes:,} bytes", modality)
    return Upload(modality, data, ctype)


def _parse_metadata(raw: str | None) -> PatientMetadata:
    if raw is None or not raw.strip():
        return PatientMetadata()
    if len(raw) > MAX_METADATA_CHARS:
        raise InputError(422, "invalid_metadata", f"metadata is longer than {MAX_METADATA_CHARS} characters", "metadata")
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(422, "invalid_metadata", f"metadata is not valid JSON ({e.msg} at position {e.pos})",
                         "metadata") from None
    if not isinstance(obj, dict):
        raise InputError(422, "invalid_metadata", "metadata must be a JSON object, e.g. {\"age\": 55, \"site\": \"trunk\"}",
                         "metadata")
    try:
        return PatientMetadata.model_validate(obj)
    except ValidationError as e:
        details = _clean_errors(e.errors())
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise InputError(422, "invalid_metadata", f"invalid metadata — {summary}", "metadata", details) from None


def _clean_errors(errors) -> list[dict]:
    """Pydantic errors without the offending input echoed back (it may be anything)."""
    out = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",))
        msg = e.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        out.append({"field": loc or "metadata", "message": msg, "type": e.get("type", "")})
    return out


def _install_handlers(app: FastAPI, state: ServiceState) -> None:
    m = state.metrics

    def rid(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        m.rejected.labels(exc.code).inc()
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        return error_body(exc.status, exc.code, exc.message, rid(request), exc.field, exc.details, headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        m.rejected.labels("overloaded").inc()
        return error_body(503, "overloaded", str(exc), rid(request), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(AuditUnavailable)
    async def _audit(request: Request, exc: AuditUnavailable):
        m.rejected.labels("audit_unavailable").inc()
        return error_body(503, "audit_unavailable", str(exc), rid(request), headers={"Retry-After": "10"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        m.rejected.labels("invalid_request").inc()
        details = _clean_errors(exc.errors())
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return error_body(422, "invalid_request", f"invalid request — {summary}", rid(request), details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}.get(exc.status_code,
                                                                                    f"http_{exc.status_code}")
        m.rejected.labels(code).inc()
        return error_body(exc.status_code, code, str(exc.detail), rid(request), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        m.rejected.labels("internal_error").inc()
        log.error("internal error in request %s: %s", rid(request), type(exc).__name__, exc_info=exc)
        return error_body(500, "internal_error", "internal error; the request id identifies it in the server log",
                          rid(request))
