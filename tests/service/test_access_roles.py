"""Issue 32 — who may do what, tried the way the security review did: a real uvicorn server on loopback, a model
registry with two versions, and one named key per role (analyze, feedback, admin, metrics).

1  one tier of key: the clinician's (analyze) key promoted a version whose gate failed → now each key does only
   what its scopes grant (403 otherwise), `force` is refused over HTTP, and rows name the key's id;
2  lifecycle: a forced 100 % canary kept answering after a rollback → a full canary is a promotion (CLI only when
   forced, recorded with operator and reason), rollback stops shadows and canaries and the promoted version
   answers; the canary split is keyed by a server secret, not chosen by the client's request id;
3  feedback: the latest row won, any key (or none) could post → only the feedback scope posts, a weaker
   confirmation never replaces a stronger one, an amendment with a reason is kept beside the original, conflicts
   are flagged in /v1/performance;
6  (part) 409 bodies echoed the version asked for, the registry view showed bundle paths and the OS user.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import squash
from service_fixtures import ServerThread, fixture_image_bytes, fixture_images, tiny_bundle, tiny_predictor  # noqa: F401

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from dermfusion.bundle import update_calibration  # noqa: E402
from dermfusion.cli import app as cli  # noqa: E402
from dermfusion.service.app import create_app, server_options  # noqa: E402
from dermfusion.service.audit import AuditStore  # noqa: E402
from dermfusion.service.auth import hash_key, new_key  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402
from dermfusion.service.deployment import Deployment, canary_fraction  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SECRETS = {name: new_key() for name in ("web", "pathology", "ops", "prometheus")}
SCOPES = {"web": ["analyze"], "pathology": ["feedback"], "ops": ["admin"], "prometheus": ["metrics"]}


def key(name: str) -> dict:
    return {"X-API-Key": SECRETS[name]}


def run(*args, code: int = 0) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == code, f"exit {res.exit_code}\n{res.output}"
    return squash(res.output)


def keyed_config(tmp: Path, **over):
    base = {"audit": {"db_url": f"sqlite:///{tmp}/audit.db"}, "backend": "fp32",
            "auth": {"keys": [{"id": n, "scopes": SCOPES[n], "hash": hash_key(SECRETS[n])} for n in SECRETS]},
            "rate_limits": {"analyses_per_minute": 0, "requests_per_minute": 0},
            "workers": {"workers": 2, "queue_size": 8}}
    base.update(over)
    return load_service_config(None, env={}, **base)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bundle):
    """A registry of two versions (no release gate: promotions are forced with the CLI, with a reason) served by a
    real uvicorn server with one key per role; (server, registry dir, audit store, hashes)."""
    root = tmp_path_factory.mktemp("roles")
    v1 = shutil.copytree(tiny_bundle, root / "v1", ignore=shutil.ignore_patterns("gate"))
    v2 = shutil.copytree(tiny_bundle, root / "v2", ignore=shutil.ignore_patterns("gate"))
    cal = json.loads((v2 / "calibration.json").read_text() or "{}")
    cal["temperature"] = 2.5
    update_calibration(v2, cal)
    reg = root / "registry"
    run("registry", "register", v1, "--version", "1.0.0", "--registry", reg)
    run("registry", "register", v2, "--version", "1.1.0", "--registry", reg)
    assert "needs a --reason" in run("registry", "promote", "1.0.0", "--force", "--registry", reg, code=2)
    run("registry", "promote", "1.0.0", "--force", "--reason", "first release (test)", "--operator", "alice",
        "--registry", reg)
    cfg = keyed_config(root, registry={"dir": str(reg), "poll_s": 0.2})
    hashes = {"1.0.0": (v1 / "HASH").read_text().strip(), "1.1.0": (v2 / "HASH").read_text().strip()}
    with ServerThread(create_app(None, cfg, warmup=False), **server_options(cfg)) as srv:
        store = AuditStore(cfg.audit.db_url)
        yield srv, reg, store, hashes
        store.close()


def analyze(c, data: bytes, rid: str | None = None, who: str = "web"):
    headers = {**key(who), **({"X-Request-ID": rid} if rid else {})}
    return c.post("/v1/analyze?explain=false", headers=headers, files={"dermoscopic": ("l.jpg", data, "image/jpeg")})


# ------------------------------------------------------------------------------------------ finding 1: roles
def test_each_key_does_only_what_its_scopes_grant(served, fixture_image_bytes):
    srv, reg, store, _ = served
    promote = ("POST", "/v1/admin/promote", {"version": "1.1.0"})
    routes = {"analyze": ("POST", "/v1/analyze", None), "model": ("GET", "/v1/model", None),
              "feedback": ("POST", "/v1/feedback", {"request_id": "never-analysed-0001", "diagnosis": "MEL",
                                                     "confirmation": "histology"}),
              "performance": ("GET", "/v1/performance", None), "promote": promote,
              "rollback": ("POST", "/v1/admin/rollback", None),
              "shadow": ("POST", "/v1/admin/shadow", {"version": "1.1.0", "share": 0.5}),
              "registry": ("GET", "/v1/admin/registry", None), "metrics": ("GET", "/metrics", None)}
    allowed = {"web": {"analyze", "model"}, "pathology": {"feedback", "model"},
               "ops": {"model", "performance", "promote", "rollback", "shadow", "registry", "metrics"},
               "prometheus": {"model", "metrics"}}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for who in SECRETS:
            for name, (method, path, body) in routes.items():
                if name in ("promote", "rollback", "shadow"):
                    continue  # the allowed changes are made below, in order
                if name == "analyze":
                    r = analyze(c, fixture_image_bytes, who=who)
                else:
                    r = c.request(method, path, headers=key(who), json=body)
                if name in allowed[who]:
                    assert r.status_code in (200, 404), (who, name, r.status_code, r.text[:200])  # 404: the unknown id
                else:
                    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (who, name, r.text)
            for name in ("promote", "rollback", "shadow"):
                if name not in allowed[who]:
                    method, path, body = routes[name]
                    r = c.request(method, path, headers=key(who), json=body)
                    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (who, name, r.text)
        # no key, a wrong key: 401 — /metrics included (it ties counters to patients at low traffic)
        for method, path, body in routes.values():
            assert c.request(method, path, json=body).status_code == 401, path
            assert c.request(method, path, json=body, headers={"X-API-Key": "x" * 43}).status_code == 401, path
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        # Prometheus' scrape config sends the key as a bearer token
        assert c.get("/metrics", headers={"Authorization": f"Bearer {SECRETS['prometheus']}"}).status_code == 200
        # the attack: the clinician's key puts a failed-gate version in front of patients — refused
        r = c.post("/v1/admin/promote", headers=key("web"), json={"version": "1.1.0", "force": True})
        assert r.status_code == 403
        assert c.get("/v1/admin/registry", headers=key("ops")).json()["serving"]["promoted"] == "1.0.0"
        # rows name the key's id: the audit row of an analysis
        rid = analyze(c, fixture_image_bytes, "roles-analysis-0001").json()["request_id"]
        assert store.get(rid)["client"] == "web"


def test_force_is_refused_over_http_and_refusals_echo_nothing(served):
    srv, reg, _, _ = served
    with httpx.Client(base_url=srv.url, timeout=60, headers=key("ops")) as c:
        for path, body in (("/v1/admin/promote", {"version": "1.1.0", "force": True}),
                           ("/v1/admin/shadow", {"version": "1.1.0", "share": 1.0, "force": True})):
            r = c.post(path, json=body)
            assert r.status_code == 422 and "not available over HTTP" in r.json()["error"]["message"], r.text
        # the gate is missing: 409 with a code and a fixed message — not the version asked for, not a path
        r = c.post("/v1/admin/promote", json={"version": "1.1.0"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "gate_missing", r.text
        r = c.post("/v1/admin/shadow", json={"version": "1.1.0", "share": 0.3})
        assert r.status_code == 409 and r.json()["error"]["code"] == "gate_missing", r.text
        for body in ({"version": "1.1.0"}, {"version": "9.9.9-Secret-JohnSmith"}, {"version": "../../etc/passwd"}):
            r = c.post("/v1/admin/promote", json=body)
            assert r.status_code in (409, 422) and "1.1.0" not in r.text and "JohnSmith" not in r.text, r.text
            assert "passwd" not in r.text and str(reg.parent) not in r.text
        # the registry view: versions, roles, hashes, verdicts — no bundle path, no operating-system user
        view = c.get("/v1/admin/registry")
        assert view.status_code == 200
        text = view.text
        assert str(reg.parent) not in text and "bundle" not in text and "gate.json" not in text
        assert f'"{getpass.getuser()}"' not in text and "alice" not in text and "registered_by" not in text
        assert [v["version"] for v in view.json()["versions"]] == ["1.0.0", "1.1.0"]


# ------------------------------------------------------------------------------------- finding 2: lifecycle
def _until(c, data: bytes, want: str, prefix: str, timeout: float = 20.0) -> dict:
    deadline, i = time.time() + timeout, 0
    while time.time() < deadline:
        body = analyze(c, data, f"{prefix}-{i:04d}").json()
        if body["model"]["registry_version"] == want:
            return body
        i += 1
        time.sleep(0.1)
    raise AssertionError(f"{want} did not answer within {timeout} s")


def test_forced_canary_then_rollback_the_promoted_version_answers(served, fixture_image_bytes):
    srv, reg, store, hashes = served
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        # a canary of share 1 answers every request: it is a promotion, forced only with the CLI, with a reason
        assert "needs a --reason" in run("registry", "shadow", "1.1.0", "--share", "1.0", "--force",
                                         "--registry", reg, code=2)
        out = run("registry", "shadow", "1.1.0", "--share", "1.0", "--force", "--reason", "hotfix trial (test)",
                  "--operator", "dana", "--registry", reg)
        assert "promoted: 1.1.0" in out
        body = _until(c, fixture_image_bytes, "1.1.0", "canary-full")
        assert body["model"]["role"] == "promoted" and body["model"]["hash"] == hashes["1.1.0"]
        hist = json.loads((reg / "registry.json").read_text())["history"]
        assert {k: hist[-1][k] for k in ("action", "version", "forced", "reason", "by", "via")} == {
            "action": "promote", "version": "1.1.0", "forced": True, "reason": "hotfix trial (test)",
            "by": "cli:dana", "via": "canary share 1.0"}
        # a partial forced canary beside it, then the rollback over HTTP: every shadow and canary stops
        run("registry", "shadow", "1.0.0", "--share", "0.5", "--force", "--reason", "compare (test)",
            "--registry", reg)
        r = c.post("/v1/admin/rollback", headers=key("ops"))
        assert r.status_code == 200, r.text
        assert r.json()["serving"] == {"promoted": "1.0.0", "shadow": None, "share": 0.0}
        for i in range(6):  # the promoted version answers — every request, no canary left
            body = analyze(c, fixture_image_bytes, f"after-rollback-{i:04d}").json()
            assert (body["model"]["registry_version"], body["model"]["role"]) == ("1.0.0", "promoted")
            assert body["model"]["hash"] == hashes["1.0.0"]
        hist = json.loads((reg / "registry.json").read_text())["history"]
        assert hist[-1]["action"] == "rollback" and hist[-1]["by"] == "api:ops"
        assert hist[-2]["forced"] is True and hist[-2]["reason"] == "compare (test)"  # forced canaries recorded too


def test_the_canary_split_is_keyed_by_a_server_secret():
    ids = [f"client-chosen-{i:05d}" for i in range(4000)]
    old = [i for i in ids if int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) / 2 ** 32 < 0.1]
    assert len(old) > 300  # the ids a client would pick to get the canary under the old, public rule
    secret = b"s" * 32
    chosen = sum(canary_fraction(i, secret) < 0.1 for i in old) / len(old)
    assert 0.05 < chosen < 0.15  # under the keyed rule they get the canary at the share's rate, no more
    assert [canary_fraction(i, secret) for i in ids[:50]] == [canary_fraction(i, secret) for i in ids[:50]]
    assert [canary_fraction(i, secret) for i in ids[:50]] != [canary_fraction(i, b"t" * 32) for i in ids[:50]]
    # a deployment draws its secret from the server (DERMFUSION_CANARY_SECRET or random), never from the request
    dep = Deployment(object(), "1.0.0", object(), "1.1.0", 0.1)
    assert len(dep.salt) == 32 and dep.salt == Deployment(object()).salt


# ------------------------------------------------------------------------------------- finding 3: feedback
def test_feedback_is_clinical_data(served, fixture_image_bytes):
    srv, reg, store, _ = served
    fb = key("pathology")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        rid = analyze(c, fixture_image_bytes, "feedback-case-0001").json()["request_id"]
        other = analyze(c, fixture_image_bytes, "feedback-case-0002").json()["request_id"]

        def post(body, who=fb):
            return c.post("/v1/feedback", headers=who, json=body)

        first = post({"request_id": rid, "diagnosis": "MEL", "confirmation": "histology"})
        assert first.status_code == 201 and first.json()["status"] == "recorded", first.text
        # a later, weaker confirmation of another diagnosis never replaces it: recorded, flagged, 409
        r = post({"request_id": rid, "diagnosis": "NV", "confirmation": "follow_up"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflicting_confirmation", r.text
        assert r.json()["error"]["details"] == {"recorded": True, "counted_confirmation": "histology"}
        r = post({"request_id": rid, "diagnosis": "MEL", "confirmation": "consensus"})
        assert r.status_code == 200 and r.json()["status"] == "kept"
        perf = c.get("/v1/performance", headers=key("ops")).json()
        assert perf["feedback"]["conflicts"] == 1 and perf["feedback"]["conflicting_request_ids"] == [rid]
        assert perf["feedback"]["by_confirmation"] == {"histology": 1}  # MEL by histology still counts
        # an amendment is explicit, with an enumerated reason, and kept beside the original
        r = post({"request_id": rid, "diagnosis": "NV", "confirmation": "histology",
                  "amendment": {"reason": "free text is not a reason"}})
        assert r.status_code == 422
        r = post({"request_id": rid, "diagnosis": "NV", "confirmation": "histology",
                  "amendment": {"reason": "revised_report"}})
        assert r.status_code == 201 and r.json()["status"] == "amended", r.text
        assert r.json()["amends"] == first.json()["feedback_id"]
        rows = store.feedback_rows(rid)
        assert [(x["diagnosis"], x["confirmation"], x["kind"]) for x in rows] == [
            ("MEL", "histology", "confirmation"), ("NV", "follow_up", "confirmation"),
            ("MEL", "consensus", "confirmation"), ("NV", "histology", "amendment")]
        assert rows[-1]["reason"] == "revised_report" and all(x["client"] == "pathology" for x in rows)
        perf = c.get("/v1/performance", headers=key("ops")).json()
        assert perf["feedback"]["conflicts"] == 0 and perf["feedback"]["amended"] == 1
        # a stronger confirmation replaces a weaker one, and a changed diagnosis is flagged
        assert post({"request_id": other, "diagnosis": "NV", "confirmation": "consensus"}).status_code == 201
        r = post({"request_id": other, "diagnosis": "MEL", "confirmation": "histology"})
        assert r.status_code == 201 and r.json()["status"] == "upgraded"
        perf = c.get("/v1/performance", headers=key("ops")).json()
        assert perf["feedback"]["conflicting_request_ids"] == [other]
        # nothing to amend; the same key twice in the body; another scope
        fresh = analyze(c, fixture_image_bytes, "feedback-case-0003").json()["request_id"]
        r = post({"request_id": fresh, "diagnosis": "NV", "confirmation": "histology",
                  "amendment": {"reason": "entry_error"}})
        assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_amend"
        r = c.post("/v1/feedback", headers={**fb, "Content-Type": "application/json"},
                   content=f'{{"request_id": "{fresh}", "diagnosis": "NV", "diagnosis": "MEL", '
                           '"confirmation": "histology"}')
        assert r.status_code == 422 and r.json()["error"]["code"] == "duplicate_key", r.text
        assert post({"request_id": fresh, "diagnosis": "MEL", "confirmation": "histology"},
                    key("web")).status_code == 403
        assert store.feedback_rows(fresh) == []


def test_without_keys_feedback_and_admin_are_off(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/a.db"}, backend="fp32")
    with ServerThread(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False),
                      **server_options(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        rid = c.post("/v1/analyze?explain=false", files={"dermoscopic": ("l.jpg", fixture_image_bytes,
                                                                          "image/jpeg")}).json()["request_id"]
        for method, path, body in (("POST", "/v1/feedback", {"request_id": rid, "diagnosis": "MEL",
                                                              "confirmation": "histology"}),
                                   ("GET", "/v1/performance", None), ("POST", "/v1/admin/rollback", None),
                                   ("POST", "/v1/admin/promote", {"version": "1.0.0"}),
                                   ("GET", "/v1/admin/registry", None)):
            r = c.request(method, path, json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "auth_not_configured", (path, r.text)
        assert c.get("/metrics").status_code == 200  # open without keys (a local demo); serve warns off loopback
    assert AuditStore(cfg.audit.db_url).feedback_rows(rid) == []


def test_keys_are_named_and_stored_as_salted_hashes():
    from dermfusion.service.auth import KeyRing

    res = CliRunner().invoke(cli, ["keys", "new", "clinic-web", "--scope", "analyze", "--scope", "feedback"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    secret = next(ln.strip() for ln in lines if len(ln.strip()) == 43 and " " not in ln.strip())
    import yaml

    entry = yaml.safe_load("\n".join(ln for ln in lines if ln.startswith(("- ", "  "))))[0]
    assert entry["id"] == "clinic-web" and entry["scopes"] == ["analyze", "feedback"] and secret not in str(entry)
    cfg = load_service_config(None, env={}, auth={"keys": [entry]})
    ring = KeyRing.from_config(cfg.auth)
    assert ring.identify(secret).id == "clinic-web" and ring.identify(secret[:-1] + "x") is None
    assert hash_key(secret) != hash_key(secret)  # a fresh salt per key: equal secrets do not show as equal hashes
    cfg = load_service_config(None, env={"DERMFUSION_API_KEYS": f"ops:admin+metrics:{secret}"})
    assert [(k.id, k.scopes) for k in cfg.auth.keys] == [("ops", ["admin", "metrics"])]
    assert secret not in cfg.model_dump_json()  # hashed when read; the secret is not kept
    assert CliRunner().invoke(cli, ["keys", "new", "Bad Id", "--scope", "analyze"]).exit_code == 2
    assert CliRunner().invoke(cli, ["keys", "new", "x", "--scope", "root"]).exit_code == 2
