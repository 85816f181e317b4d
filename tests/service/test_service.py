"""The triage API end to end through FastAPI's TestClient: happy path on the committed fixture images,
every kind of bad input (4xx JSON, never 500), modalities, auth, metrics, limits, overload, privacy."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image

from service_fixtures import (fixture_image_bytes, fixture_images, jpeg_bytes, png_bytes, tiny_bundle,  # noqa: F401
                              tiny_predictor)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.config import ServiceConfigError, load_service_config  # noqa: E402
from dermfusion.service.pool import InferencePool, Overloaded  # noqa: E402


def _config(tmp_path, **over):
    base = {"audit": {"db_url": f"sqlite:///{tmp_path}/audit.db"},
            "limits": {"max_upload_bytes": 400_000, "max_request_bytes": 1_000_000, "max_pixels": 4_000_000},
            "drift": {"window": 50, "min_samples": 1}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
    return load_service_config(None, env={}, **base)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_bundle, tiny_predictor):
    cfg = _config(tmp_path_factory.mktemp("svc"))
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor)) as c:
        yield c


def _post(client, files=None, metadata=None, **kw):
    data = {"metadata": metadata if isinstance(metadata, str) else json.dumps(metadata)} if metadata is not None else None
    return client.post("/v1/analyze", files=files, data=data, **kw)


def _error(r, status, code=None, *words):
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert "error" in body and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    for w in words:
        assert w.lower() in body["error"]["message"].lower(), body
    return body


# ------------------------------------------------------------------------------------------ happy path
def test_analyze_happy_path(client, tiny_bundle, fixture_image_bytes):
    meta = {"age": 55, "sex": "f", "skin_tone": 2, "site": "back"}
    r = _post(client, {"dermoscopic": ("lesion.jpg", fixture_image_bytes, "image/jpeg")}, meta)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == body["request_id"]
    task_classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    diff = body["differential"]
    assert sorted(d["code"] for d in diff) == sorted(task_classes)
    probs = [d["probability"] for d in diff]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-6
    assert body["primary_diagnosis"] == diff[0]
    mal = sum(d["probability"] for d in diff if d["code"] in {"MEL", "BCC", "AKIEC"})
    assert body["risk_score"] == pytest.approx(100 * mal, abs=0.01)
    assert body["action"] in {"monitor", "routine_referral", "urgent_referral"} and body["action_reasons"]
    assert body["model"]["hash"] == (tiny_bundle / "HASH").read_text().strip()
    assert body["model"]["task"] == "isic2018"
    assert body["inputs"]["image_sha256"]["dermoscopic"] == hashlib.sha256(fixture_image_bytes).hexdigest()
    assert body["inputs"]["metadata_used"] == {"age": 55.0, "sex": "female", "skin_tone": "2", "site": "trunk"}
    assert body["inputs"]["metadata_missing"] == []
    assert "not a diagnosis" in body["disclaimer"].lower()
    assert {"decode_ms", "inference_ms", "total_ms", "queue_ms", "audit_ms"} <= set(body["timings_ms"])
    # heat map: a PNG at the uploaded image's size (96×96 fixture)
    (hm,) = body["explanations"]["heatmaps"]
    assert hm["modality"] == "dermoscopic" and "rollout" in hm["method"]
    img = Image.open(io.BytesIO(base64.b64decode(hm["overlay_png_base64"])))
    assert img.format == "PNG" and img.size == (96, 96) == (hm["original_width"], hm["original_height"])
    fusion = body["explanations"]["fusion"]
    names = {d["name"]: d for d in fusion["metadata"]}
    assert set(names) == {"age", "sex", "skin_tone", "site"} and all(d["present"] for d in names.values())
    total = sum(fusion["image"].values()) + sum(d["weight"] for d in fusion["metadata"]) + fusion["none"]
    assert total == pytest.approx(1.0, abs=1e-3)


def test_heatmap_keeps_original_aspect_ratio(client, fixture_images):
    # tiled, not stretched: a 96 px fixture enlarged to 900 × 500 is too blurred to pass the quality gate
    tile, wide = Image.open(fixture_images[1]).convert("RGB"), Image.new("RGB", (900, 500))
    for x in range(0, 900, 96):
        for y in range(0, 500, 96):
            wide.paste(tile, (x, y))
    r = _post(client, {"dermoscopic": ("wide.png", png_bytes(wide), "image/png")})
    assert r.status_code == 200, r.text
    (hm,) = r.json()["explanations"]["heatmaps"]
    ov = Image.open(io.BytesIO(base64.b64decode(hm["overlay_png_base64"])))
    assert (hm["original_width"], hm["original_height"]) == (900, 500)
    assert ov.size == (hm["width"], hm["height"]) and ov.size[0] == 512
    assert abs(ov.size[0] / ov.size[1] - 900 / 500) < 0.01
    left, top, right, bottom = hm["model_region"]  # the centre square the model saw
    assert top == 0 and bottom == ov.size[1] and right - left == ov.size[1]


def test_explain_off_is_faster_path(client, fixture_image_bytes):
    r = client.post("/v1/analyze?explain=false", files={"dermoscopic": ("a.jpg", fixture_image_bytes, "image/jpeg")})
    assert r.status_code == 200 and r.json()["explanations"]["heatmaps"] == []


# ------------------------------------------------------------------------------------------ modalities
def test_unused_modality_is_a_warning(client, fixture_images):
    files = {"clinical": ("c.jpg", fixture_images[2].read_bytes(), "image/jpeg"),
             "dermoscopic": ("d.jpg", fixture_images[3].read_bytes(), "image/jpeg")}
    r = _post(client, files, {"age": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["inputs"]["modalities_received"] == ["clinical", "dermoscopic"]
    assert body["inputs"]["modalities_used"] == ["dermoscopic"]
    assert any("clinical" in w and "not" in w for w in body["warnings"])
    assert [h["modality"] for h in body["explanations"]["heatmaps"]] == ["dermoscopic"]


def test_only_an_unused_modality_is_refused(client, fixture_image_bytes):
    r = _post(client, {"clinical": ("c.jpg", fixture_image_bytes, "image/jpeg")})
    _error(r, 422, "no_usable_image", "dermoscopic")


def test_missing_metadata_flags_review(client, fixture_image_bytes):
    r = _post(client, {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")})
    body = r.json()
    assert r.status_code == 200
    assert body["review_recommended"]
    assert any("missing input" in x for x in body["review_reasons"])
    assert set(body["inputs"]["metadata_missing"]) == {"age", "sex", "skin_tone", "site"}
    fusion = {d["name"]: d for d in body["explanations"]["fusion"]["metadata"]}
    assert not fusion["site"]["present"] and fusion["site"]["weight"] == 0.0


def test_elevation_is_taken_and_said_unused_by_a_model_without_it(client, fixture_image_bytes):
    r = _post(client, {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}, {"elevation": " Nodular "})
    assert r.status_code == 200, r.text  # before: 422 (an unknown key) — Derm7pt metadata models never got it
    body = r.json()
    assert "elevation" not in body["inputs"]["metadata_used"]
    assert any("elevation given but not used" in w for w in body["warnings"])


def test_elevation_from_the_api_reaches_a_model_as_the_manifest_row_did():
    """A Derm7pt metadata model (sex, site, elevation) trained on manifest rows gets the same codes from a request."""
    import pandas as pd

    from dermfusion.data.dataset import batch_from_lesions
    from dermfusion.data.features import FeatureSpec
    from dermfusion.data.transforms import Preprocess
    from dermfusion.service.schemas import PatientMetadata

    row = {"lesion_id": "a", "sex": "female", "site": "trunk", "elevation": "nodular", "age": float("nan"),
           "skin_tone": "", "image_dermoscopic": ""}
    spec = FeatureSpec.from_manifest(pd.DataFrame([row]), ["dermoscopic"], metadata_fields=["sex", "site", "elevation"])
    trained = spec.encode_categorical(pd.DataFrame([row]))
    request = PatientMetadata.model_validate({"sex": "f", "site": "back", "elevation": " Nodular "}).manifest_fields()
    served = batch_from_lesions([{}], [request], spec, {"dermoscopic": Preprocess(size=32)})["categorical"]
    assert served.tolist() == trained.tolist() and trained[0, 2] > 0  # elevation known, not the "unknown" code
    unknown = PatientMetadata.model_validate({"elevation": "n/a"}).manifest_fields()
    assert "elevation" not in unknown


# ------------------------------------------------------------------------------------------ bad input
def _bomb_png() -> bytes:
    return png_bytes(Image.new("1", (8000, 8000), 0))  # 64 MP in a few kB


def _truncated_jpeg(fixture_image_bytes) -> bytes:
    big = jpeg_bytes(Image.open(io.BytesIO(fixture_image_bytes)).resize((300, 300)), quality=95)
    return big[: len(big) // 2]


@pytest.mark.parametrize("case", ["no_image", "not_an_image", "truncated", "too_big_file", "too_big_request",
                                  "bomb", "content_type_text", "json_body", "empty_file", "unknown_field"])
def test_bad_images_are_4xx(client, fixture_image_bytes, case):
    if case == "no_image":
        r = client.post("/v1/analyze", files={"metadata": (None, '{"age": 50}')})
        _error(r, 400, "no_image", "no image")
    elif case == "not_an_image":
        r = _post(client, {"dermoscopic": ("notes.jpg", b"this is not an image at all", "image/jpeg")})
        _error(r, 400, "not_an_image", "not an image")
    elif case == "truncated":
        r = _post(client, {"dermoscopic": ("t.jpg", _truncated_jpeg(fixture_image_bytes), "image/jpeg")})
        _error(r, 400, "truncated_image", "truncated")
    elif case == "too_big_file":
        noise = (np.random.default_rng(0).random((400, 400, 3)) * 255).astype(np.uint8)
        data = png_bytes(Image.fromarray(noise))
        assert 400_000 < len(data) < 1_000_000
        r = _post(client, {"dermoscopic": ("big.png", data, "image/png")})
        _error(r, 413, "payload_too_large", "limit")
    elif case == "too_big_request":
        r = _post(client, {"dermoscopic": ("huge.jpg", b"\xff" * 1_200_000, "image/jpeg")})
        _error(r, 413, "payload_too_large", "exceeds")
    elif case == "bomb":
        r = _post(client, {"dermoscopic": ("bomb.png", _bomb_png(), "image/png")})
        _error(r, 413, "decompression_bomb", "pixels")
    elif case == "content_type_text":
        r = _post(client, {"dermoscopic": ("d.txt", fixture_image_bytes, "text/x-made-up-type")})
        body = _error(r, 415, "unsupported_media_type", "image/jpeg")
        assert "made-up" not in body["error"]["message"], "the client's content type is not echoed"
    elif case == "json_body":
        r = client.post("/v1/analyze", json={"dermoscopic": "aGVsbG8="})
        body = _error(r, 415, "unsupported_media_type", "multipart/form-data")
        assert "application/json" not in body["error"]["message"], "the client's content type is not echoed"
    elif case == "empty_file":
        r = _post(client, {"dermoscopic": ("e.jpg", b"", "image/jpeg")})
        _error(r, 400, "empty_image", "empty")
    elif case == "unknown_field":
        r = _post(client, {"image": ("d.jpg", fixture_image_bytes, "image/jpeg")})
        _error(r, 422, "unknown_field", "unknown form field")  # the field's name is not echoed (issue 20)


@pytest.mark.parametrize("metadata,words", [
    ("{not json", ["not valid json"]),
    ("[1, 2]", ["json object"]),
    ({"age": -3}, ["age", "greater than or equal to 0"]),
    ({"age": 150}, ["age"]),
    ({"age": "old"}, ["age"]),
    ({"site": "elbow pit"}, ["site", "unknown site"]),
    ({"skin_tone": 9}, ["skin_tone", "less than or equal to 5"]),
    ({"sex": "x"}, ["sex"]),
    ({"elevation": "bumpy"}, ["elevation"]),
    ({"notes": "patient worried"}, ["extra"]),  # neither the key nor the value is echoed
    ({"concepts": {"dermoscopic": {"pigmented": 1.7}}}, ["outside [0, 1]"]),
    ({"concepts": {"xray": {"a": 0.1}}}, ["image type"]),
])
def test_bad_metadata_is_422(client, fixture_image_bytes, metadata, words):
    r = _post(client, {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}, metadata)
    body = _error(r, 422, "invalid_metadata", *words)
    assert body["error"]["field"] == "metadata"
    assert "patient worried" not in r.text  # free text is never echoed back


def test_unknown_route_and_method_are_json(client):
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/analyze"), 405, "method_not_allowed")


# ------------------------------------------------------------------------------------------ operations
def test_health_ready_model_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok", "ready": None, "detail": None, "warnings": []}
    assert client.get("/readyz").json()["ready"] is True
    info = client.get("/v1/model").json()
    assert info["classes"] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert info["modalities"] == ["dermoscopic"] and info["malignant"] == ["AKIEC", "BCC", "MEL"]
    # the operating point in force: the bundle's (chosen on its out-of-fold posteriors), with its source
    assert info["thresholds"]["source"] == "bundle" and "calibration" in info and info["drift_reference"]
    assert info["decisions"]["prior"]["name"] == "training" and info["decisions"]["differential"]["level"] == 0.95
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/analyze"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("AnalyzeResponse")
    assert {"AnalyzeResponse", "ErrorResponse", "ModelInfo"} <= set(spec["components"]["schemas"])
    assert client.get("/").status_code == 200 and "dermfusion" in client.get("/").text


def test_metrics_exposed(client, fixture_image_bytes):
    _post(client, {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}, {"age": 30})
    _post(client, {"dermoscopic": ("d.jpg", b"nope", "image/jpeg")})
    text = client.get("/metrics").text
    for name in ("dermfusion_request_latency_seconds_bucket", 'dermfusion_requests_total{endpoint="/v1/analyze",status="200"}',
                 'status="400"', "dermfusion_predictions_total{class=", "dermfusion_prediction_confidence_bucket",
                 'dermfusion_input_drift_psi{signal="dermoscopic.brightness"}', 'signal="confidence"',
                 "dermfusion_model_info{", "dermfusion_rejected_total{code=\"not_an_image\"}", "dermfusion_ready 1.0"):
        assert name in text, name


def test_privacy_no_image_bytes_or_metadata_in_logs(client, fixture_image_bytes, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    meta = {"age": 61.5, "sex": "male", "site": "genital", "skin_tone": 4}
    r = _post(client, {"dermoscopic": ("patient_jane_doe.jpg", fixture_image_bytes, "image/jpeg")}, meta)
    assert r.status_code == 200
    _post(client, {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}, {"age": -3, "site": "genital"})
    logs = "\n".join(rec.getMessage() for rec in caplog.records)
    assert r.json()["request_id"] in logs  # the request is logged …
    for secret in ("61.5", "genital", "jane_doe", base64.b64encode(fixture_image_bytes[:48]).decode()[:40]):
        assert secret not in logs  # … but not what was in it


def test_store_images_only_when_configured(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    files = {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}
    cfg = _config(tmp_path, audit={"image_dir": str(tmp_path / "off")})
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)) as c:
        assert _post(c, files).status_code == 200
    assert not (tmp_path / "off").exists()  # default: images are not stored
    cfg = _config(tmp_path, audit={"store_images": True, "image_dir": str(tmp_path / "imgs")})
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)) as c:
        rid = _post(c, files).json()["request_id"]
    (stored,) = list((tmp_path / "imgs").rglob("*.png"))  # re-encoded from the pixels: no metadata (test_patient_data)
    assert stored.name == f"{rid}_dermoscopic.png"
    assert np.array_equal(np.asarray(Image.open(stored)), np.asarray(Image.open(io.BytesIO(fixture_image_bytes))))


# ------------------------------------------------------------------------------------------ auth
def test_api_key_auth(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    cfg = load_service_config(None, env={"DERMFUSION_API_KEYS": "k-one, k-two"},
                              audit={"db_url": f"sqlite:///{tmp_path}/a.db"})
    # bare secrets (deprecated): hashed when read, analyze-only keys named key-1, key-2 (roles: test_access_roles)
    assert cfg.auth.api_keys == [] and [(k.id, k.scopes) for k in cfg.auth.keys] == [("key-1", ["analyze"]),
                                                                                       ("key-2", ["analyze"])]
    assert "k-one" not in cfg.model_dump_json()
    files = {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)) as c:
        _error(c.post("/v1/analyze", files=files), 401, "unauthorized", "X-API-Key")
        _error(c.post("/v1/analyze", files=files, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        _error(c.get("/v1/model"), 401, "unauthorized")
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 401  # keys: metrics scope
        assert c.get("/").status_code == 200  # the page loads; it asks for the key
        r = c.post("/v1/analyze", files=files, headers={"X-API-Key": "k-two"})
        assert r.status_code == 200, r.text
        assert c.get("/v1/model", headers={"X-API-Key": "k-one"}).json()["auth_required"] is True
        from dermfusion.service.audit import AuditStore
        row = AuditStore(cfg.audit.db_url).get(r.json()["request_id"])
        assert row["client"] == "key-2" and "k-two" not in json.dumps(row, default=str)  # the key's id, not the key


def test_auth_off_by_default(client, fixture_image_bytes):
    r = client.post("/v1/analyze", files={"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")},
                    headers={"X-API-Key": "anything"})
    assert r.status_code == 200
    assert client.get("/v1/model").json()["auth_required"] is False


# ------------------------------------------------------------------------------------------ overload
def test_pool_refuses_beyond_capacity():
    async def main():
        pool = InferencePool(workers=1, queue_size=1, queue_timeout_s=5)
        gate = threading.Event()
        results = await asyncio.gather(*(pool.run(lambda: gate.wait(5) or "done") for _ in range(2)),
                                       _refused(pool), _release(gate), return_exceptions=True)
        pool.shutdown()
        return results

    async def _refused(pool):
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as e:
            await pool.run(lambda: None)
        assert e.value.retry_after >= 1
        return "refused"

    async def _release(gate):
        await asyncio.sleep(0.2)
        gate.set()

    res = asyncio.run(main())
    assert [r[0] for r in res[:2]] == [True, True] and res[2] == "refused"


def test_overload_answers_503_and_loop_stays_responsive(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    """One worker, one queue place: while the worker is held, two requests are taken (one running, one waiting)
    and the next two are answered 503 at once — and /healthz answers meanwhile (inference is off the event loop).
    The worker is held by an event, not a sleep, so a slow machine cannot reorder the story."""
    cfg = _config(tmp_path, workers={"workers": 1, "queue_size": 1, "queue_timeout_s": 30})
    app = create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)
    release = threading.Event()
    with TestClient(app) as c:
        an = app.state.svc.analyzer
        real = an.analyze

        def held(*a, **k):
            release.wait(30)
            return real(*a, **k)

        an.analyze = held
        out = []

        def call():
            out.append(c.post("/v1/analyze", files={"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}))

        threads = [threading.Thread(target=call) for _ in range(4)]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while sum(r.status_code == 503 for r in list(out)) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [r.status_code for r in out] == [503, 503], "two requests over capacity are refused at once"
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            assert time.perf_counter() - t0 < 0.5  # inference runs off the event loop
        finally:
            release.set()
            for t in threads:
                t.join()
            an.analyze = real
    codes = sorted(r.status_code for r in out)
    assert codes == [200, 200, 503, 503], codes
    busy = [r for r in out if r.status_code == 503]
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "overloaded" for r in busy)


def test_not_ready_is_503(tmp_path):
    app = create_app(tmp_path / "missing_bundle", _config(tmp_path), warm_in_background=True)
    with TestClient(app) as c:
        for _ in range(50):
            if app.state.svc.status == "error":
                break
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and "missing_bundle" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
        _error(c.post("/v1/analyze", files={"dermoscopic": ("d.jpg", b"x", "image/jpeg")}), 503, "not_ready")


# ------------------------------------------------------------------------------------------ config
def test_service_config_validation(tmp_path):
    p = tmp_path / "service.yaml"
    p.write_text("triage: {urgent_risk: 40, routine_risk: 10, urgent_class_probability: {MEL: 0.2}}\n"
                 "workers: {workers: 3, queue_size: 4}\naudit: {db_url: 'sqlite:///x.db', store_images: false}\n")
    cfg = load_service_config(p, env={"DERMFUSION_AUDIT_DB_URL": "sqlite:///y.db"})
    assert cfg.triage.urgent_risk == 40 and cfg.workers.workers == 3 and cfg.audit.db_url == "sqlite:///y.db"
    for bad in ("triage: {urgent_risk: 10, routine_risk: 20}", "workers: {workers: 0}", "tirage: {}",
                "triage: {urgent_class_probability: {MEL: 3}}"):
        p.write_text(bad)
        with pytest.raises(ServiceConfigError):
            load_service_config(p, env={})


def test_triage_policy():
    from dermfusion.clinical.settings import TriageConfig, UncertaintyConfig
    from dermfusion.clinical.triage import decide
    from dermfusion.tasks import ISIC2018

    t, u = TriageConfig().cut_offs(), UncertaintyConfig()  # the built-in cut-offs (no bundle operating point)
    p = np.array([0.35, 0.6, 0.01, 0.01, 0.01, 0.01, 0.01])  # MEL 0.35 ≥ 0.30 → urgent despite risk 37
    d = decide(ISIC2018, p, t, u)
    assert d.action == "urgent_referral" and any("MEL" in r for r in d.action_reasons)
    d = decide(ISIC2018, np.array([0.02, 0.95, 0.0, 0.0, 0.03, 0.0, 0.0]), t, u)
    assert d.action == "monitor" and not d.review_recommended
    d = decide(ISIC2018, np.array([0.05, 0.62, 0.05, 0.1, 0.18, 0.0, 0.0]), t, u)
    assert d.action == "routine_referral" and d.risk_score == pytest.approx(20)
    d = decide(ISIC2018, np.full(7, 1 / 7), t, u, missing_images=["clinical"])
    assert d.review_recommended and len(d.review_reasons) == 3


def test_non_network_bundle_kind(tmp_path, tiny_predictor, fixture_image_bytes):
    """Any predictor works through the generic path: an in-memory manifest row holding the decoded image itself
    (no temporary files)."""
    from dermfusion.inference.predictor import Predictor
    from dermfusion.service.analyzer import Analyzer

    seen = {}

    class Stub(Predictor):
        bundle = tiny_predictor.bundle

        def predict_raw(self, df, *, tta=0, progress=False):
            row = df.iloc[0]
            img = row["image_dermoscopic"]
            assert isinstance(img, Image.Image), "the upload stays in memory"
            seen.update(age=row["age"], site=row["site"], image=img.size)
            return np.array([[0.7, 0.1, 0.05, 0.05, 0.05, 0.03, 0.02]])

    cfg = _config(tmp_path)
    an = Analyzer(Stub(), cfg)
    assert an.explainer is None and an.modalities == ["dermoscopic"]  # unknown kind: the task's images
    app = create_app(None, cfg, analyzer=an, warmup=False)
    with TestClient(app) as c:
        r = _post(c, {"dermoscopic": ("d.jpg", fixture_image_bytes, "image/jpeg")}, {"age": 70, "site": "hand"})
    body = r.json()
    assert r.status_code == 200, r.text
    assert seen == {"age": 70.0, "site": "hand", "image": (96, 96)}
    assert body["explanations"]["heatmaps"] == [] and any("not available" in w for w in body["warnings"])
    assert body["primary_diagnosis"]["code"] == "MEL" and body["action"] != "monitor"  # (after calibration)
