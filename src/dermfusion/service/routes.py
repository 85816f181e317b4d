"""The API's routes: operations (``/healthz``, ``/readyz``, ``/metrics``), the model and its card (``/v1/model``,
``/v1/model-card``), the analysis (``POST /v1/analyze``) and the clinician page (``/``)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

from ..card import render_html, render_markdown
from ..tasks import MODALITIES
from .guards import Ticket, request_id_claim, run_within
from .inputs import InputError, Upload
from .requests import check_form, parse_metadata, read_upload
from .schemas import AnalyzeResponse, ErrorResponse, Health, ModelInfo, known_concepts
from .lifecycle import run_unreturned
from .state import ServiceState, current_deployment, ready_analyzer, served_model_card, store_images, write_audit
from ..clinical.triage import CANNOT_ASSESS, class_name

WEB_DIR = Path(__file__).parent / "web"


def add_routes(app: FastAPI, state: ServiceState) -> None:
    config, metrics = state.config, state.metrics
    api_key = APIKeyHeader(name=config.auth.header, auto_error=False, description="this service's API key")
    auth = [Security(api_key)] if state.keys else []  # declared in OpenAPI only when it is enforced

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["operations"])
    async def readyz():
        """Readiness: model loaded and warmed, and the audit store takes a write (a committed probe row).
        ``warnings``: e.g. a fast inference backend that failed at start-up."""
        warnings = list(state.analyzer.model_pass.backend_warnings) if state.analyzer is not None else []
        if state.registry is not None and state.registry.error:  # a registry change that could not be applied
            warnings.append(state.registry.error)
        if not state.ready:
            return JSONResponse({"status": state.status, "ready": False, "detail": state.detail,
                                 "warnings": warnings}, status_code=503)
        writable, why = await asyncio.to_thread(state.audit_keeper.check)
        metrics.audit_writable.set(1 if writable else 0)
        if config.audit.required and not writable:
            return JSONResponse({"status": "degraded", "ready": False, "detail": why, "warnings": warnings},
                                status_code=503)
        return {"status": "ready", "ready": True, "warnings": warnings + ([why] if why else [])}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_endpoint():
        """Prometheus metrics."""
        metrics.in_flight.set(state.pool.pending)
        if state.drift.enabled:
            metrics.drift_window.set(len(state.drift.window))
            for name, d in state.drift.current().items():
                metrics.drift.labels(name).set(d["psi"])
        mix = state.case_mix.estimate() if state.case_mix is not None else None
        if state.case_mix is not None:
            metrics.case_mix_window.set(len(state.case_mix.window))
        if mix is not None:
            metrics.case_mix_shift.set(mix["shift"])
            for c, v in mix["prior"].items():
                metrics.case_mix.labels(c).set(v)
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/model", response_model=ModelInfo, tags=["analysis"], dependencies=auth,
             responses={503: {"model": ErrorResponse}})
    async def model_info():
        """The loaded model: task, classes, version, calibration, thresholds."""
        an = ready_analyzer(state)
        task = an.task
        return {
            "model": an.model_ref, "task": task.name, "task_description": task.description,
            "classes": list(task.classes),
            "class_names": {c: class_name(task, c) for c in task.classes},
            "malignant": sorted(task.malignant), "modalities": an.modalities,
            "metadata_fields": an.metadata_fields, "concepts": an.concepts,
            "calibration": an.calibration, "calibrated": an.calibrated,
            "thresholds": {**an.engine.rules.operating_point_info(),
                           "override_out_of_fold": an.override_out_of_fold},
            "decisions": an.engine.rules.describe(),
            "uncertainty": config.uncertainty.model_dump(),
            "quality": an.gate.describe(),
            "limits": {k: v for k, v in config.limits.model_dump().items()},
            "explanations": an.can_explain, "drift_reference": state.drift.enabled,
            "auth_required": bool(state.keys), "backends": an.backends, "disclaimer": config.disclaimer,
        }

    card_responses = {200: {"content": {"application/json": {}, "text/html": {}, "text/markdown": {}},
                            "description": "the model card (JSON by default)"},
                      404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    @app.get("/v1/model-card", tags=["analysis"], dependencies=auth, responses=card_responses)
    async def model_card(format: str = Query("json", pattern="^(json|html|md)$",
                                             description="json (default), html (a self-contained page) or md")):
        """The model card of the served model: details, intended use, training data, metrics with 95% CIs,
        subgroups, label provenance, covariate shift, calibration, known failure modes — each with its source.
        The bundle's stored card (written by `dermfusion train` / `dermfusion card`), else one built from the
        bundle alone; a fold ensemble shows its first bundle's card and says how many it averages."""
        card = await asyncio.to_thread(served_model_card, state)
        if format == "json":
            return JSONResponse(card)
        if format == "md":
            return Response(render_markdown(card), media_type="text/markdown; charset=utf-8")
        return Response(render_html(card), media_type="text/html; charset=utf-8")

    @app.get("/v1/model-card.html", tags=["analysis"], dependencies=auth,
             response_class=Response, responses=card_responses)
    async def model_card_html():
        """The model card as one self-contained HTML page (same as ``/v1/model-card?format=html``)."""
        return await model_card("html")

    one_image = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "anyOf": [{"required": ["clinical"]}, {"required": ["dermoscopic"]}],
        "description": "at least one of the image files 'clinical' and 'dermoscopic'; each field at most once"}}}}}

    @app.post("/v1/analyze", response_model=AnalyzeResponse, tags=["analysis"], dependencies=auth,
              openapi_extra=one_image,
              form_limits={"max_files": 16, "max_fields": 16, "max_part_size": config.limits.max_request_bytes},
              responses={400: {"model": ErrorResponse}, 408: {"model": ErrorResponse},
                         409: {"model": ErrorResponse, "description": "X-Request-ID already used"},
                         413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                         503: {"model": ErrorResponse, "description": "busy, over the time budget (Retry-After) "
                                                                     "or not ready"}})
    async def analyze(
        request: Request,
        clinical: Optional[UploadFile] = File(None, description="clinical close-up photo (JPEG, PNG, WebP, TIFF)"),
        dermoscopic: Optional[UploadFile] = File(None, description="dermoscopic photo (JPEG, PNG, WebP, TIFF)"),
        metadata: Optional[str] = Form(None, description=(
            'JSON object, every field optional: {"age": 0–120, "sex": "female"|"male", "skin_tone": 0–5, '
            '"site": one of the canonical sites, "elevation": "flat"|"palpable"|"nodular", '
            '"concepts": {"clinical": {name: score 0–1}, "dermoscopic": {…}}}')),
        explain: bool = Query(True, description="compute heat maps (slower)"),
    ):
        """Analyse one lesion: at least one image; metadata optional."""
        rid = request.state.request_id
        answer, unreturned = current_deployment(state).route(rid)  # one reference for the whole request
        an = answer.analyzer
        check_form(await request.form())  # parsed already (cached): only known fields, each at most once
        uploads: dict[str, Upload] = {}
        for modality, up in (("clinical", clinical), ("dermoscopic", dermoscopic)):
            if up is None:
                continue
            uploads[modality] = await read_upload(modality, up, config)
        meta = parse_metadata(metadata, known_concepts(an.concepts))
        if not uploads:
            raise InputError(400, "no_image", "no image: upload at least one image file as form field "
                             + " or ".join(f"'{m}'" for m in MODALITIES)
                             + (f" (this model uses {' and '.join(an.modalities)} images)" if an.modalities else ""))
        t_req = request.state.t0
        client = getattr(request.state, "client", None)

        ticket = Ticket()

        def work():
            if ticket.abandoned:  # a worker came free only after the budget was spent
                return None
            analysis = an.analyze(uploads, meta, request_id=rid, explain=explain, client=client)
            if not ticket.commit():  # the client has its 503 already: record nothing
                return None
            t = time.perf_counter()
            stored = store_images(config, rid, analysis.images) if analysis.images else []  # no metadata, 0600
            analysis.audit.update(images_stored=bool(stored), image_files=stored or None)
            analysis.audit["latency_ms"] = (time.perf_counter() - t_req) * 1000
            analysis.audit.update(registry_version=answer.version, model_role=answer.role)  # who answered
            write_audit(state, analysis.audit)
            analysis.response["timings_ms"]["audit_ms"] = round((time.perf_counter() - t) * 1000, 2)
            run_unreturned(state, unreturned, uploads, meta, rid)  # shadow / the promoted one under a canary
            return analysis

        budget = config.workers.request_timeout_s
        async with request_id_claim(state, rid, getattr(request.state, "request_id_supplied", False)):
            analysis, waited = await run_within(state.pool, work, ticket, budget - (time.perf_counter() - t_req),
                                                budget)
        resp = analysis.response
        resp["model"].update(registry_version=answer.version, role=answer.role)
        metrics.answers.labels(answer.version or "none", answer.role or "none").inc()
        resp["timings_ms"]["queue_ms"] = round(waited * 1000, 2)
        resp["timings_ms"]["total_ms"] = round((time.perf_counter() - t_req) * 1000, 2)
        metrics.queue_wait.observe(waited)
        metrics.inference.observe(resp["timings_ms"].get("analysis_ms", 0) / 1000)
        metrics.actions.labels(resp["action"]).inc()
        metrics.analyses.inc()
        if resp["action"] == CANNOT_ASSESS:  # counted by reason; kept out of the prediction and drift figures
            for reason in sorted({r["code"] for r in resp["quality"]["reasons"]}):
                metrics.cannot_assess.labels(reason).inc()
        else:
            metrics.predictions.labels(resp["primary_diagnosis"]["code"]).inc()
            metrics.confidence.observe(resp["uncertainty"]["top_probability"])
            if resp["uncertainty"]["top_probability"] < config.uncertainty.min_top_probability:
                metrics.low_confidence.inc()
            metrics.risk.observe(resp["risk_score"])
            if resp["review_recommended"]:
                metrics.reviews.inc()
            state.drift.observe(analysis.observation)
            if state.case_mix is not None and an is state.analyzer:  # the promoted model's posteriors only:
                state.case_mix.observe(analysis.posterior)             # its prior is what the estimate is against
        return resp

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(WEB_DIR)), name="static")
