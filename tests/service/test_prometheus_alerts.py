"""The alert rules against a real Prometheus scraping a real service: docs/alerts/dermfusion-rules.yml loaded by
/usr/bin/prometheus (scrape and evaluation every 1 s), the service on loopback (uvicorn in a thread, the tiny
bundle), a stream of blank images the quality gate refuses → DermfusionCannotAssessRateHigh fires; the stream
stops → it clears.

The test runs a *copy* of the rules with short windows, so it takes well under a minute: every range selector
(``[30m]``, ``[1h]`` …) becomes ``[15s]`` and every ``for:`` becomes ``2s``. Thresholds, minimum counts and
expressions are the production ones. Skipped (with the reason) when the Prometheus server binary is missing.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from service_fixtures import ServerThread, free_port, jpeg_bytes, tiny_bundle, tiny_predictor  # noqa: F401

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RULES = Path(__file__).resolve().parents[2] / "docs" / "alerts" / "dermfusion-rules.yml"
ALERT = "DermfusionCannotAssessRateHigh"
WINDOW, FOR = "15s", "2s"


def _prometheus() -> str:
    exe = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if exe is None:
        pytest.skip("the Prometheus server binary is not installed (Debian: apt-get install prometheus)")
    return exe


def fast_rules(text: str) -> str:
    """The rules with every range selector ``[15s]`` and every ``for:`` ``2s`` (thresholds unchanged)."""
    text, windows = re.subn(r"\[\d+[smhd]\]", f"[{WINDOW}]", text)
    text, fors = re.subn(r"(?m)^(\s+for:\s*)\d+[smhd]\s*$", rf"\g<1>{FOR}", text)
    assert windows and fors, "the rules file has no windows or for: to shorten"
    return text


def _alerts(url: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/alerts", timeout=2)
    r.raise_for_status()
    return r.json()["data"]["alerts"]


def _state(url: str, name: str) -> str | None:
    """'pending', 'firing' or None (inactive) for alert ``name``."""
    states = {a["state"] for a in _alerts(url) if a["labels"].get("alertname") == name}
    return "firing" if "firing" in states else "pending" if "pending" in states else None


def _wait_for(check, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"{what} within {timeout:.0f} s; prometheus log tail:\n{tail}")


@pytest.fixture
def service(tmp_path, tiny_bundle, tiny_predictor):
    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/audit.db"},
                              drift={"window": 50, "min_samples": 1}, explain={"enabled": False})
    with ServerThread(create_app(tiny_bundle, cfg, predictor=tiny_predictor)) as server:
        yield server


@pytest.fixture
def prometheus(tmp_path, service):
    exe = _prometheus()
    rules = tmp_path / "rules.yml"
    rules.write_text(fast_rules(RULES.read_text()))
    promtool = shutil.which("promtool")
    if promtool:  # the shortened copy is still a valid rules file
        check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "dermfusion", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{service.port}"]}]}]}))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: proc.poll() is None and httpx.get(url + "/-/ready", timeout=2).status_code == 200,
                  30, "prometheus did not become ready", log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_cannot_assess_alert_fires_and_clears(service, prometheus):
    url, log = prometheus
    # the target is scraped and every rule evaluates without error
    _wait_for(lambda: any(t["health"] == "up" for t in
                          httpx.get(url + "/api/v1/targets", timeout=2).json()["data"]["activeTargets"]),
              15, "the service target was not scraped", log)
    assert _state(url, ALERT) is None

    blank = jpeg_bytes(Image.new("RGB", (128, 128), (150, 110, 95)))
    stop, sent, statuses = threading.Event(), [0], set()

    def drive():  # blank frames, one after another: every one is "cannot assess: blank"
        with httpx.Client(base_url=service.url, timeout=10) as client:
            while not stop.is_set():
                r = client.post("/v1/analyze", params={"explain": "false"},
                                files={"dermoscopic": ("blank.jpg", blank, "image/jpeg")})
                statuses.add(r.status_code)
                if r.status_code == 200:
                    assert r.json()["action"] == "cannot_assess"
                sent[0] += 1
                time.sleep(0.05)

    driver = threading.Thread(target=drive, daemon=True)
    t0 = time.monotonic()
    driver.start()
    try:
        _wait_for(lambda: _state(url, ALERT) == "firing", 40, f"{ALERT} did not fire", log)
        fired_after = time.monotonic() - t0
    finally:
        stop.set()
        driver.join(timeout=15)
    assert statuses == {200}, statuses
    firing = [a for a in _alerts(url) if a["labels"]["alertname"] == ALERT]
    assert firing[0]["labels"]["severity"] == "warning"
    assert "cannot assess" in firing[0]["annotations"]["summary"]
    assert float(firing[0]["value"]) > 0.15
    # no rule failed to evaluate against the real metrics (a typo'd metric would be "ok" but silent: see
    # test_dashboard_metrics.py for the names)
    groups = httpx.get(url + "/api/v1/rules", timeout=2).json()["data"]["groups"]
    unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] == "err"]
    assert not unhealthy, unhealthy

    t1 = time.monotonic()
    _wait_for(lambda: _state(url, ALERT) is None, 40, f"{ALERT} did not clear after the refusals stopped", log)
    print(f"{sent[0]} blank images; fired after {fired_after:.1f} s, cleared {time.monotonic() - t1:.1f} s after "
          "the stream stopped")
