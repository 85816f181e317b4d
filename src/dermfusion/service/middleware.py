"""The ASGI middleware in front of every route: request id, authentication and the body-size cap *before* a body
is read, the cheap overload refusal, latency / status metrics and a privacy-safe log line."""
from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from fastapi.responses import Response

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
