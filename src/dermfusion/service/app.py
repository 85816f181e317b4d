"""The FastAPI application: ``create_app(bundle, config)`` — loads the model (in the background for
``dermfusion serve``), wires the middleware, exception handlers and routes.

Endpoints: ``POST /v1/analyze`` · ``GET /v1/model`` · ``GET /v1/model-card`` · ``GET /healthz`` · ``GET /readyz`` ·
``GET /metrics`` · ``GET /`` (clinician page) · ``/docs`` + ``/openapi.json`` · the model lifecycle
(``service.lifecycle``): ``POST /v1/feedback``, ``GET /v1/performance``, ``POST /v1/admin/{promote,rollback,shadow}``.

Safety properties, each enforced in one place:
- bad input is a 4xx JSON error saying what is wrong (``InputError`` / validation handlers), never a 500;
- authentication and the request-size cap run in the ASGI middleware, *before* a body is read;
- inference runs in a bounded thread pool (``pool.InferencePool``): overload → 503 + Retry-After;
- logs carry request ids, status and timings only — never image bytes or metadata values;
- every analysis writes an audit record before the answer is returned (``audit.required``).
"""
from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from .analyzer import Analyzer
from .config import ServiceConfig, load_service_config
from .deployment import Deployment, RegistryWatcher, install
from .docs import add_docs
from .handlers import install_handlers
from .health import AuditKeeper
from .integrity import BundleIntegrityError, verify_predictor, verify_served
from .lifecycle import add_lifecycle_routes
from .metrics import Metrics
from .middleware import ServiceMiddleware
from .pool import InferencePool
from .routes import add_routes
from .schemas import ErrorResponse
from .auth import KeyRing
from .exposure import config_warnings, guarded_h11
from .ratelimit import RateLimiter
from .state import ServiceState, load_served_predictor

log = logging.getLogger("dermfusion.service")


def create_app(bundle: str | Path | None = None, config: ServiceConfig | None = None, *, predictor=None,
               analyzer: Analyzer | None = None, warm_in_background: bool = False, warmup: bool = True,
               registry: str | Path | None = None) -> FastAPI:
    """Build the app. Give a bundle path (loaded at startup), a ready ``predictor`` / ``analyzer``, or a model
    ``registry`` directory (or ``config.registry.dir``): its promoted version answers, its shadow runs beside it.

    ``warm_in_background``: start serving /healthz at once and report /readyz 503 until the model is
    loaded and warmed (for ``dermfusion serve``); otherwise startup waits for it (tests).
    """
    config = config or ServiceConfig()
    metrics = Metrics()
    metrics.low_confidence_cut.set(config.uncertainty.min_top_probability)
    state = ServiceState(config=config, metrics=metrics,
                         pool=InferencePool(config.workers.workers, config.workers.queue_size,
                                            config.workers.queue_timeout_s),
                         bundle_path=Path(bundle) if bundle else None, analyzer=analyzer)
    state.keys = KeyRing.from_config(config.auth)  # salted hashes only; scopes per key (service.auth)
    state.limiter = RateLimiter(config.rate_limits)
    for w in config_warnings(config):  # plain-text keys, images kept forever (serve adds the address's warnings)
        log.warning("%s", w)
    state.audit_keeper = AuditKeeper(state)
    registry = registry or config.registry.dir
    if registry is not None and (bundle or predictor is not None or analyzer is not None):
        raise ValueError("serve either a bundle or a model registry, not both")
    if registry is not None:
        state.registry = RegistryWatcher(state, registry, config.registry.poll_s, warmup=warmup)

    def load() -> None:
        try:
            if config.workers.torch_threads:
                torch.set_num_threads(config.workers.torch_threads)
            state.audit_keeper.start()  # never fatal: retried with backoff while /readyz says why
            if state.registry is not None:
                state.registry.refresh(force=True)  # the promoted (and shadow) version: verified, loaded, warmed
                state.registry.start()
            elif state.analyzer is None:
                pred = predictor
                if pred is None:
                    if state.bundle_path is None:
                        raise ValueError("create_app needs a bundle, a predictor or an analyzer")
                    pred = load_served_predictor(state.bundle_path, config.device)
                state.analyzer = Analyzer(pred, config)
            an = state.analyzer
            if state.registry is None:
                state.integrity = verify_predictor(an.predictor, state.verified)  # the hashes audited = verified
                install(state, Deployment(an))
            ref_ = an.model_ref
            if state.registry is not None:
                pass  # each registry version is warmed when it is loaded (RegistryWatcher.analyzer)
            elif warmup:
                secs = an.warmup()
                log.info("model %s (%s) loaded and warmed in %.2f s", ref_["name"], ref_["hash"][:12], secs)
            else:
                an.ready = True
            for i, name in enumerate(an.backends):
                metrics.backend.labels(str(i), name).set(1)
                metrics.backend_failures.labels(str(i)).set(
                    (an.model_pass.backend_failures or [0] * len(an.backends))[i])
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
        try:  # before anything is loaded or served: tampered files stop the start (uvicorn exits)
            state.verified = await loop.run_in_executor(None, verify_served, state.bundle_path)
        except BundleIntegrityError as e:
            state.ready, state.status, state.detail = False, "error", f"BundleIntegrityError: {e}"
            log.error("refusing to serve: %s", e)
            raise
        if warm_in_background:
            app.state.loader = loop.run_in_executor(None, load)
        else:
            await loop.run_in_executor(None, load)
        try:
            yield
        finally:
            state.pool.shutdown()
            state.audit_keeper.close()
            if state.registry is not None:
                state.registry.close()

    app = FastAPI(title="dermfusion triage API", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Multi-modal skin-lesion decision support: clinical and/or dermoscopic image + "
                              "metadata → calibrated differential, risk score, triage action, explanations. "
                              + config.disclaimer,
                  responses={401: {"model": ErrorResponse}, 500: {"model": ErrorResponse}})
    app.state.svc = state
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=[config.auth.header, "Content-Type", "X-Request-ID"])
    app.add_middleware(ServiceMiddleware, state=state)
    install_handlers(app, state)
    add_routes(app, state)
    add_lifecycle_routes(app, state)  # feedback, performance, admin (promote / shadow / rollback)
    add_docs(app, app.title)  # Swagger UI from the package, not a CDN
    state.routes = app.router.routes  # the middleware refuses an unknown route before reading its body
    return app


def server_options(config: ServiceConfig) -> dict:
    """uvicorn settings for ``dermfusion serve`` (and tests that start a real server): its own connection cap
    (a bare 503 without Retry-After, body unread) sits far above the service's admission limit
    (``workers + queue_size``), so a busy client gets the service's drained 503 + Retry-After, not a reset; an idle
    keep-alive connection closes after ``workers.keep_alive_s`` and a request head must arrive within
    ``workers.header_timeout_s`` (``exposure.guarded_h11``), so idle or trickling sockets cannot fill that cap."""
    w = config.workers
    return {"timeout_keep_alive": w.keep_alive_s, "backlog": w.backlog, "http": guarded_h11(w.header_timeout_s),
            "limit_concurrency": max(w.max_connections, 4 * (w.workers + w.queue_size))}


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory dermfusion.service.app:app_from_env`` (or gunicorn):
    DERMFUSION_BUNDLE or DERMFUSION_REGISTRY (or ``registry.dir`` in the config), and DERMFUSION_SERVICE_CONFIG
    (optional service.yaml)."""
    bundle, registry = os.environ.get("DERMFUSION_BUNDLE"), os.environ.get("DERMFUSION_REGISTRY")
    config = load_service_config(os.environ.get("DERMFUSION_SERVICE_CONFIG") or None)
    if not bundle and not registry and not config.registry.dir:
        raise RuntimeError("set DERMFUSION_BUNDLE to the bundle directory to serve (or DERMFUSION_REGISTRY)")
    return create_app(bundle or None, config, warm_in_background=True, registry=registry or None)
