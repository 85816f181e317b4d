"""A fusion model trained with supplied concept scores predicts on lesions whose scores are computed: through
`dermfusion concepts` + `dermfusion predict`, and through /v1/analyze, which says which scores it computed."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from clip_fixtures import save_open_clip_dir, tiny_clip_model
from typer.testing import CliRunner

from dermfusion.concepts import load_concept_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = load_concept_set().names
COLS = [f"concept_dermoscopic_{c}" for c in NAMES]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_open_clip_dir(tiny_clip_model(), tmp_path_factory.mktemp("tiny_clip_e2e"))


@pytest.fixture(scope="module")
def concept_bundle(tmp_path_factory, ham_sample):
    """tiny_cpu trained (1 epoch, fold 0) on the sample with supplied MILK10k-style concept scores."""
    from service_fixtures import build_concept_bundle

    return build_concept_bundle(tmp_path_factory.mktemp("concept_run") / "run", ham_sample, COLS)


def run(*args, code=0):
    from dermfusion.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return " ".join(res.output.split())


def test_predict_on_computed_concepts(concept_bundle, clip_dir, ham_sample, tmp_path):
    from dermfusion.data.manifest import save_manifest

    bare = save_manifest(ham_sample.head(8), tmp_path / "new_patients.parquet")  # no concept columns at all
    filled = tmp_path / "filled.parquet"
    out = run("concepts", f"open_clip:{clip_dir}", "--manifest", bare, "--out", filled, "--no-cache")
    assert "0 supplied, 56 computed" in out
    run("predict", concept_bundle, "--manifest", filled, "--out", tmp_path / "pred.csv", "--backend", "fp32")
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == 8 and np.isfinite(pred.drop(columns=pred.columns[0]).to_numpy()).all()
    # the computed scores reach the model: other scores, other probabilities
    df = pd.read_parquet(filled)
    df[COLS] = 1.0 - df[COLS]
    save_manifest(df, tmp_path / "flipped.parquet")
    run("predict", concept_bundle, "--manifest", tmp_path / "flipped.parquet", "--out", tmp_path / "p2.csv",
        "--backend", "fp32")
    assert not np.allclose(pd.read_csv(tmp_path / "p2.csv").iloc[:, 1:], pred.iloc[:, 1:])


def test_analyze_computes_missing_concepts_and_says_so(concept_bundle, clip_dir, fixture_dir, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    image = sorted((fixture_dir / "images").glob("*.jpg"))[0].read_bytes()
    files = {"dermoscopic": ("a.jpg", image, "image/jpeg")}
    base = {"audit": {"db_url": f"sqlite:///{tmp_path}/audit.db"}, "quality": {"enabled": False}}
    on = load_service_config(None, env={}, **base, concepts={"model": f"open_clip:{clip_dir}",
                                                             "cache_dir": str(tmp_path / "cache")})
    with TestClient(create_app(concept_bundle, on, warmup=False)) as c:
        r = c.post("/v1/analyze?explain=false", files=files)
        assert r.status_code == 200, r.text[:500]
        inputs = r.json()["inputs"]
        assert sorted(inputs["concepts_computed"]) == sorted(COLS) and inputs["concepts_supplied"] == []
        meta = {"concepts": {"dermoscopic": {"hair": 0.3}}}
        r = c.post("/v1/analyze?explain=false", files=files, data={"metadata": json.dumps(meta)})
        inputs = r.json()["inputs"]
        assert inputs["concepts_supplied"] == ["concept_dermoscopic_hair"]
        assert "concept_dermoscopic_hair" not in inputs["concepts_computed"] and len(inputs["concepts_computed"]) == 6
        assert inputs["metadata_used"]["concepts"]["dermoscopic_hair"] == 0.3
    off = load_service_config(None, env={}, **base)  # no scorer configured: nothing computed
    with TestClient(create_app(concept_bundle, off, warmup=False)) as c:
        inputs = c.post("/v1/analyze?explain=false", files=files).json()["inputs"]
        assert inputs["concepts_computed"] == [] and inputs["concepts_supplied"] == []
