"""What every response carries and the API documentation page — nothing fetched from outside the package.

Security headers (``SECURITY_HEADERS``, added by the middleware to every response unless a route set its own):
a Content-Security-Policy that allows only this origin's scripts (no inline script) and forbids framing
(``frame-ancestors 'none'``, with ``X-Frame-Options: DENY`` for older browsers), ``X-Content-Type-Options: nosniff``
and ``Referrer-Policy: no-referrer``; analysis answers are also ``Cache-Control: no-store`` (they hold patient data).
Inline styles stay allowed: the self-contained model card page uses one ``<style>`` block.

``/docs`` is Swagger UI from the ``swagger-ui-bundle-v2`` package (the ``serve`` extra) served at ``/docs/assets/``
— clinic networks are often offline, and a page that loads scripts from a CDN is also a page that runs whatever
the CDN serves. Its one inline start-up script is allowed by its hash. ReDoc (``/redoc``) is not offered: no
package ships it. Without the package ``/docs`` says how to install it; ``/openapi.json`` is always there.
"""
from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

CSP = ("default-src 'self'; script-src 'self'{extra}; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP.format(extra=""),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
NO_STORE_PATHS = ("/v1/analyze",)
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def with_security_headers(headers: list[tuple[bytes, bytes]], path: str) -> list[tuple[bytes, bytes]]:
    """ASGI response headers plus each security header the response does not set itself."""
    have = {k.lower() for k, _ in headers}
    extra = dict(SECURITY_HEADERS)
    if path in NO_STORE_PATHS:
        extra["Cache-Control"] = "no-store"
    return headers + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()
                      if k.lower().encode("latin-1") not in have]


def swagger_ui_dir() -> Path | None:
    """The installed Swagger UI distribution (``swagger_ui_bundle.swagger_ui_path``), or None."""
    try:
        from swagger_ui_bundle import swagger_ui_path  # optional: the serve extra's swagger-ui-bundle-v2
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if all((path / name).is_file() for name in ASSETS) else None


def script_hashes(html: str) -> list[str]:
    """CSP source expressions ('sha256-…') for the inline scripts of a page."""
    return [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in re.findall(r"<script>(.*?)</script>", html, flags=re.S)]


def add_docs(app: FastAPI, title: str) -> None:
    """``/docs`` (Swagger UI from the package) and ``/docs/assets/<file>``; build the app with ``docs_url=None,
    redoc_url=None`` so FastAPI's CDN pages are not registered."""
    dist = swagger_ui_dir()

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if dist is None:
            return HTMLResponse(
                "<!doctype html><title>API docs</title><p>The interactive API docs need the swagger-ui-bundle-v2 "
                "package: <code>pip install -e \".[serve]\"</code>. The OpenAPI schema is at "
                "<a href=\"/openapi.json\">/openapi.json</a>.</p>", status_code=404)
        page = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} — API docs",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})
        html = page.body.decode()
        csp = CSP.format(extra="".join(" " + h for h in script_hashes(html)))
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        if dist is None or name not in ASSETS:
            raise HTTPException(404, "not found")
        return FileResponse(dist / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
