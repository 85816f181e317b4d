"""The clinician page in a real browser: headless Chromium (Playwright) against a real uvicorn server.

Uploads an image (file picker) and drags a second one in, fills the metadata form, submits, and checks
that the differential, the action, the risk score and the heat map appear; checks client-side
validation, accessible labels, and a phone-sized viewport. Screenshots go to a temp folder, and to
tests/artifacts/ when DERMFUSION_ARTIFACTS is set.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from service_fixtures import ServerThread, fixture_images, tiny_bundle, tiny_predictor  # noqa: F401

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("DERMFUSION_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
API_KEY = "web-test-key"


def _save_shot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("DERMFUSION_ARTIFACTS"):
        dest = Path(__file__).resolve().parents[1] / "artifacts"  # tests/artifacts
        dest.mkdir(exist_ok=True)
        shutil.copy(shot, dest / name)
    return shot


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle, tiny_predictor):
    pytest.importorskip("uvicorn")
    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    db = tmp_path_factory.mktemp("web") / "audit.db"
    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{db}"}, auth={"api_keys": [API_KEY]})
    with ServerThread(create_app(tiny_bundle, cfg, predictor=tiny_predictor)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM} (set DERMFUSION_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _expect():
    # locator assertions, not wait_for_function: the page's Content-Security-Policy forbids the eval that
    # wait_for_function needs (it would fail with "EvalError: ... 'unsafe-eval' is not allowed")
    return pytest.importorskip("playwright.sync_api").expect


def _enter_key(page):
    _expect()(page.locator("#model-line")).to_contain_text("API key")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    _expect()(page.locator("#model-line")).to_have_text(re.compile(r"^Model "))


def _drop_file(page, selector: str, path: Path, mime: str = "image/jpeg"):
    b64 = base64.b64encode(path.read_bytes()).decode()
    page.evaluate("""([sel, b64, name, mime]) => {
        const bin = atob(b64); const bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: mime}));
        const zone = document.querySelector(sel);
        for (const t of ['dragover', 'drop']) zone.dispatchEvent(new DragEvent(t, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [selector, b64, path.name, mime])


def test_upload_fill_submit_shows_result(server, browser, fixture_images, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    assert "dermfusion" in page.title()
    assert "not a diagnosis" in page.inner_text("#disclaimer").lower()
    _enter_key(page)
    assert "dermoscopic" in page.inner_text("#modality-note")

    # every form control has an accessible label
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('#analyze-form input, #analyze-form select, #analyze-form textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map(el => el.id)""")
    assert unlabeled == []

    # client-side validation: no image, then a bad age
    page.click("#submit")
    assert "at least one image" in page.inner_text("#form-error")
    page.set_input_files("#dermoscopic", str(fixture_images[0]))
    page.wait_for_selector("#preview-dermoscopic:not([hidden])")
    page.fill("#age", "-3")
    page.click("#submit")
    assert "between 0 and 120" in page.inner_text("#age-error")
    assert page.get_attribute("#age", "aria-invalid") == "true"

    # a clinical photo dragged in as well (this HAM model will not use it: a warning, not an error)
    _drop_file(page, "#drop-clinical", fixture_images[1])
    page.wait_for_selector("#preview-clinical:not([hidden])")
    page.fill("#age", "63")
    page.select_option("#sex", "female")
    page.select_option("#skin_tone", "3")
    page.select_option("#site", "trunk")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=30_000)

    rows = page.locator("#differential li")
    assert rows.count() == 7
    assert page.locator("#differential [role=meter]").count() == 7
    action = page.inner_text("[data-testid=action]")
    assert action in {"Urgent referral", "Routine referral", "Monitor"}
    assert 0 <= int(page.inner_text("[data-testid=risk-score]")) <= 100
    assert page.locator("#heatmaps img").count() == 2  # uploaded photo + overlay
    assert page.evaluate("document.querySelector('#heatmaps figure:last-child img').naturalWidth") > 0
    assert "clinical" in page.inner_text("#warning-list")
    assert "not a diagnosis" in page.inner_text("#result-disclaimer").lower()
    assert page.locator("#fusion li").count() >= 2
    # the conformal differential, the prior the probabilities assume and the operating point are stated
    pset = page.inner_text("[data-testid=prediction-set]")
    assert re.match(r"With \d+% confidence: ", pset), pset
    assert page.locator("#differential li.in-set").count() == len(pset.split(":", 1)[1].replace(" or ", ", ").split(","))
    assert "case mix of the training data" in page.inner_text("[data-testid=prior-note]")
    page.click("#operating-point-block summary")
    op = page.inner_text("#operating-point")
    assert "Operating point from the bundle" in op and "out-of-fold lesions" in op, op
    shot = _save_shot(page, tmp_path, "web_desktop.png")
    assert shot.stat().st_size > 10_000
    assert errors == []
    page.close()


def test_phone_viewport(server, browser, fixture_images, tmp_path):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                              has_touch=True)
    page = ctx.new_page()
    page.goto(server.url + "/")
    _enter_key(page)
    no_hscroll = "document.documentElement.scrollWidth <= window.innerWidth + 1"
    assert page.evaluate(no_hscroll)
    page.set_input_files("#dermoscopic", str(fixture_images[2]))
    page.fill("#age", "35")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=30_000)
    assert page.evaluate(no_hscroll)
    box = page.locator("#action-card").bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 391
    assert page.locator("#differential li").count() == 7
    btn = page.locator("#submit").bounding_box()
    assert btn["height"] >= 44  # touch-sized
    _save_shot(page, tmp_path, "web_phone.png")
    ctx.close()


def test_stale_result_is_cleared(server, browser, fixture_images):
    """Issue 20, finding 12: a result never stays on screen beside inputs it was not computed from — it goes when
    another image is chosen and when an analysis fails (a refused key, a busy server)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    _enter_key(page)

    def analyse():
        page.click("#submit")
        page.wait_for_selector("#results:not([hidden])", timeout=30_000)
        assert page.locator("#differential li").count() == 7

    def assert_cleared():
        assert page.locator("#results").is_hidden()
        assert page.locator("#differential li").count() == 0 and page.locator("#heatmaps img").count() == 0
        assert page.evaluate("document.getElementById('action').textContent") == ""
        assert page.evaluate("document.getElementById('result-meta').textContent") == ""

    page.set_input_files("#dermoscopic", str(fixture_images[0]))
    page.fill("#age", "50")
    analyse()
    page.set_input_files("#dermoscopic", str(fixture_images[1]))  # another image chosen: the old result goes
    assert_cleared()
    analyse()
    _drop_file(page, "#drop-dermoscopic", fixture_images[2])  # dropped in, too
    assert_cleared()
    analyse()

    page.fill("#api-key", "not-the-key")  # the analysis fails (401): no result left from before
    page.click("#submit")
    _expect()(page.locator("#form-error")).to_contain_text("API key")
    assert_cleared()
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    analyse()
    page.route("**/v1/analyze", lambda route: route.fulfill(
        status=503, content_type="application/json", headers={"Retry-After": "2"},
        body='{"error": {"code": "overloaded", "message": "server busy"}, "request_id": "x"}'))
    page.click("#submit")  # the server is busy: same image, failed analysis
    _expect()(page.locator("#form-error")).to_contain_text("busy")
    assert_cleared()
    assert errors == []
    page.close()


def test_docs_page_needs_nothing_from_outside(server, browser):
    """Issue 20, finding 11: /docs renders from the package's Swagger UI with no request leaving the server and no
    Content-Security-Policy violation."""
    pytest.importorskip("swagger_ui_bundle", reason="the serve extra's swagger-ui-bundle-v2")
    page = browser.new_page()
    outside, console = [], []
    page.on("console", lambda m: console.append(m.text))
    page.on("pageerror", lambda e: console.append(str(e)))

    def block(route):
        outside.append(route.request.url)
        route.abort()

    page.route(lambda url: not url.startswith(server.url) and not url.startswith("data:"), block)
    r = page.goto(server.url + "/docs")
    assert r.status == 200 and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    page.wait_for_selector(".opblock", timeout=30_000)
    assert page.locator(".opblock").count() >= 5  # the operations rendered
    assert "/v1/analyze" in page.inner_text("body")
    assert outside == []
    assert not [m for m in console if "Content Security Policy" in m or "Refused" in m], console
    page.close()
