"""Issue 20, findings 6, 10, 11 and 13 — each reproduced, then shown fixed:

 6  /readyz said ready while audit writes failed; a failed audit start was never retried; an unwritable / truncated
    SQLite ``-shm`` file killed the process (SIGBUS); the audit database landed in the current directory.
10  a fold ensemble was audited as fold 0 only; on fold 0 (the explained member) the fast backends failed with
    "cannot pickle '_thread._local'" and the service fell back to fp32 without saying so.
11  /docs loaded its scripts from a CDN; responses had no CSP, X-Frame-Options or nosniff.
13  with no age sent, the explanation reported age ``present: true``.
(Finding 12, the clinician page, is tested in the browser in test_web.py.)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cli_helpers import squash
from service_fixtures import fixture_image_bytes, fixture_images, tiny_bundle, tiny_predictor  # noqa: F401

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
from fastapi.testclient import TestClient  # noqa: E402

from dermfusion.inference import load_predictor  # noqa: E402
from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.audit import AuditStore  # noqa: E402
from dermfusion.service.config import ServiceConfig, load_service_config  # noqa: E402
from dermfusion.service.health import AuditKeeper  # noqa: E402

FILES = lambda data: {"dermoscopic": ("d.jpg", data, "image/jpeg")}  # noqa: E731


def _cfg(db: Path, **over):
    if "quality" in ServiceConfig.model_fields:  # the "cannot assess" gate is not under test here
        over.setdefault("quality", {"enabled": False})
    return load_service_config(None, env={}, audit={"db_url": f"sqlite:///{db}"}, **over)


# ------------------------------------------------------------------------------------------------- finding 6
def test_readyz_fails_while_the_audit_store_cannot_write(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    db = tmp_path / "audit.db"
    app = create_app(tiny_bundle, _cfg(db), predictor=tiny_predictor, warmup=False)
    with TestClient(app) as c:
        app.state.svc.audit_keeper.probe_interval_s = 0  # probe on every call
        assert c.get("/readyz").status_code == 200
        # a real filesystem fault: the rollback journal cannot be created (a directory stands in its place)
        journal = Path(f"{db}-journal")
        journal.mkdir()
        try:
            r = c.get("/readyz")
            assert r.status_code == 503, r.text  # before: 200 (it only ran SELECT 1)
            body = r.json()
            assert body["ready"] is False and body["status"] == "degraded" and "cannot write" in body["detail"]
            assert "dermfusion_audit_writable 0.0" in c.get("/metrics").text
            r = c.post("/v1/analyze", files=FILES(fixture_image_bytes))
            assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
            assert "Retry-After" in r.headers
        finally:
            journal.rmdir()
        assert c.get("/readyz").status_code == 200  # recovers by itself
        assert c.post("/v1/analyze", files=FILES(fixture_image_bytes)).status_code == 200


def test_audit_start_is_retried_with_backoff(tmp_path, tiny_bundle, tiny_predictor):
    blocker = tmp_path / "not_yet"
    blocker.write_text("a file where the database folder should be")
    app = create_app(tiny_bundle, _cfg(blocker / "audit.db"), predictor=tiny_predictor, warmup=False)
    keeper = app.state.svc.audit_keeper
    keeper.first_delay_s, keeper.max_delay_s = 0.05, 0.2
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "audit store unavailable; retrying" in r.json()["detail"]
        assert app.state.svc.ready  # the model loaded anyway (before: the whole start failed, never retried)
        time.sleep(0.4)
        assert keeper.attempts >= 3  # still trying
        blocker.unlink()
        deadline = time.time() + 5
        while c.get("/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200
        assert (blocker / "audit.db").exists()


def test_backoff_doubles_up_to_its_cap():
    calls: list[float] = []

    class Store:
        def probe_write(self):
            pass

        def describe(self):
            return "fake"

        def close(self):
            pass

    def opener(_url):
        calls.append(time.monotonic())
        if len(calls) < 5:
            raise OSError("disk not mounted yet")
        return Store()

    class State:
        config = ServiceConfig()
        audit = None

    state = State()
    keeper = AuditKeeper(state, first_delay_s=0.05, max_delay_s=0.2, opener=opener)
    assert keeper.start() is False
    deadline = time.time() + 5
    while state.audit is None and time.time() < deadline:
        time.sleep(0.02)
    assert state.audit is not None and keeper.error is None
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert [round(g, 2) >= d for g, d in zip(gaps, (0.05, 0.1, 0.2, 0.2))] == [True] * 4, gaps
    assert max(gaps) < 0.6  # capped
    keeper.close()


SIGBUS_CHILD = textwrap.dedent("""
    import os, sys
    from dermfusion.service.audit import AuditStore
    db = sys.argv[1]
    store = AuditStore(f"sqlite:///{db}")
    store.probe_write()
    for suffix in ("-shm", "-wal"):  # what crashed the WAL store: its shared-memory index truncated under it
        if os.path.exists(db + suffix):
            os.truncate(db + suffix, 0)
    store.probe_write()
    mode = store.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar()
    os.mkdir(db + "-journal")  # a filesystem fault: the journal cannot be created
    try:
        store.probe_write()
        print("no error")
    except Exception as e:
        print("error", type(e).__name__)
    print(mode, os.path.exists(db + "-shm"), os.path.exists(db + "-wal"))
""")


def test_sqlite_filesystem_fault_is_an_error_not_a_crash(tmp_path):
    db = tmp_path / "audit.db"
    con = sqlite3.connect(db)  # a database left in WAL mode by the old default
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    r = subprocess.run([sys.executable, "-c", SIGBUS_CHILD, str(db)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # before: -7 (SIGBUS)
    lines = r.stdout.split("\n")
    assert lines[0] == "error OperationalError", r.stdout
    assert lines[1] == "delete False False", r.stdout  # rollback journal: no memory-mapped -shm at all


def test_old_audit_table_gains_new_columns(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE dermfusion_audit (id INTEGER PRIMARY KEY, request_id VARCHAR(64), created_at DATETIME, "
                "model_name VARCHAR, model_version VARCHAR, model_hash VARCHAR, task VARCHAR, input_hashes JSON, "
                "input_stats JSON, patient_metadata JSON, outputs JSON, primary_class VARCHAR, top_probability FLOAT, "
                "risk_score FLOAT, action VARCHAR, review_recommended BOOLEAN, review_reasons JSON, warnings JSON, "
                "latency_ms FLOAT, client VARCHAR, images_stored BOOLEAN)")
    con.commit()
    con.close()
    store = AuditStore(f"sqlite:///{db}")
    store.write({"request_id": "r-000001", "model_name": "m", "model_version": "v", "model_hash": "h", "task": "t",
                 "input_hashes": {}, "input_stats": {}, "patient_metadata": {}, "outputs": {}, "primary_class": "NV",
                 "top_probability": 0.9, "risk_score": 1.0, "action": "monitor", "review_recommended": False,
                 "review_reasons": [], "warnings": [], "latency_ms": 1.0, "model_members": [{"hash": "h"}]})
    assert store.get("r-000001")["model_members"] == [{"hash": "h"}]
    store.close()


def test_default_audit_path_is_the_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    cfg = ServiceConfig()
    assert cfg.audit.db_url == f"sqlite:///{tmp_path}/xdg/dermfusion/audit.db"
    assert cfg.audit.image_dir == f"{tmp_path}/xdg/dermfusion/images"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ServiceConfig().audit.db_url == f"sqlite:///{tmp_path}/home/.local/share/dermfusion/audit.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # the XDG spec: relative paths are ignored
    assert ServiceConfig().audit.db_url == f"sqlite:///{tmp_path}/home/.local/share/dermfusion/audit.db"
    assert "dermfusion_audit.db" not in ServiceConfig().audit.db_url


def test_serve_prints_the_audit_location(tmp_path, monkeypatch, tiny_bundle):
    uvicorn = pytest.importorskip("uvicorn")
    from typer.testing import CliRunner

    from dermfusion.cli import app as cli_app

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("DERMFUSION_AUDIT_DB_URL", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    res = CliRunner().invoke(cli_app, ["serve", str(tiny_bundle)])
    assert res.exit_code == 0, res.output
    assert f"audit trail: sqlite:///{tmp_path}/dermfusion/audit.db" in squash(res.output)


# ------------------------------------------------------------------------------------------------ finding 10
def _fold_run(tmp_path: Path, tiny_bundle: Path) -> tuple[Path, list[str]]:
    """A network run directory with two genuinely different fold bundles (fold 1 re-sealed)."""
    run = tmp_path / "run"
    for k in (0, 1):
        shutil.copytree(tiny_bundle, run / f"fold_{k}" / "bundle")
    b1 = run / "fold_1" / "bundle"
    cfg = yaml.safe_load((b1 / "config.yaml").read_text())
    cfg["fold"], cfg["name"] = 1, f"{cfg.get('name', 'tiny')}_fold1"
    (b1 / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        from dermfusion.bundle import seal_bundle  # the integrity work's re-sealing (HASH + SHA256SUMS)
        seal_bundle(b1)
    except ImportError:
        from dermfusion.bundle.store import hash_dir
        (b1 / "HASH").write_text(hash_dir(b1) + "\n")
    (run / "summary.json").write_text(json.dumps({"bundles": ["fold_0/bundle", "fold_1/bundle"]}))
    hashes = [(run / f"fold_{k}" / "bundle" / "HASH").read_text().strip() for k in (0, 1)]
    assert hashes[0] != hashes[1]
    return run, hashes


def test_fold_ensemble_audits_every_member(tmp_path, tiny_bundle, fixture_image_bytes):
    run, hashes = _fold_run(tmp_path, tiny_bundle)
    db = tmp_path / "audit.db"
    with TestClient(create_app(run, _cfg(db), warmup=False)) as c:
        r = c.post("/v1/analyze", files=FILES(fixture_image_bytes))
        assert r.status_code == 200, r.text
        body = r.json()
        assert [m["hash"] for m in body["model"]["members"]] == hashes
        assert [m["hash"] for m in c.get("/v1/model").json()["model"]["members"]] == hashes
    store = AuditStore(f"sqlite:///{db}", create=False)
    row = store.get(body["request_id"])
    store.close()
    assert row["model_hash"] == hashes[0]  # the run's reference hash (drift, /v1/model) stays the first fold's
    assert [m["hash"] for m in row["model_members"]] == hashes  # before: fold 0 only
    assert row["model_members"][1]["name"].endswith("_fold1")


def test_fast_backend_copies_an_explained_model(tiny_bundle):
    from dermfusion.explain import Explainer
    from dermfusion.inference.backends import prepare_backend
    from dermfusion.clinical.model_pass import sample_frame

    pred = load_predictor(tiny_bundle)  # a fresh model: the explainer installs hooks on it
    model = pred.model
    ex = Explainer.for_model(model)
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert hooked
    runner = prepare_backend(model, "int8")  # before: TypeError: cannot pickle '_thread._local' object
    copy = runner.module
    assert "_dermfusion_explainer" not in copy.__dict__
    assert not [m for m in copy.modules() if m._forward_hooks]  # the copy runs without recording hooks
    saved = {id(mod): fused for probe in ex.probes.values() for mod, fused in getattr(probe, "fused_before", [])}
    orig_attn = [m for m in model.modules() if id(m) in saved]
    copy_attn = [m for m in copy.modules() if hasattr(m, "fused_attn")]
    assert len(copy_attn) == len(orig_attn) > 0
    assert [m.fused_attn for m in copy_attn] == [saved[id(m)] for m in orig_attn]  # fused attention back on
    # the original is untouched: still explained, maps still come out
    assert model.__dict__.get("_dermfusion_explainer") is ex
    assert [m for m in model.modules() if m._forward_hooks] == hooked
    batch = pred.sample_batch(sample_frame(pred.spec, n=2))
    res = ex.run(batch)
    assert all(rows[0] is not None for rows in res.maps.values())
    assert runner(batch)["logits"].shape == res.logits.shape


def test_backend_fallback_is_visible(tmp_path, tiny_bundle, monkeypatch, caplog):
    import dermfusion.inference.network as network
    from dermfusion.inference.backends.base import BACKENDS

    def broken(model, device="cpu", **_):
        raise RuntimeError("simulated backend fault")

    monkeypatch.setitem(BACKENDS, "broken", broken)
    monkeypatch.setattr(network, "default_candidates", lambda device, model=None, bundle=None: ["int8", "broken"])
    app = create_app(tiny_bundle, _cfg(tmp_path / "a.db"), predictor=load_predictor(tiny_bundle))
    with caplog.at_level(logging.WARNING, logger="dermfusion.service"), TestClient(app) as c:
        an = app.state.svc.analyzer
        net = an.model_pass.networks[0]
        recs = {rec["name"]: rec for rec in net.selection}
        assert not recs["int8"].get("error") and "pickle" not in str(recs["int8"].get("reason", ""))
        assert recs["broken"]["error"] is True
        ready = c.get("/readyz").json()
        assert ready["ready"] is True
        assert any("backend broken failed (RuntimeError: simulated backend fault)" in w for w in ready["warnings"])
        text = c.get("/metrics").text
        assert 'dermfusion_backend_failures{member="0"} 1.0' in text
        assert any(line.startswith("dermfusion_backend{") and 'member="0"' in line and f'backend="{net.backend}"' in line
                   and line.endswith(" 1.0") for line in text.splitlines())
    assert any("backend fallback" in r.getMessage() and "broken" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ finding 11
HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def _check_security_headers(r):
    for k, v in HEADERS.items():
        assert r.headers.get(k) == v, (r.request.url, k, r.headers.get(k))
    csp = r.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, (r.request.url, csp)
    assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    return csp


def test_security_headers_on_every_response(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    cfg = _cfg(tmp_path / "a.db", auth={"api_keys": ["k-123456"]})
    app = create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)

    @app.get("/boom", include_in_schema=False)
    async def boom():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        key = {"X-API-Key": "k-123456"}
        responses = [c.get("/"), c.get("/healthz"), c.get("/readyz"), c.get("/metrics"), c.get("/openapi.json"),
                     c.get("/static/app.js"), c.get("/v1/model", headers=key), c.get("/v1/model"),  # 401
                     c.get("/nowhere"), c.get("/boom"), c.get("/docs"),
                     c.post("/v1/analyze", files=FILES(b"junk"), headers=key),  # 400
                     c.post("/v1/analyze", content=b"x", headers={**key, "content-type": "text/plain"})]  # 415
        ok = c.post("/v1/analyze", files=FILES(fixture_image_bytes), headers=key)
        assert ok.status_code == 200, ok.text
        for r in [*responses, ok]:
            _check_security_headers(r)
        assert [r.status_code for r in responses[7:10]] == [401, 404, 500]
        assert responses[9].json()["error"]["code"] == "internal_error" and responses[9].headers["x-request-id"]
        assert ok.headers["cache-control"] == "no-store"  # patient data: never cached


def test_docs_are_served_from_the_package(tmp_path, tiny_bundle, tiny_predictor):
    pytest.importorskip("swagger_ui_bundle", reason="the serve extra's swagger-ui-bundle-v2")
    app = create_app(tiny_bundle, _cfg(tmp_path / "a.db"), predictor=tiny_predictor, warmup=False)
    with TestClient(app) as c:
        r = c.get("/docs")
        assert r.status_code == 200
        html = r.text
        assert "cdn" not in html.lower() and "https://" not in html and "http://" not in html  # before: jsdelivr
        assert '/docs/assets/swagger-ui-bundle.js' in html and '/docs/assets/swagger-ui.css' in html
        csp = _check_security_headers(r)
        assert "'sha256-" in csp  # its one inline start-up script, allowed by hash
        for name, ctype in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css")):
            a = c.get(f"/docs/assets/{name}")
            assert a.status_code == 200 and ctype in a.headers["content-type"] and len(a.content) > 10_000
        assert c.get("/docs/assets/index.html").status_code == 404  # only the files the page needs
        assert c.get("/docs/assets/..%2Fswagger-ui.css").status_code == 404
        assert c.get("/redoc").status_code == 404  # ReDoc needs a CDN: not offered


# ------------------------------------------------------------------------------------------------ finding 13
def test_absent_age_is_reported_absent(tmp_path, tiny_bundle, tiny_predictor, fixture_images):
    from dermfusion.clinical import Lesion
    from dermfusion.clinical.model_pass import ModelPass
    from dermfusion.service.schemas import PatientMetadata

    mp = ModelPass(tiny_predictor)
    assert "age" in mp.metadata_fields
    img = Image.open(fixture_images[0]).convert("RGB")

    def meta_rows(**fields):
        res = mp.run([Lesion("x", {"dermoscopic": img}, PatientMetadata(**fields).manifest_fields())], want_maps=True)
        return {d["name"]: d for d in res.contributions[0]["metadata"]}

    rows = meta_rows(sex="female")
    assert rows["age"]["present"] is False  # before: true (its "unknown" token had a 5 % share)
    assert rows["sex"]["present"] is True
    for name in mp.networks[0].spec.categorical:
        if name != "sex":  # unknown categorical fields are masked: exactly 0, absent
            assert rows[name]["present"] is False and rows[name]["weight"] == 0.0, rows[name]
    rows = meta_rows(age=63, sex="female")
    assert rows["age"]["present"] is True and rows["age"]["weight"] > 0

    # through the API: nothing listed in inputs.metadata_missing is reported present
    app = create_app(tiny_bundle, _cfg(tmp_path / "a.db"), predictor=tiny_predictor, warmup=False)
    with TestClient(app) as c:
        r = c.post("/v1/analyze", files=FILES(fixture_images[0].read_bytes()),
                   data={"metadata": json.dumps({"sex": "male"})})
        assert r.status_code == 200, r.text
        body = r.json()
    missing = set(body["inputs"]["metadata_missing"])
    assert "age" in missing
    fusion = body["explanations"]["fusion"]
    assert fusion is not None
    for d in fusion["metadata"]:
        assert d["present"] is (d["name"] not in missing), d
