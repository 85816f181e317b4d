"""Every analysis leaves an audit row — in SQLite (default) and in a real PostgreSQL server started here —
with hashes instead of images, structured metadata only, outputs, action and latency; and drift can
be computed from those rows."""
from __future__ import annotations

import hashlib
import json

import pytest

from service_fixtures import (fixture_image_bytes, fixture_images, postgres_url, tiny_bundle,  # noqa: F401
                              tiny_predictor)

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
from fastapi.testclient import TestClient  # noqa: E402

from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.audit import AuditStore  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402


def _run_analyses(db_url, bundle, predictor, images, n=3):
    cfg = load_service_config(None, env={}, audit={"db_url": db_url})
    meta = {"age": 47, "sex": "male", "site": "face", "skin_tone": 1}
    out = []
    with TestClient(create_app(bundle, cfg, predictor=predictor, warmup=False)) as c:
        for img in images[:n]:
            data = img.read_bytes()
            r = c.post("/v1/analyze", files={"dermoscopic": (img.name, data, "image/jpeg")},
                       data={"metadata": json.dumps(meta)})
            assert r.status_code == 200, r.text
            out.append((r.json(), data))
        # a refused request leaves no analysis row
        assert c.post("/v1/analyze", files={"dermoscopic": ("x.jpg", b"junk", "image/jpeg")}).status_code == 400
    return out


def _check_rows(store: AuditStore, results, bundle):
    assert store.count() == len(results)
    for resp, data in results:
        row = store.get(resp["request_id"])
        assert row is not None
        assert row["model_hash"] == (bundle / "HASH").read_text().strip() == resp["model"]["hash"]
        assert row["model_name"] == resp["model"]["name"] and row["model_version"] == resp["model"]["version"]
        assert row["input_hashes"] == {"dermoscopic": hashlib.sha256(data).hexdigest()}
        assert row["patient_metadata"] == {"age": 47.0, "sex": "male", "skin_tone": 1, "site": "head_neck_face"}
        assert row["outputs"] == pytest.approx({d["code"]: d["probability"] for d in resp["differential"]})
        assert row["primary_class"] == resp["primary_diagnosis"]["code"]
        assert row["risk_score"] == pytest.approx(resp["risk_score"], abs=0.01)
        assert row["action"] == resp["action"] and row["review_recommended"] == resp["review_recommended"]
        assert row["latency_ms"] > 0 and row["created_at"] is not None
        assert set(row["input_stats"]["dermoscopic"]) >= {"brightness", "contrast", "saturation"}
        assert row["images_stored"] is False
        blob = json.dumps(row, default=str)
        assert len(blob) < 4000  # statistics and hashes, never pixels
    newest = store.recent(limit=2)
    assert [r["request_id"] for r in newest] == [results[-1][0]["request_id"], results[-2][0]["request_id"]]


def test_audit_sqlite(tmp_path, tiny_bundle, tiny_predictor, fixture_images):
    url = f"sqlite:///{tmp_path}/sub/audit.db"  # parent folder created on demand
    results = _run_analyses(url, tiny_bundle, tiny_predictor, fixture_images)
    store = AuditStore(url, create=False)
    _check_rows(store, results, tiny_bundle)
    store.close()


def test_audit_failure_fails_closed(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/a.db"})
    app = create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)
    with TestClient(app) as c:
        def broken(_record):
            raise RuntimeError("disk full")
        app.state.svc.audit.write = broken
        r = c.post("/v1/analyze", files={"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert "Retry-After" in r.headers


def test_drift_cli_from_audit(tmp_path, tiny_bundle, tiny_predictor, fixture_images):
    from typer.testing import CliRunner

    from dermfusion.cli import app

    url = f"sqlite:///{tmp_path}/audit.db"
    _run_analyses(url, tiny_bundle, tiny_predictor, fixture_images, n=6)
    out = tmp_path / "drift.json"
    res = CliRunner().invoke(app, ["drift", "--db", url, "--bundle", str(tiny_bundle), "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["analyses"] == 6
    assert {"dermoscopic.brightness", "confidence", "predicted_class"} <= set(rep["signals"])
    assert all(s["psi"] >= 0 and s["n"] == 6 for s in rep["signals"].values())
    assert "dermoscopic.brightness" in res.output
    res = CliRunner().invoke(app, ["drift", "--db", url, "--bundle", str(tiny_bundle), "--fail-above", "-1"])
    assert res.exit_code == 1


@pytest.mark.postgres
def test_audit_postgres(postgres_url, tiny_bundle, tiny_predictor, fixture_images):
    results = _run_analyses(postgres_url, tiny_bundle, tiny_predictor, fixture_images)
    store = AuditStore(postgres_url, create=False)
    assert store.backend == "postgresql"
    _check_rows(store, results, tiny_bundle)
    from dermfusion.service.drift import drift_report
    rep = drift_report(postgres_url, tiny_bundle)
    assert rep["analyses"] == len(results) and "confidence" in rep["signals"]
    store.close()
