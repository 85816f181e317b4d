"""The ASGI middleware in front of every route: request id, authentication and the body-size cap *before* a body
is read, admission of analyses (at most ``workers + queue_size`` in; beyond, a cheap 503 + Retry-After before the
body is read), the body's arrival within the request's time budget (else 408), latency / status metrics and a
privacy-safe log line."""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid

from fastapi.responses import Response

from .docs import with_security_headers
from .metrics import endpoint_label
from .state import ServiceState, digest, error_body, key_fingerprint

log = logging.getLogger("dermfusion.service")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


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
        supplied = bool(_REQUEST_ID.match(rid))
        rid = rid if supplied else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        scope["state"]["request_id_supplied"] = supplied  # a client's id must be new (routes: 409 on reuse)
        scope["state"]["t0"] = t0
        path, method = scope.get("path", ""), scope.get("method", "GET")
        label = endpoint_label(path)
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = with_security_headers(list(message["headers"]) + [(b"x-request-id", rid.encode())],
                                                           path)
            await send(message)

        async def respond(resp: Response):
            await resp(scope, receive, send_wrapper)

        try:
            protected = path.startswith("/v1/") or (path == "/metrics" and cfg.auth.protect_metrics)
            if protected and st.key_digests and method != "OPTIONS":
                key = headers.get(cfg.auth.header.lower(), "")
                if not key or not any(hmac.compare_digest(digest(key), d) for d in st.key_digests):
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
                            f"optional 'metadata' JSON field (the request's content type is not multipart/form-data)",
                            rid))
                budget = cfg.workers.request_timeout_s
                admitted = path == "/v1/analyze"
                if admitted and not st.pool.try_admit():
                    # refuse before reading anything: under overload a refusal must be cheap — the body is drained
                    # (not kept) so the client reads a 503 + Retry-After instead of a reset connection
                    try:
                        await asyncio.wait_for(_drain(receive), budget)
                    except asyncio.TimeoutError:
                        pass
                    st.metrics.rejected.labels("overloaded").inc()
                    return await respond(error_body(
                        503, "overloaded", f"server busy: {st.pool.admitted} analyses running or queued (limit "
                        f"{st.pool.capacity}); retry after the Retry-After interval", rid,
                        headers={"Retry-After": str(st.pool.retry_after())}))
                try:
                    left = max(0.0, budget - (time.perf_counter() - t0))
                    try:  # the body must arrive within the request's time budget (no slow-loris slot holding)
                        body = await asyncio.wait_for(_read_body(receive, limit), left)
                    except asyncio.TimeoutError:
                        st.metrics.rejected.labels("request_timeout").inc()
                        return await respond(error_body(408, "request_timeout", f"the request body did not arrive "
                                                        f"within {budget:g} s", rid, headers={"Connection": "close"}))
                    if body is None:  # the client went away
                        return
                    if len(body) > limit:
                        st.metrics.rejected.labels("payload_too_large").inc()
                        return await respond(error_body(413, "payload_too_large",
                                                        f"request body exceeds the limit of {limit:,} bytes", rid))
                    buffered = [{"type": "http.request", "body": body, "more_body": False}]

                    async def replay():
                        if buffered:
                            return buffered.pop()
                        return await receive()

                    return await self.app(scope, replay, send_wrapper)
                finally:
                    if admitted:
                        st.pool.leave()
            return await self.app(scope, receive, send_wrapper)
        finally:
            dt = time.perf_counter() - t0
            status = status_holder["status"]
            st.metrics.latency.labels(label).observe(dt)
            st.metrics.requests.labels(label, str(status)).inc()
            if label not in ("/metrics", "/healthz", "/readyz", "/static"):
                log.info("request %s %s %s -> %d in %.1f ms", rid, method, label, status, dt * 1000)


async def _drain(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
            return


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body (None if the client disconnected); stops reading once past ``limit`` (the caller refuses)."""
    chunks, total = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        body = msg.get("body", b"")
        total += len(body)
        chunks.append(body)
        if total > limit or not msg.get("more_body", False):
            return b"".join(chunks)
