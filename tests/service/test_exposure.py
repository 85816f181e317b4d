"""Issue 32, finding 6 — exposure. Bodies sent to unknown routes were read before routing; idle sockets stayed open
for minutes (no header timeout); duplicate JSON keys and invalid request ids were accepted silently; nothing limited
how fast one key could call; the docs suggested ``--host 0.0.0.0`` with no word on TLS. Now each is refused from
the request head, a socket must deliver its header in time, keys have rates and a quota, and ``serve`` warns.
(409 bodies and the registry view without echoes or paths: test_access_roles.)"""
from __future__ import annotations

import json
import socket
import time

import pytest
from typer.testing import CliRunner

from cli_helpers import squash
from service_fixtures import ServerThread, fixture_image_bytes, fixture_images, tiny_bundle, tiny_predictor  # noqa: F401

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from dermfusion.cli import app as cli  # noqa: E402
from dermfusion.service.app import create_app, server_options  # noqa: E402
from dermfusion.service.auth import hash_key, new_key  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402
from dermfusion.service.exposure import exposure_warnings  # noqa: E402
from dermfusion.service.ratelimit import RateLimiter  # noqa: E402

WEB, OPS = new_key(), new_key()
MARKER = "Secret-Marker-JohnSmith-1950"


def _config(tmp_path, **over):
    base = {"audit": {"db_url": f"sqlite:///{tmp_path}/audit.db"}, "backend": "fp32",
            "auth": {"keys": [{"id": "web", "scopes": ["analyze"], "hash": hash_key(WEB)},
                              {"id": "ops", "scopes": ["admin", "feedback"], "hash": hash_key(OPS)}]},
            "workers": {"header_timeout_s": 1.0, "keep_alive_s": 1}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
    return load_service_config(None, env={}, **base)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle, tiny_predictor):
    cfg = _config(tmp_path_factory.mktemp("exposure"))
    with ServerThread(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False),
                      **server_options(cfg)) as srv:
        yield srv


def _exchange(port: int, head: bytes, wait: float = 5.0) -> tuple[str, float]:
    """Send ``head`` (and no body), read until the server closes or answers; (reply, seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait + 5) as s:
        t0 = time.perf_counter()
        s.sendall(head)
        reply = b""
        while True:
            try:
                part = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not part:
                break
            reply += part
            if b"\r\n\r\n" in reply and b"content-length" in reply.lower():
                length = int(reply.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(reply.split(b"\r\n\r\n", 1)[1]) >= length:
                    break
        return reply.decode("latin-1"), time.perf_counter() - t0


# ------------------------------------------------------------------------- refused from the head, body unread
@pytest.mark.parametrize("head,status,code", [
    (b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 33554432\r\n\r\n",
     404, "not_found"),
    (b"PUT /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 33554432\r\n\r\n", 405, "method_not_allowed"),
    (b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 33554432\r\n\r\n",
     401, "unauthorized"),
    (b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nX-API-Key: " + OPS.encode() + b"\r\nContent-Type: application/json"
     b"\r\nContent-Length: 20000\r\n\r\n", 413, "payload_too_large"),                # feedback: a few KB at most
    (b"POST /v1/admin/promote HTTP/1.1\r\nHost: x\r\nX-API-Key: " + OPS.encode() + b"\r\nContent-Type: "
     b"application/json\r\nContent-Length: 5000\r\n\r\n", 413, "payload_too_large"),  # admin: likewise
    (b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-API-Key: " + WEB.encode() + b"\r\nContent-Length: 1000000\r\n\r\n",
     413, "payload_too_large"),                                                        # a GET takes no body
])
def test_refused_before_the_body_is_read(server, head, status, code):
    reply, secs = _exchange(server.port, head)  # the announced body is never sent: an answer now proves it unread
    assert reply.startswith(f"HTTP/1.1 {status}"), reply[:200]
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == code
    assert "connection: close" in reply.lower() and secs < 3


def test_invalid_request_ids_and_duplicate_keys_are_4xx(server, fixture_image_bytes):
    with httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": WEB}) as c:
        for rid in ("short", "has space in it", MARKER + "/../x", "x" * 65, "é" * 10):
            r = c.get("/v1/model", headers={"X-Request-ID": rid.encode("utf-8")})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request_id", (rid, r.text)
            assert MARKER not in r.text and len(r.headers["x-request-id"]) == 32  # the service's own id
        files = {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}
        r = c.post("/v1/analyze?explain=false", files=files, data={"metadata": '{"age": 5, "age": 90}'})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_metadata"
        assert "more than once" in r.json()["error"]["message"] and "'age'" in r.json()["error"]["message"]
        r = c.post("/v1/analyze?explain=false", files=files,
                   data={"metadata": json.dumps({"age": 5}).replace("}", f', "{MARKER}": 1, "{MARKER}": 2}}')})
        assert r.status_code == 422 and MARKER not in r.text
        r = c.post("/v1/admin/promote", headers={"X-API-Key": OPS, "Content-Type": "application/json"},
                   content=b'{"version": "1.0.0", "version": "2.0.0"}')
        assert r.status_code == 422 and r.json()["error"]["code"] == "duplicate_key"
        r = c.post("/v1/feedback", headers={"X-API-Key": OPS, "Content-Type": "text/plain"}, content=b"{}")
        assert r.status_code == 415


# ------------------------------------------------------------------------------------- header and idle time
def test_a_socket_must_deliver_its_header_in_time(server):
    for head in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):  # silent; a header that never ends
        reply, secs = _exchange(server.port, head)
        assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply, reply[:200]
        assert 0.8 < secs < 4, secs
    # a finished request on a keep-alive connection: the idle connection is closed after keep_alive_s
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"warnings"' not in first:  # the whole answer (head and body may come in two pieces)
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        t0 = time.perf_counter()
        assert s.recv(65536) == b"" and time.perf_counter() - t0 < 4  # closed by the server, not left open
    # while sockets sit idle, the service still answers (they are reaped rather than holding slots)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        time.sleep(2.5)
        for s in idle:
            s.settimeout(3)
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for s in idle:
            s.close()


# -------------------------------------------------------------------------------------- rates and a quota
def test_per_key_rate_limit_and_daily_quota(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    cfg = _config(tmp_path, rate_limits={"analyses_per_minute": 6, "analysis_burst": 2, "requests_per_minute": 60,
                                         "request_burst": 3})
    cfg.auth.keys[1].analyses_per_day = 2  # ops: a quota, and its own rate (none)
    cfg.auth.keys[1].scopes.append("analyze")
    cfg.auth.keys[1].analyses_per_minute = 0
    files = {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)) as c:
        web = [c.post("/v1/analyze?explain=false", files=files, headers={"X-API-Key": WEB}) for _ in range(3)]
        assert [r.status_code for r in web] == [200, 200, 429]
        assert web[2].json()["error"]["code"] == "rate_limited" and int(web[2].headers["Retry-After"]) >= 1
        # another key has its own bucket; its quota is per UTC day
        ops = [c.post("/v1/analyze?explain=false", files=files, headers={"X-API-Key": OPS}) for _ in range(3)]
        assert [r.status_code for r in ops] == [200, 200, 429]
        assert ops[2].json()["error"]["code"] == "quota_exceeded" and int(ops[2].headers["Retry-After"]) <= 86400
        other = [c.get("/v1/model", headers={"X-API-Key": WEB}).status_code for _ in range(4)]
        assert other == [200, 200, 200, 429]
        assert c.get("/healthz").status_code == 200  # operations are not limited


def test_token_bucket_refills():
    now = [0.0]

    class K:
        id, analyses_per_minute, analyses_per_day = "k", None, None

    cfg = load_service_config(None, env={}, rate_limits={"analyses_per_minute": 60, "analysis_burst": 2}).rate_limits
    lim = RateLimiter(cfg, clock=lambda: now[0])
    assert lim.check(K, True) is None and lim.check(K, True) is None
    code, _, wait = lim.check(K, True)
    assert code == "rate_limited" and wait == 1
    now[0] += 1.0
    assert lim.check(K, True) is None


# ----------------------------------------------------------------------------------------- TLS, at start
def test_serve_warns_when_listening_beyond_loopback_without_tls(tmp_path, tiny_bundle, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.update(k))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("DERMFUSION_API_KEYS", raising=False)

    def serve(*args):
        res = CliRunner().invoke(cli, ["serve", str(tiny_bundle), *args])
        assert res.exit_code == 0, res.output
        return squash(res.output)

    out = serve("--host", "0.0.0.0")
    assert "listening on 0.0.0.0 without TLS" in out and "without API keys" in out
    assert seen["http"].__name__ == "GuardedH11Protocol" and seen["timeout_keep_alive"] == 5
    assert "without TLS" not in serve()  # loopback: nothing to warn about
    cert, keyfile = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("-"), keyfile.write_text("-")
    out = serve("--host", "0.0.0.0", "--ssl-certfile", str(cert), "--ssl-keyfile", str(keyfile))
    assert "without TLS" not in out and "https://0.0.0.0" in out and seen["ssl_certfile"] == str(cert)
    assert "without TLS" not in serve("--host", "10.1.2.3", "--forwarded-allow-ips", "10.1.2.4")
    cfg = load_service_config(None, env={}, audit={"store_images": True})
    assert any("retention_days" in w for w in exposure_warnings(cfg, "127.0.0.1"))
    assert any("plain text" in w for w in exposure_warnings(
        load_service_config(None, env={"DERMFUSION_API_KEYS": "legacy-secret"}), "127.0.0.1"))
