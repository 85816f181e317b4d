"""The ASGI middleware in front of every route. In this order, each decided from the request head alone — before a
byte of the body is read:

1. the request id: a client's ``X-Request-ID`` must be 8–64 safe characters (else 400 ``invalid_request_id``; it
   names an audit row, so it is never silently replaced);
2. the route: an unknown path is a 404, a known path with another method a 405 (``Connection: close`` when a body
   was announced, so it is never read);
3. who is asking (``auth``): the key's id and scopes — 401 without a valid key, 403 when its scopes do not grant
   the route, 403 ``auth_not_configured`` for feedback / performance / admin when the service has no keys;
4. per-key rate limits and the daily quota (``ratelimit``): 429 + Retry-After;
5. the route's body limit (analysis: ``limits.max_request_bytes``; JSON routes: ``limits.max_json_bytes``; other
   routes: no body) and content type;
6. admission of analyses (at most ``workers + queue_size`` in; beyond, a drained 503 + Retry-After).

Then the body is read within the request's time budget (else 408); a JSON body naming a key twice is a 422. Also:
latency / status metrics and a privacy-safe log line (request id, endpoint, status, time — never inputs).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from fastapi.responses import Response
from starlette.routing import Match

from .auth import needs_keys, presented_key, required_scopes
from .docs import with_security_headers
from .metrics import endpoint_label
from .requests import DuplicateKey, strict_json_loads
from .state import ServiceState, error_body

log = logging.getLogger("dermfusion.service")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
ANALYZE = "/v1/analyze"
_BODY_METHODS = ("POST", "PUT", "PATCH")


def body_limit(path: str, method: str, limits) -> int:
    """The most body bytes this route reads: an analysis' images, a JSON route's few fields, or none."""
    if path == ANALYZE:
        return limits.max_request_bytes
    if method in _BODY_METHODS:
        return limits.max_json_bytes
    return 0


def match_route(routes, scope) -> Match:
    """FULL when a route takes this path and method, PARTIAL when only the path is known, NONE otherwise."""
    best = Match.NONE
    for route in routes:
        m, _ = route.matches(scope)
        if m == Match.FULL:
            return m
        if m == Match.PARTIAL:
            best = m
    return best


class ServiceMiddleware:
    """Request id, route, key and scopes, rate limits, body limits, admission, metrics and the log line."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, cfg = self.state, self.state.config
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        valid = bool(_REQUEST_ID.match(given))
        rid = given if valid else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        scope["state"]["request_id_supplied"] = valid  # a client's id must be new (routes: 409 on reuse)
        scope["state"]["t0"] = t0
        path, method = scope.get("path", ""), scope.get("method", "GET")
        label = endpoint_label(path)
        status_holder = {"status": 500}
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = -1
        # a body was announced: an early refusal closes the connection instead of reading (or draining) it
        close = {"Connection": "close"} if declared or "transfer-encoding" in headers else {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = with_security_headers(list(message["headers"]) + [(b"x-request-id", rid.encode())],
                                                           path)
            await send(message)

        async def refuse(status: int, code: str, message: str, headers: dict | None = None):
            st.metrics.rejected.labels(code).inc()
            resp = error_body(status, code, message, rid, headers={**close, **(headers or {})})
            await resp(scope, receive, send_wrapper)

        try:
            if given and not valid:
                return await refuse(400, "invalid_request_id", "X-Request-ID must be 8–64 characters of letters, "
                                    "digits, '.', '_' or '-' (or left out: the service makes one)")
            if declared < 0:
                return await refuse(400, "bad_request", "the Content-Length header is not a number")
            routes = st.routes
            if routes is not None:
                found = match_route(routes, scope)
                if found == Match.NONE:
                    return await refuse(404, "not_found", "no such endpoint (see /docs)")
                if found == Match.PARTIAL and not (method == "OPTIONS" and cfg.cors_origins):
                    return await refuse(405, "method_not_allowed", "this endpoint does not take this method")
            required = required_scopes(path)
            if path == "/metrics" and not cfg.auth.protect_metrics:
                required = None
            if method != "OPTIONS" and required is not None:
                if st.keys:
                    key = st.keys.identify(presented_key(headers, cfg.auth.header))
                    if key is None:
                        return await refuse(401, "unauthorized", "missing or invalid API key: send it in the "
                                            f"{cfg.auth.header} header", {"WWW-Authenticate": "ApiKey"})
                    if not key.allows(required):
                        return await refuse(403, "forbidden", "this key's scopes do not include this endpoint "
                                            f"(it needs {' or '.join(sorted(required))})")
                    scope["state"]["client"] = key.id  # the key id, recorded in audit / feedback / history rows
                    scope["state"]["scopes"] = sorted(key.scopes)
                    limited = st.limiter.check(key, analysis=path == ANALYZE) if st.limiter is not None else None
                    if limited is not None:
                        code, message, wait = limited
                        return await refuse(429, code, message, {"Retry-After": str(wait)})
                elif needs_keys(path):
                    return await refuse(403, "auth_not_configured", "this endpoint needs named API keys with the "
                                        f"{' or '.join(sorted(required))} scope (auth.keys): without keys nobody could "
                                        "be held to it, so the service only analyses")
            limit = body_limit(path, method, cfg.limits)
            if declared > limit:
                return await refuse(413, "payload_too_large", f"request body of {declared:,} bytes exceeds this "
                                    f"endpoint's limit of {limit:,}")
            if method not in _BODY_METHODS:
                return await self.app(scope, receive, send_wrapper)
            ctype = headers.get("content-type", "").lower()
            if path == ANALYZE and not ctype.startswith("multipart/form-data"):
                return await refuse(415, "unsupported_media_type", "send multipart/form-data with image file fields "
                                    "'clinical' and/or 'dermoscopic' and an optional 'metadata' JSON field (the "
                                    "request's content type is not multipart/form-data)")
            if path != ANALYZE and declared and not _is_json(ctype):
                return await refuse(415, "unsupported_media_type", "send a JSON body (Content-Type: application/json)")
            budget = cfg.workers.request_timeout_s
            admitted = path == ANALYZE
            if admitted and not st.pool.try_admit():
                # refuse before reading anything: under overload a refusal must be cheap — the body is drained
                # (not kept) so the client reads a 503 + Retry-After instead of a reset connection
                try:
                    await asyncio.wait_for(_drain(receive), budget)
                except asyncio.TimeoutError:
                    pass
                st.metrics.rejected.labels("overloaded").inc()
                resp = error_body(503, "overloaded", f"server busy: {st.pool.admitted} analyses running or queued "
                                  f"(limit {st.pool.capacity}); retry after the Retry-After interval", rid,
                                  headers={"Retry-After": str(st.pool.retry_after())})
                return await resp(scope, receive, send_wrapper)
            try:
                left = max(0.0, budget - (time.perf_counter() - t0))
                try:  # the body must arrive within the request's time budget (no slow-loris slot holding)
                    body = await asyncio.wait_for(_read_body(receive, limit), left)
                except asyncio.TimeoutError:
                    return await refuse(408, "request_timeout", f"the request body did not arrive within "
                                        f"{budget:g} s", {"Connection": "close"})
                if body is None:  # the client went away
                    return
                if len(body) > limit:
                    return await refuse(413, "payload_too_large", f"request body exceeds this endpoint's limit of "
                                        f"{limit:,} bytes")
                if path != ANALYZE and body:
                    if not _is_json(ctype):
                        return await refuse(415, "unsupported_media_type", "send a JSON body (Content-Type: "
                                            "application/json)")
                    try:
                        strict_json_loads(body)
                    except DuplicateKey:
                        return await refuse(422, "duplicate_key", "the JSON body names a key more than once; send "
                                            "each key once")
                    except (ValueError, RecursionError):
                        pass  # malformed JSON: the route's validation answers 422 invalid_request
                buffered = [{"type": "http.request", "body": body, "more_body": False}]

                async def replay():
                    if buffered:
                        return buffered.pop()
                    return await receive()

                return await self.app(scope, replay, send_wrapper)
            finally:
                if admitted:
                    st.pool.leave()
        finally:
            dt = time.perf_counter() - t0
            status = status_holder["status"]
            st.metrics.latency.labels(label).observe(dt)
            st.metrics.requests.labels(label, str(status)).inc()
            if label not in ("/metrics", "/healthz", "/readyz", "/static"):
                log.info("request %s %s %s -> %d in %.1f ms", rid, method, label, status, dt * 1000)


def _is_json(ctype: str) -> bool:
    base = ctype.split(";")[0].strip()
    return base == "application/json" or base.endswith("+json")


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

