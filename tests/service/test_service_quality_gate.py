"""The "cannot assess" outcome through the API: blank, uniform-colour, degraded and non-skin images get
``action: cannot_assess`` with reasons (no referral advice, no heat maps), audited, counted by reason in
Prometheus and kept out of drift; a real dermoscopic fixture image passes; the model check fires on a cut
from the service config; the bundle's out-of-fold reference gives the cut; the gate can be switched off.
Uses only the committed fixtures (no ../shared, no network)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cli_helpers import squash
from service_fixtures import (fixture_image_bytes, fixture_images, jpeg_bytes, png_bytes, tiny_bundle,  # noqa: F401
                              tiny_predictor)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.audit import AuditStore  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402
from dermfusion.clinical.quality import QualityGate  # noqa: E402

ACTIONS = {"monitor", "routine_referral", "urgent_referral"}


def _config(tmp_path, **over):
    base = {"audit": {"db_url": f"sqlite:///{tmp_path}/audit.db"}, "drift": {"window": 50, "min_samples": 1}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_service_config(None, env={}, **base)


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tiny_bundle, tiny_predictor):
    tmp = tmp_path_factory.mktemp("gate")
    app = create_app(tiny_bundle, _config(tmp), predictor=tiny_predictor)
    with TestClient(app) as c:
        yield c, app.state.svc, tmp


def _analyze(client, data: bytes, name="d.png", mime="image/png", **params):
    r = client.post("/v1/analyze", params=params, files={"dermoscopic": (name, data, mime)},
                    data={"metadata": json.dumps({"age": 50, "sex": "female", "site": "back"})})
    assert r.status_code == 200, r.text
    return r.json()


def _lesion(fixture_images, i=0) -> Image.Image:
    return Image.open(fixture_images[i]).convert("RGB")


def _refused(body, *codes):
    assert body["action"] == "cannot_assess", body["action"]
    q = body["quality"]
    assert q["assessable"] is False and {r["code"] for r in q["reasons"]} == set(codes), q["reasons"]
    assert body["action_reasons"] == [r["message"] for r in q["reasons"]]
    assert body["review_recommended"] and all(x.startswith("image not assessable — retake")
                                              for x in body["review_reasons"])
    assert body["explanations"]["heatmaps"] == [] and body["explanations"]["fusion"] is None
    return body


def test_fixture_dermoscopic_image_passes(app_client, fixture_image_bytes):
    c, _, _ = app_client
    body = _analyze(c, fixture_image_bytes, "lesion.jpg", "image/jpeg")
    assert body["action"] in ACTIONS and body["quality"]["assessable"] is True and body["quality"]["reasons"] == []
    assert set(body["quality"]["measures"]["dermoscopic"]) == {"colour_spread", "dark_fraction", "bright_fraction",
                                                              "sharpness", "skin_fraction"}
    assert body["explanations"]["heatmaps"]  # explained as usual
    assert "quality_ms" in body["timings_ms"]


@pytest.mark.parametrize("colour", [(128, 128, 128), (205, 150, 125), (30, 80, 200)])
def test_blank_and_uniform_colour_cannot_be_assessed(app_client, colour):
    c, _, _ = app_client
    body = _refused(_analyze(c, png_bytes(Image.new("RGB", (320, 240), colour))), "blank")
    assert "dermoscopic image: image is blank or one uniform colour" in body["action_reasons"][0]


def test_white_and_black_frames_cannot_be_assessed(app_client):
    c, _, _ = app_client
    _refused(_analyze(c, png_bytes(Image.new("RGB", (320, 240), (255, 255, 255)))), "overexposed")
    body = _refused(_analyze(c, jpeg_bytes(Image.new("RGB", (320, 240), (0, 0, 0))), "x.jpg", "image/jpeg"),
                    "underexposed")
    assert "image too dark" in body["action_reasons"][0]


def test_non_skin_images_cannot_be_assessed(app_client, fixture_images):
    c, _, _ = app_client
    img = _lesion(fixture_images)
    grey = img.convert("L").convert("RGB")
    green = Image.fromarray(np.asarray(img)[..., [1, 0, 2]].copy())  # red and green swapped
    for bad in (grey, green):
        _refused(_analyze(c, jpeg_bytes(bad, quality=95), "x.jpg", "image/jpeg"), "not_skin")


def test_degraded_images_cannot_be_assessed(app_client, fixture_images):
    c, _, _ = app_client
    img = _lesion(fixture_images, 1)
    _refused(_analyze(c, png_bytes(img.filter(ImageFilter.GaussianBlur(3)))), "blurred")
    dark = Image.fromarray((np.asarray(img, dtype=np.float32) * 0.12).astype(np.uint8))
    _refused(_analyze(c, png_bytes(dark)), "underexposed")


def test_outcome_is_audited_counted_and_kept_out_of_drift(app_client):
    c, state, tmp = app_client
    before = len(state.drift.window)
    body = _analyze(c, png_bytes(Image.new("RGB", (200, 200), (205, 150, 125))), explain="false")
    row = AuditStore(f"sqlite:///{tmp}/audit.db", create=False).get(body["request_id"])
    assert row["action"] == "cannot_assess" and row["review_recommended"] is True
    assert any("blank" in r for r in row["review_reasons"])
    assert len(state.drift.window) == before  # a refused image is no evidence about the served population
    text = c.get("/metrics").text
    assert 'dermfusion_cannot_assess_total{reason="blank"}' in text
    assert 'dermfusion_actions_total{action="cannot_assess"}' in text
    info = c.get("/v1/model").json()["quality"]
    # the tiny bundle's reference holds 48 lesions (< min_reference_lesions): the model check is off, and says so
    assert info["enabled"] and info["min_top_probability"] is None and "off" in info["min_top_probability_source"]
    assert set(info["reasons"]) == {"blank", "underexposed", "overexposed", "blurred", "not_skin", "model_unsure",
                                     "unfamiliar"}


def test_model_check_from_config(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    cfg = _config(tmp_path, quality={"min_top_probability": 0.99})
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)) as c:
        body = _refused(_analyze(c, fixture_image_bytes, "d.jpg", "image/jpeg"), "model_unsure")
        assert "model unsure: out of distribution" in body["action_reasons"][0]
        assert body["quality"]["min_top_probability"] == 0.99
        assert c.get("/v1/model").json()["quality"]["min_top_probability_source"] == "service config"


def test_model_check_cut_from_the_bundle_reference(tiny_bundle):
    from dermfusion.evaluation.drift_reference import read_reference_stats
    from dermfusion.clinical.settings import QualityConfig

    ref = read_reference_stats(tiny_bundle)
    gq = ref["quality_gate"]  # written at training time beside the drift signals
    assert gq["n"] == 48 and gq["levels"][0] == 0.0 and len(gq["quantiles"]) == len(gq["levels"])
    gate = QualityGate(QualityConfig(min_reference_lesions=10, oof_rejection_rate=0.0), ref)
    assert gate.min_top_probability == pytest.approx(gq["quantiles"][0]) and "48 lesions" in gate.source
    assert QualityGate(QualityConfig(model_check=False, min_top_probability=0.5), ref).min_top_probability is None


def test_gate_off_gives_the_old_behaviour(tmp_path, tiny_bundle, tiny_predictor):
    cfg = _config(tmp_path, quality={"enabled": False})
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)) as c:
        body = _analyze(c, png_bytes(Image.new("RGB", (200, 200), (255, 255, 255))), explain="false")
    assert body["action"] in ACTIONS and body["quality"]["assessable"] is True


def test_config_rejects_bad_quality_settings():
    from dermfusion.service.config import ServiceConfigError

    with pytest.raises(ServiceConfigError):
        load_service_config(None, env={}, quality={"min_skin_fraction": 1.5})
    with pytest.raises(ServiceConfigError):
        load_service_config(None, env={}, quality={"min_sharpnes": 2})


def test_every_consumer_knows_the_new_outcome():
    from typing import get_args

    from dermfusion.evaluation.quality_gate import REASONS
    from dermfusion.service.schemas import Action, AnalyzeResponse, QualityReason
    from dermfusion.clinical.triage import ACTIONS
    from dermfusion.service.routes import WEB_DIR

    assert set(get_args(Action)) == set(ACTIONS) and "cannot_assess" in ACTIONS
    assert set(get_args(QualityReason.model_fields["code"].annotation)) == set(REASONS)
    assert "quality" in AnalyzeResponse.model_fields
    js, css = (WEB_DIR / "app.js").read_text(), (WEB_DIR / "style.css").read_text()
    assert 'cannot_assess: "Image not assessable — retake"' in js and ".action-card.cannot_assess" in css


@pytest.mark.browser
def test_web_page_shows_not_assessable(tmp_path, tiny_bundle, tiny_predictor, fixture_images):
    """In the real page (headless Chromium): a blank image → "Image not assessable — retake" with its reason,
    and no risk score, differential or heat maps; then a real lesion → a normal result again."""
    import os
    from pathlib import Path

    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("uvicorn")
    chromium = os.environ.get("DERMFUSION_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        pytest.skip(f"chromium not found at {chromium} (set DERMFUSION_CHROMIUM)")
    from service_fixtures import ServerThread

    blank = tmp_path / "blank.png"
    Image.new("RGB", (320, 240), (205, 150, 125)).save(blank)
    with ServerThread(create_app(tiny_bundle, _config(tmp_path), predictor=tiny_predictor)) as srv, \
            sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = b.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_selector("#model-line:has-text('Model ')")  # (no string-eval waits: the page's CSP forbids)
        page.set_input_files("#dermoscopic", str(blank))
        page.click("#submit")
        page.wait_for_selector("#results:not([hidden])", timeout=30_000)
        assert page.inner_text("[data-testid=action]") == "Image not assessable — retake"
        assert "uniform colour" in page.inner_text("#action-reasons")
        for sel in ("[data-testid=risk-score]", "#differential", "#heatmaps"):
            assert not page.is_visible(sel), sel
        page.set_input_files("#dermoscopic", str(fixture_images[0]))
        page.click("#submit")
        page.wait_for_selector("#results:not([hidden]):not(.not-assessable)", timeout=30_000)
        assert page.inner_text("[data-testid=action]") in {"Urgent referral", "Routine referral", "Monitor"}
        assert page.is_visible("#differential") and page.locator("#differential li").count() == 7
        assert errors == []
        b.close()


# --------------------------------------------------------------------------------------- familiarity check
@pytest.fixture(scope="module")
def familiar_bundle(tmp_path_factory, tiny_bundle, ham_sample):
    """The tiny bundle with a familiarity reference fitted on the 48 fixture lesions (`dermfusion bundle
    reference`, the CLI way); a copy, so the other tests' bundle stays without one."""
    from typer.testing import CliRunner

    from dermfusion.cli import app

    bundle = tmp_path_factory.mktemp("familiar") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = bundle.parent / "manifest.parquet"
    ham_sample.to_parquet(manifest)
    run = CliRunner().invoke(app, ["bundle", "reference", str(bundle), "--manifest", str(manifest), "--all-rows"])
    assert run.exit_code == 0, run.output
    from dermfusion.evaluation.embedding_reference import read_reference

    ref = read_reference(bundle)  # what was written, then what was said
    assert ref is not None and ref["layer_names"] == ["blocks.0", "blocks.1"] and ref["n"] == len(ham_sample)
    assert f"{len(ham_sample)} lesions" in squash(run.output) and "layers blocks.0, blocks.1" in squash(run.output)
    return bundle


def test_reference_is_covered_by_the_bundle_hash(familiar_bundle, tmp_path):
    from typer.testing import CliRunner

    from dermfusion.cli import app

    assert CliRunner().invoke(app, ["bundle", "verify", str(familiar_bundle)]).exit_code == 0
    assert "embedding_reference.npz" in (familiar_bundle / "SHA256SUMS").read_text()
    tampered = tmp_path / "tampered"
    shutil.copytree(familiar_bundle, tampered)
    with open(tampered / "embedding_reference.npz", "ab") as f:
        f.write(b"\0")
    run = CliRunner().invoke(app, ["bundle", "verify", str(tampered)])
    assert run.exit_code == 1 and "embedding_reference.npz" in squash(run.output)


@pytest.mark.parametrize("margin,refused", [(0.01, True), (100.0, False)])
def test_familiarity_check_through_the_api(tmp_path, familiar_bundle, fixture_image_bytes, margin, refused):
    from dermfusion.evaluation.embedding_reference import read_reference, score_threshold

    app = create_app(familiar_bundle, _config(tmp_path, quality={"familiarity_margin": margin}))
    with TestClient(app) as c:
        body = _analyze(c, fixture_image_bytes, "lesion.jpg", "image/jpeg")
        info = c.get("/v1/model").json()["quality"]
    q = body["quality"]
    cut = score_threshold(read_reference(familiar_bundle), margin)
    assert q["max_unfamiliarity"] == pytest.approx(cut) and info["max_unfamiliarity"] == pytest.approx(cut)
    assert "48 lesions" in info["familiarity_reference"]
    assert q["unfamiliarity"] is not None and q["unfamiliarity"] > 0
    if refused:  # a cut far below any real score: the image is refused as unlike the training lesions
        _refused(body, "unfamiliar")
        assert "image unlike the lesions the model was trained on" in body["action_reasons"][0]
    else:
        assert body["action"] in ACTIONS and q["assessable"]


def test_familiarity_check_off_without_a_reference_or_when_switched_off(app_client, tmp_path, familiar_bundle,
                                                                         fixture_image_bytes):
    c, _, _ = app_client  # the tiny bundle has no reference: the check is off and /v1/model says why
    info = c.get("/v1/model").json()["quality"]
    assert info["max_unfamiliarity"] is None and "dermfusion bundle reference" in info["familiarity_reference"]
    assert _analyze(c, fixture_image_bytes, "l.jpg", "image/jpeg")["quality"]["unfamiliarity"] is None
    app = create_app(familiar_bundle, _config(tmp_path, quality={"familiarity_check": False, "familiarity_margin": 0.01}))
    with TestClient(app) as c2:
        body = _analyze(c2, fixture_image_bytes, "l.jpg", "image/jpeg")
    assert body["action"] in ACTIONS and body["quality"]["unfamiliarity"] is None
