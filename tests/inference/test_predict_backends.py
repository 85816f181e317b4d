"""`predict` and the service run on the fastest backend that passes the fp32 check; fp32 eager otherwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_helpers import squash
from service_fixtures import tiny_bundle  # noqa: F401


def _load(bundle, backend):
    from dermfusion.inference import load_predictor

    return load_predictor(bundle, backend=backend)


def test_auto_backend_is_checked_against_fp32(tiny_bundle, ham_sample):  # noqa: F811
    fp32 = _load(tiny_bundle, "fp32").predict_raw(ham_sample)
    auto = _load(tiny_bundle, "auto")
    probs = auto.predict_raw(ham_sample)
    from dermfusion.inference.network import default_candidates

    assert auto.backend in {"fp32", *default_candidates("cpu")}
    verdicts = {c["name"]: c for c in auto.selection}
    assert verdicts["fp32"]["ok"] and set(default_candidates("cpu")) <= set(verdicts)
    if auto.backend != "fp32":
        chosen = verdicts[auto.backend]
        assert chosen["ok"] and chosen["max_prob_diff"] <= 0.02 and chosen["argmax_agreement"] >= 0.99
        assert chosen["latency_ms"] < verdicts["fp32"]["latency_ms"]
    checked = slice(0, 32)  # the lesions the choice was checked on
    assert np.abs(probs[checked] - fp32[checked]).max() <= 0.02
    assert (probs[checked].argmax(1) == fp32[checked].argmax(1)).mean() >= 0.99


def test_a_backend_that_changes_answers_is_refused(tiny_bundle, ham_sample, monkeypatch):  # noqa: F811
    from dermfusion.inference import backends

    def scrambled(model, device="cpu", **_):
        def fn(batch):
            with torch.no_grad():
                logits = model(batch)["logits"].float()
            return {"logits": logits.flip(-1) * 5}  # fast, but a different diagnosis

        return backends.BackendRunner("scrambled", fn, torch.device(device), None)

    monkeypatch.setitem(backends.BACKENDS, "scrambled", scrambled)
    pred = _load(tiny_bundle, "auto")
    assert pred.choose_backend(ham_sample, candidates=["scrambled"]) == "fp32"
    assert pred.runner is pred.model  # fallback: plain eager
    (rej,) = [c for c in pred.selection if c["name"] == "scrambled"]
    assert not rej["ok"] and "accuracy check failed" in rej["reason"]


def test_predict_cli_backend_option(tiny_bundle, ham_sample, tmp_path):  # noqa: F811
    import pandas as pd
    from typer.testing import CliRunner

    from dermfusion.cli import app
    from dermfusion.data.manifest import save_manifest

    manifest = tmp_path / "m.parquet"
    save_manifest(ham_sample, manifest)
    runner = CliRunner()
    out = {}
    for backend in ("fp32", "auto", "int8"):
        res = runner.invoke(app, ["predict", str(tiny_bundle), "--manifest", str(manifest),
                                  "--out", str(tmp_path / f"{backend}.csv"), "--backend", backend])
        assert res.exit_code == 0, res.output
        out[backend] = pd.read_csv(tmp_path / f"{backend}.csv").drop(columns="image").to_numpy()  # ISIC 2018 header
        if backend == "auto":
            text = squash(res.output)
            assert "backend:" in text and "matches fp32 eager" in text
            assert "fp32 " in text and " ms" in text and "✓" in text  # each candidate's check
    for backend in ("auto", "int8"):
        assert np.abs(out[backend] - out["fp32"]).max() < 0.05
    bad = runner.invoke(app, ["predict", str(tiny_bundle), "--manifest", str(manifest),
                              "--out", str(tmp_path / "x.csv"), "--backend", "warp-drive"])
    assert bad.exit_code != 0 and "unknown backend" in squash(bad.output)


@pytest.mark.parametrize("backend", ["auto", "fp32"])
def test_service_reports_and_uses_its_backend(tiny_bundle, tmp_path, backend):  # noqa: F811
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/a.db"}, backend=backend)
    pred = _load(tiny_bundle, "trained")
    with TestClient(create_app(tiny_bundle, cfg, predictor=pred)) as c:
        info = c.get("/v1/model").json()
        img = (tiny_bundle.parent / "x.png")
        from PIL import Image

        Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)).save(img)
        files = {"dermoscopic": ("x.png", img.read_bytes(), "image/png")}
        fast = c.post("/v1/analyze?explain=false", files=files).json()
        explained = c.post("/v1/analyze", files=files).json()
    assert info["backends"] == [pred.backend]
    if backend == "fp32":
        assert pred.backend == "fp32" and pred.runner is pred.model
    # the same probabilities whether or not an explanation was asked for
    a = {d["code"]: d["probability"] for d in fast["differential"]}
    b = {d["code"]: d["probability"] for d in explained["differential"]}
    assert a == pytest.approx(b, abs=1e-6)
    assert explained["explanations"]["heatmaps"]
