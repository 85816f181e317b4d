"""remixformer through the real paths: `dermfusion train` (the shipped milk10k_remixformer config, shrunk with --set)
on the bundled sample given clinical + dermoscopic images, its bundle, `dermfusion predict`, and the triage API's
/v1/analyze with a heat map for each image."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermfusion.cli import app
from dermfusion.config import load_config
from dermfusion.models.registry import check_model_settings
from dermfusion.tasks import ISIC2018

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_VIT = '{name: "timm:vit_tiny_patch16_224", img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}'
SETS = ["task=isic2018", "data.modalities=[clinical, dermoscopic]", "data.num_workers=0", "data.cache_dir=null",
        f"model.encoder={{clinical: {TINY_VIT}, dermoscopic: {TINY_VIT}}}", "model.pretrained_path=null",
        "model.clinical_size=64", "model.dermoscopic_size=64", "model.local_blocks=1", "model.num_regions=2",
        "model.num_textures=4", "model.texture_scales=[1, 2]", "model.fusion_dim=32", "model.num_heads=2",
        "model.region_depth=1", "model.fusion_depth=1", "train.epochs=1", "train.batch_size=8", "train.device=cpu",
        "train.tta=0", "train.ema=0", "optim.accumulate=1"]


def run(*args) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"dermfusion {' '.join(map(str, args))} → {res.exit_code}\n{res.output}"
    return res.output


def test_the_shipped_config_names_only_real_settings():
    cfg = load_config("milk10k_remixformer")
    assert cfg.model.name == "remixformer" and cfg.task == "milk10k"
    check_model_settings(cfg.model.name, cfg.model_kwargs())  # raises on a misspelt setting


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, ham_sample) -> Path:
    """The bundled sample with a clinical photo per lesion (the dermoscopic image, mirrored), some lesions with
    only one of the two images."""
    from dermfusion.data.manifest import save_manifest

    work = tmp_path_factory.mktemp("remix_manifest")
    df = ham_sample.copy()
    clinical = []
    for i, path in enumerate(df["image_dermoscopic"]):
        out = work / f"clinical_{i}.png"
        Image.open(path).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(out)
        clinical.append(str(out))
    df["image_clinical"] = clinical
    df.loc[df.index % 6 == 1, "image_clinical"] = ""
    df.loc[df.index % 6 == 4, "image_dermoscopic"] = ""
    return save_manifest(df, work / "remix.parquet")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, manifest) -> Path:
    out = tmp_path_factory.mktemp("remix_run") / "run"
    run("train", "milk10k_remixformer", "--manifest", manifest, "--out", out, "--folds", "0",
        *[a for s in SETS for a in ("--set", s)])
    bundle = out / "fold_0" / "bundle"
    # the familiarity reference needs ≥ 40 lesions (a fold of the sample has 24): from all 40 dermoscopic images
    run("bundle", "reference", bundle, "--manifest", manifest, "--all-rows")
    return bundle


def test_trains_into_a_bundle_and_predicts(bundle, manifest, tmp_path):
    for f in ("model.safetensors", "config.yaml", "calibration.json", "HASH", "embedding_reference.npz"):
        assert (bundle / f).exists(), f
    out = tmp_path / "predictions.csv"
    run("predict", bundle, "--manifest", manifest, "--out", out, "--backend", "fp32")
    df = pd.read_csv(out)
    classes = list(ISIC2018.classes)
    assert list(df.columns) == ["image", *classes] and len(df) == 48
    np.testing.assert_allclose(df[classes].sum(axis=1), 1, atol=1e-4)
    assert df[classes].std().max() > 0  # the lesions get different answers


def test_serves_and_explains_both_images(bundle, manifest, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.data.manifest import load_manifest
    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    row = load_manifest(manifest).iloc[0]
    files = {m: (f"{m}.png", Path(row[f"image_{m}"]).read_bytes(), "image/png") for m in ("clinical", "dermoscopic")}
    # fp32 eager keeps the test short (the fast backends' export: test_remixformer.py::test_exports_to_onnx_...)
    cfg = load_service_config(None, env={}, backend="fp32", audit={"db_url": f"sqlite:///{tmp_path}/audit.db"})
    with TestClient(create_app(bundle, cfg)) as client:
        assert client.get("/readyz").json()["warnings"] == []
        r = client.post("/v1/analyze", files=files, data={"metadata": json.dumps({"age": 60, "sex": "f"})})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["inputs"]["modalities_used"] == ["clinical", "dermoscopic"]
        maps = {h["modality"]: h for h in body["explanations"]["heatmaps"]}
        assert set(maps) == {"clinical", "dermoscopic"}
        assert {h["method"] for h in maps.values()} == {"attention_rollout"}
        for h in maps.values():
            Image.open(io.BytesIO(base64.b64decode(h["overlay_png_base64"]))).verify()
        one = client.post("/v1/analyze", files={"clinical": files["clinical"]})
        assert one.status_code == 200, one.text
        assert one.json()["inputs"]["modalities_missing"] == ["dermoscopic"]
        assert [h["modality"] for h in one.json()["explanations"]["heatmaps"]] == ["clinical"]
