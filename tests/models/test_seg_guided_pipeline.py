"""``seg_guided_dual`` end to end on the bundled HAM10000 sample: `dermfusion train` (the real training path, the
segmenter's BCE + Dice loss reaching it), the bundle predicting, the fast backends and the ONNX export matching fp32,
`/v1/analyze` with a Grad-CAM heat map from the whole-image encoder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from service_fixtures import fixture_image_bytes, fixture_images  # noqa: F401

from dermfusion.config import load_config, resolve_config_path
from dermfusion.tasks import ISIC2018

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"name": "timm:test_efficientnet", "input_size": 64}
MODEL = {"name": "seg_guided_dual", "encoder": TINY, "seg_encoder": dict(TINY), "seg_input_size": 48,
         "decoder_channels": [16, 16, 8, 8], "aspp_channels": 16, "fusion_dim": 32, "num_heads": 2, "meta_layers": 1,
         "mask_work_size": 48, "metadata_dropout": 0.2}


def _config(tmp_path, **model) -> str:
    raw = yaml.safe_load(resolve_config_path("tiny_cpu").read_text())
    raw.update(name="tiny_seg_guided", model={**MODEL, **model})
    raw["train"].update(epochs=1, device="cpu")
    path = tmp_path / "seg_guided.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, ham_manifest):
    from typer.testing import CliRunner

    from dermfusion.cli import app

    tmp = tmp_path_factory.mktemp("seg_guided")
    out = tmp / "run"
    res = CliRunner().invoke(app, ["train", _config(tmp), "--manifest", str(ham_manifest), "--out", str(out),
                                   "--folds", "0"])
    assert res.exit_code == 0, res.output
    assert (out / "fold_0" / "bundle" / "HASH").exists()
    return out / "fold_0" / "bundle"


@pytest.fixture(scope="module")
def predictor(bundle):
    from dermfusion.inference import load_predictor

    return load_predictor(bundle)


def test_the_segmentation_loss_trains_the_segmenter_through_the_real_training_path(ham_sample, tmp_path):
    from dermfusion.training.engine import FoldTrainer

    # detach_mask: the classification loss cannot reach the segmenter, so its gradient is the seg loss's alone
    cfg = load_config(_config(tmp_path, detach_mask=True), ["train.max_steps_per_epoch=1"])
    trainer = FoldTrainer(cfg, ISIC2018, ham_sample, 0, tmp_path / "fold")
    seen = {}
    loss = trainer._loss

    def logged_loss(outputs, target):
        total, parts = loss(outputs, target)
        seen["parts"] = {k: float(v) for k, v in parts.items()}
        return total, parts

    def record(tr, epoch, step):
        seen["decoder"] = float(tr.model.decoder.head.weight.grad.abs().sum())
        seen["segmenter"] = sum(float(p.grad.abs().sum()) for p in tr.model.encoders["segmenter"].parameters()
                                if p.grad is not None)

    trainer._loss, trainer.on_before_optimizer_step = logged_loss, record
    trainer.run()
    assert seen["decoder"] > 0 and seen["segmenter"] > 0
    assert seen["parts"]["seg_bce"] > 0 and seen["parts"]["seg_dice"] > 0      # TrainingLoss added and logged them


def test_bundle_predicts_and_its_model_segments(predictor, ham_sample):
    p = predictor.predict_proba(ham_sample.head(5))
    assert p.shape == (5, ISIC2018.num_classes) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert predictor.model.model_name == "seg_guided_dual"
    x = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        logits = predictor.model.segment(x, torch.ones(2, dtype=torch.bool))
    assert logits.shape == (2, 1, 48, 48)


def test_fast_backends_and_onnx_match_fp32(predictor, ham_sample):
    from dermfusion.data.dataset import LesionDataset, collate
    from dermfusion.inference.backends.selection import compare_probs, prepare_backend

    ds = LesionDataset(ham_sample.head(6), ISIC2018, predictor.spec, predictor.preprocess)
    batch = collate([ds[i] for i in range(len(ds))])
    ref = prepare_backend(predictor.model, "fp32", sample_batch=batch).predict_proba(batch)
    for name in ("bf16", "onnx"):  # bf16 casts the segmenter's encoder too; onnx exports the whole network
        probs = prepare_backend(predictor.model, name, sample_batch=batch).predict_proba(batch)
        assert compare_probs(ref, probs)["max_prob_diff"] < 0.02, name


def test_analyze_returns_a_grad_cam_of_the_whole_image_encoder(bundle, predictor, fixture_image_bytes, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/a.db"}, backend="fp32")
    with TestClient(create_app(bundle, cfg, predictor=predictor)) as c:
        r = c.post("/v1/analyze", files={"dermoscopic": ("lesion.jpg", fixture_image_bytes, "image/jpeg")},
                   data={"metadata": json.dumps({"age": 60, "sex": "male", "site": "back"})})
    assert r.status_code == 200, r.text
    body = r.json()
    probs = [d["probability"] for d in body["differential"]]
    assert len(probs) == ISIC2018.num_classes and abs(sum(probs) - 1) < 1e-6
    (hm,) = body["explanations"]["heatmaps"]
    assert hm["modality"] == "dermoscopic" and hm["method"] == "grad_cam" and hm["overlay_png_base64"]


def test_grad_cam_comes_from_the_whole_image_encoder(predictor, fixture_images):
    from PIL import Image

    from dermfusion.data.dataset import batch_from_inputs
    from dermfusion.explain import Explainer

    model = predictor.model
    ex = Explainer.for_model(model)
    assert ex.encoder_keys == {"dermoscopic": "dermoscopic"}
    batch = batch_from_inputs({"dermoscopic": Image.open(fixture_images[1]).convert("RGB")}, {}, predictor.spec,
                              predictor.preprocess)
    res = ex.run(batch)
    grid = res.maps["dermoscopic"][0]
    assert res.methods == {"dermoscopic": "grad_cam"}
    assert grid.shape == (2, 2) and np.isfinite(grid).all() and grid.max() <= 1.0  # the 64 px encoder's 2 × 2 map
    assert all(p.grad is None for p in model.parameters())
