"""The Grafana dashboard (docs/grafana/dermfusion-dashboard.json) and the alert rules (docs/alerts/) ask only
for metrics the service exports: every ``dermfusion_*`` name in a PromQL expression is compared with what
``GET /metrics`` of a test app says after one analysis (a counter ``x`` is sampled as ``x_total``, a histogram
as ``x_bucket`` / ``x_sum`` / ``x_count``). A renamed metric would otherwise leave a panel empty and an alert
silent — no error anywhere. With promtool installed, every dashboard expression must also parse as PromQL."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service_fixtures import fixture_image_bytes, fixture_images, tiny_bundle, tiny_predictor  # noqa: F401

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana" / "dermfusion-dashboard.json"
RULES = DOCS / "alerts" / "dermfusion-rules.yml"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
NAME = re.compile(r"\bdermfusion_[a-z0-9_]*[a-z0-9]\b")
# the panels the issue asks for, by a word of their title
PANELS = ("latency", "status", "actions", "cannot assess", "confidence", "drift", "backend", "ready")


def dashboard_exprs(node) -> list[str]:
    """Every ``expr`` in the dashboard (panels, rows' panels, targets), depth first."""
    if isinstance(node, dict):
        own = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return own + [e for v in node.values() for e in dashboard_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in dashboard_exprs(v)]
    return []


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bundle, tiny_predictor, fixture_image_bytes) -> set[str]:
    """Sample names /metrics can carry, from a test app's scrape after one analysis (and one refused frame)."""
    from PIL import Image

    from service_fixtures import jpeg_bytes

    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path_factory.mktemp('dash')}/a.db"},
                              drift={"window": 50, "min_samples": 1})
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor)) as client:
        for image in (fixture_image_bytes, jpeg_bytes(Image.new("RGB", (64, 64), (150, 110, 95)))):
            r = client.post("/v1/analyze", files={"dermoscopic": ("x.jpg", image, "image/jpeg")},
                            data={"metadata": json.dumps({"age": 50, "sex": "female", "site": "back"})})
            assert r.status_code == 200, r.text
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {fam.name + s for s in SUFFIXES.get(fam.type, ("",))}
        names |= {s.name for s in fam.samples}
    assert {"dermfusion_analyses_total", "dermfusion_low_confidence_total", "dermfusion_actions_total",
            "dermfusion_request_latency_seconds_bucket"} <= names, sorted(names)
    return names


def test_dashboard_has_the_panels_and_a_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    titles = " · ".join(p["title"].lower() for p in dash["panels"])
    assert not [w for w in PANELS if w not in titles], titles
    assert [v["name"] for v in dash["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"] and p["description"], p["title"]


def test_dashboard_queries_only_exported_metrics(exported):
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 15
    unknown = sorted({n for e in exprs for n in NAME.findall(e)} - exported)
    assert not unknown, f"dashboard queries metrics the service does not export: {unknown}"


def test_alert_rules_use_only_exported_metrics(exported):
    used = {n for e in rule_exprs() for n in NAME.findall(e)}
    assert used and not sorted(used - exported), sorted(used - exported)


def test_dashboard_queries_parse_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus): PromQL syntax not checked")
    exprs = [e.replace("$__rate_interval", "5m") for e in dashboard_exprs(json.loads(DASHBOARD.read_text()))]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e}
                                                          for i, e in enumerate(exprs)]}]}
    f = tmp_path / "dashboard-exprs.yml"
    f.write_text(yaml.safe_dump(rules))
    res = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
