"""`dermfusion serve RUN_DIR` becomes ready and answers /v1/analyze for a network run (its fold bundles averaged)
and for a tabular run (its calibrated refit) — the real command in a subprocess, as a user starts it — and the
service's probabilities are those `dermfusion predict` writes for the same lesion (one ensemble rule)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from service_fixtures import free_port

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

FIXTURE_IMAGE = "ISIC_0024436.jpg"


def _service_yaml(tmp_path, **extra) -> str:
    cfg = {"audit": {"db_url": f"sqlite:///{tmp_path}/audit.db"}, "backend": "fp32", **extra}
    path = tmp_path / "service.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


class Served:
    """`python -m dermfusion.cli serve TARGET` on a free port until the test is done."""

    def __init__(self, target, tmp_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DERMFUSION_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "dermfusion.cli", "serve", str(target), "--port",
                                      str(self.port), "--config", _service_yaml(tmp_path), "--log-level", "warning"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 240.0) -> dict:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}):\n{self.proc.stdout.read()}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                last = r.json()
                if r.status_code == 200:
                    return last
                assert last.get("status") != "error", last  # the model failed to load: say why
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout} s: {last}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(target):
        s = Served(target, tmp_path)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _analyze_when_ready(s: "Served", fixture_dir) -> dict:
    """Wait for /readyz, then analyse the fixture lesion with metadata; the 200 answer's body."""
    s.wait_ready()
    image = (fixture_dir / "images" / FIXTURE_IMAGE).read_bytes()
    r = httpx.post(s.url + "/v1/analyze", files={"dermoscopic": ("lesion.jpg", image, "image/jpeg")},
                   data={"metadata": json.dumps({"age": 60, "sex": "male", "site": "back"})}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_serve_a_network_run_directory(serve, network_run, fixture_dir):
    s = serve(network_run)
    body = _analyze_when_ready(s, fixture_dir)
    assert abs(sum(d["probability"] for d in body["differential"]) - 1) < 1e-6 and body["calibrated"]
    assert body["model"]["hash"] == (network_run / "fold_0" / "bundle" / "HASH").read_text().strip()
    info = httpx.get(s.url + "/v1/model", timeout=30).json()
    assert info["backends"] == ["fp32", "fp32"], "both fold networks are served"
    card = httpx.get(s.url + "/v1/model-card", timeout=30).json()
    assert card["served"]["n_bundles"] == 2


@pytest.mark.slow
def test_serve_a_tabular_run_directory(serve, tabular_run, fixture_dir):
    s = serve(tabular_run)
    body = _analyze_when_ready(s, fixture_dir)
    assert body["model"]["kind"] == "tabular"
    assert body["model"]["hash"] == (tabular_run / "bundle" / "HASH").read_text().strip(), "the calibrated refit"
    assert body["inputs"]["metadata_used"]["age"] == 60
    assert any("uses no images" in w for w in body["warnings"])


def test_service_answers_what_predict_writes(tmp_path, network_run, ham_sample, fixture_dir):
    """The analyzer combines the fold networks' raw probabilities and applies the run's one calibration, exactly
    as `dermfusion predict RUN` does (inference.predictor)."""
    from fastapi.testclient import TestClient

    from dermfusion.inference import load_run
    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/audit.db"}, backend="fp32")
    row = ham_sample[ham_sample["image_dermoscopic"].str.endswith(FIXTURE_IMAGE)].reset_index(drop=True)
    assert len(row) == 1
    for col in ("age", "sex", "site", "skin_tone"):  # the request below sends no metadata
        row[col] = np.nan if col == "age" else ""
    expected = load_run(network_run, backend="fp32").predict_proba(row)[0]
    with TestClient(create_app(network_run, cfg)) as client:
        image = (fixture_dir / "images" / FIXTURE_IMAGE).read_bytes()
        r = client.post("/v1/analyze", files={"dermoscopic": ("lesion.jpg", image, "image/jpeg")},
                        params={"explain": "false"})
    assert r.status_code == 200, r.text
    got = {d["code"]: d["probability"] for d in r.json()["differential"]}
    np.testing.assert_allclose([got[c] for c in load_run(network_run).task.classes], expected, atol=1e-4)
