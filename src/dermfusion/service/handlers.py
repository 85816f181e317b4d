"""Exception handlers: every failure becomes a JSON error body with a code — 4xx for what the client sent, 503
for overload / audit store / not ready, 500 (logged, never echoed) for bugs."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .docs import SECURITY_HEADERS
from .inputs import InputError
from .pool import Overloaded
from .requests import clean_errors
from .state import AuditUnavailable, ServiceState, error_body

log = logging.getLogger("dermfusion.service")


def install_handlers(app: FastAPI, state: ServiceState) -> None:
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
        details = clean_errors(exc.errors())
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
        # answered by the outermost error middleware, past ours: add the headers every response carries here
        extra = {**SECURITY_HEADERS, **({"X-Request-ID": rid(request)} if rid(request) else {})}
        return error_body(500, "internal_error", "internal error; the request id identifies it in the server log",
                          rid(request), headers=extra)
