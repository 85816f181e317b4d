"""The ISIC 2019 "ViT triage" recipe and its ResNet-18 baseline, each as its built-in config (with only the encoder
shrunk and the run shortened): `dermfusion train` on the bundled sample writes a bundle, `dermfusion predict` reads
it, the service answers /v1/analyze with a heat map — attention rollout for the ViT, Grad-CAM for the ResNet — and
the ViT's training loss really carries the attention-diversity term."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from dermfusion.cli import app
from dermfusion.config import load_config
from dermfusion.models.registry import check_model_settings
from dermfusion.tasks import ISIC2018, ISIC2019

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["task=isic2018", "train.device=cpu", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=16",
         "train.precision=fp32", "train.tta=0", "train.ema=0", "train.early_stopping_patience=0", "data.num_workers=0",
         "data.cache_dir=null", "model.encoder.pretrained=false"]
TINY_VIT = ('model.encoder={name: "timm:vit_tiny_patch16_224", img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, '
            'num_heads: 2, pretrained: false}')
RECIPES = {  # config, overrides that shrink it, the explanation method expected
    "vit": ("isic2019_vit_triage", [TINY_VIT], "attention_rollout"),
    "resnet18": ("isic2019_resnet18", ["model.encoder.input_size=64"], "grad_cam"),
}


@pytest.mark.parametrize("name", ["isic2019_vit_triage", "isic2019_resnet18"])
def test_recipe_configs_validate_as_written(name):
    cfg = load_config(name)
    assert cfg.task == "isic2019" and ISIC2019.num_classes == 8
    check_model_settings(cfg.model.name, cfg.model_kwargs())  # what `dermfusion train` checks before anything runs
    assert cfg.loss.name == "ce" and cfg.loss.alpha == "inverse_frequency", "weighted cross-entropy"
    assert cfg.train.sampler_power == 0, "the class weights correct the imbalance once, not twice"
    if cfg.model.name == "vit_triage":
        assert cfg.model_kwargs()["diversity_weight"] > 0


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_predicts_serves_and_explains(recipe, tmp_path, ham_sample, ham_manifest, fixture_dir,
                                                    monkeypatch):
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config
    from dermfusion.training import losses
    from dermfusion.training.cv import train_cv

    config, shrink, method = RECIPES[recipe]
    seen: list[set[str]] = []
    real_forward = losses.TrainingLoss.forward

    def forward(self, outputs, target):  # the loss terms of every training step
        loss, parts = real_forward(self, outputs, target)
        seen.append(set(parts))
        return loss, parts

    monkeypatch.setattr(losses.TrainingLoss, "forward", forward)
    run = tmp_path / "run"
    train_cv(load_config(config, [*QUICK, *shrink]), ham_sample, run, folds="0")
    bundle = run / "fold_0" / "bundle"
    assert (bundle / "HASH").exists()
    saved = yaml.safe_load((bundle / "config.yaml").read_text())
    assert saved["model"]["name"] == load_config(config).model.name
    assert seen, "no training step ran"
    if recipe == "vit":
        assert all("attention_diversity" in s for s in seen), "the regulariser is part of every step's loss"
    else:
        assert not any("attention_diversity" in s for s in seen)

    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(app, ["predict", str(bundle), "--manifest", str(ham_manifest), "--out", str(out),
                                   "--backend", "fp32"])
    assert res.exit_code == 0, res.output
    probs = pd.read_csv(out)[list(ISIC2018.classes)].to_numpy()
    assert probs.shape == (len(ham_sample), 7) and np.allclose(probs.sum(1), 1, atol=1e-4)

    svc = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/audit.db"}, backend="fp32")
    image = sorted((fixture_dir / "images").glob("*.jpg"))[0].read_bytes()
    with TestClient(create_app(bundle, svc)) as client:
        r = client.post("/v1/analyze", files={"dermoscopic": ("lesion.jpg", image, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(sum(d["probability"] for d in body["differential"]) - 1) < 1e-6
    (heatmap,) = body["explanations"]["heatmaps"]
    assert heatmap["modality"] == "dermoscopic" and heatmap["method"] == method
    assert heatmap["overlay_png_base64"]
