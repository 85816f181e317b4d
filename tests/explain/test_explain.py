"""Explanations: attention rollout for ViT encoders, Grad-CAM for CNN encoders, fusion attention over
concepts / metadata, overlays at the original aspect ratio, thread safety, and `dermfusion explain`."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from service_fixtures import fixture_images, tiny_bundle, tiny_predictor  # noqa: F401

from dermfusion.data.dataset import batch_from_inputs
from dermfusion.data.features import FeatureSpec
from dermfusion.explain import Explainer, center_crop_box, heatmap_to_image_size, overlay_heatmap
from dermfusion.models import create_model, tiny_backbone_spec
from dermfusion.models.factory import preprocess_of

SPEC = FeatureSpec(modalities=["clinical", "dermoscopic"],
                   concepts=["concept_clinical_hair", "concept_dermoscopic_pigmented"])


def _model(**kw):
    torch.manual_seed(0)
    return create_model("trimodal_fusion", num_classes=5, feature_spec=SPEC, fusion_dim=32, num_heads=2, **kw).eval()


def _batch(model, images, meta=None):
    return batch_from_inputs(images, meta or {}, SPEC, preprocess_of(model, SPEC))


@pytest.fixture(scope="module")
def photo(fixture_images):
    return Image.open(fixture_images[0]).convert("RGB").resize((120, 80))


def test_vit_attention_rollout(photo):
    model = _model(encoder=tiny_backbone_spec(32))
    ex = Explainer.for_model(model)
    assert Explainer.for_model(model) is ex  # hooks are installed once per model
    batch = _batch(model, {"dermoscopic": photo, "clinical": photo},
                   {"age": 60, "site": "trunk", "concept_dermoscopic_pigmented": 0.9})
    with torch.no_grad():
        ref = model(batch)["logits"]
    res = ex.run(batch)
    assert torch.allclose(res.logits, ref, atol=1e-5)  # explaining does not change the prediction
    assert res.methods == {"clinical": "fusion_weighted_attention_rollout",
                           "dermoscopic": "fusion_weighted_attention_rollout"}
    for m in ("clinical", "dermoscopic"):
        g = res.maps[m][0]
        assert g.shape == (4, 4) and g.min() >= 0 and g.max() == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())
    c = res.contributions[0]
    concepts = {d["name"]: d for d in c["concepts"]}
    assert concepts["concept_dermoscopic_pigmented"]["present"] and not concepts["concept_clinical_hair"]["present"]
    assert concepts["concept_clinical_hair"]["weight"] == 0.0
    meta = {d["name"]: d for d in c["metadata"]}
    assert meta["age"]["present"] and meta["site"]["present"] and not meta["sex"]["present"]
    total = sum(c["image"].values()) + sum(d["weight"] for d in c["concepts"] + c["metadata"]) + c["null"]
    assert total == pytest.approx(1.0, abs=1e-4)
    assert {d["name"] for d in c["semantic"]} == set(concepts) | set(meta)


def test_absent_modality_has_no_map(photo):
    model = _model(encoder=tiny_backbone_spec(32))
    res = Explainer.for_model(model).run(_batch(model, {"dermoscopic": photo}))
    assert res.maps["clinical"] == [None] and res.maps["dermoscopic"][0] is not None
    assert res.contributions[0]["image"]["clinical"] == 0.0


def test_cnn_grad_cam(photo):
    model = _model(encoder={"name": "timm:resnet10t"}, input_size=64)
    res = Explainer.for_model(model).run(_batch(model, {"dermoscopic": photo, "clinical": photo}))
    assert res.methods == {"clinical": "grad_cam", "dermoscopic": "grad_cam"}
    g = res.maps["dermoscopic"][0]
    assert g.shape == (2, 2) and np.isfinite(g).all() and g.max() <= 1.0
    assert all(p.grad is None for p in model.parameters())  # autograd.grad, not .backward()


def test_single_image_cls_rollout(photo):
    model = create_model("single_image", num_classes=3, feature_spec=FeatureSpec(modalities=["dermoscopic"])).eval()
    spec = FeatureSpec(modalities=["dermoscopic"])
    batch = batch_from_inputs({"dermoscopic": photo}, {}, spec, preprocess_of(model, spec))
    res = Explainer.for_model(model).run(batch)
    assert res.methods["dermoscopic"] == "attention_rollout" and res.maps["dermoscopic"][0].shape == (4, 4)
    assert res.contributions == []


def test_explainer_is_thread_safe(photo, fixture_images):
    model = _model(encoder=tiny_backbone_spec(32))
    ex = Explainer.for_model(model)
    imgs = [Image.open(p).convert("RGB") for p in fixture_images[:4]]
    batches = [_batch(model, {"dermoscopic": im, "clinical": imgs[-1 - i]}) for i, im in enumerate(imgs)]
    expected = [ex.run(b).maps["dermoscopic"][0] for b in batches]
    got = [None] * len(batches)

    def work(i):
        for _ in range(2):
            got[i] = ex.run(batches[i]).maps["dermoscopic"][0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        np.testing.assert_allclose(e, g, atol=1e-5)


def test_overlay_geometry():
    grid = np.zeros((4, 4), np.float32)
    grid[0, 0] = 1.0  # hot top-left patch
    img = Image.new("RGB", (300, 200), (200, 150, 120))
    heat, box = heatmap_to_image_size(grid, img.size)
    assert heat.shape == (200, 300) and box == center_crop_box((300, 200)) == (50, 0, 250, 200)
    assert heat[:, :50].max() == 0 and heat[:, 250:].max() == 0  # outside the model's crop: no heat
    assert heat[10, 60] > 0.5 > heat[190, 240]
    ov, h2 = overlay_heatmap(img, grid, max_side=150)
    assert ov.size == (150, 100) and h2.shape == (100, 150)
    arr = np.asarray(ov).astype(int)
    assert arr[50, 5].sum() < np.asarray(img)[0, 0].sum()  # the cropped-away border is dimmed


def test_explain_cli(tmp_path, tiny_bundle, ham_sample):
    from typer.testing import CliRunner

    from dermfusion.cli import app
    from dermfusion.data.manifest import save_manifest

    manifest = tmp_path / "m.csv"
    save_manifest(ham_sample, manifest)
    ids = ham_sample["lesion_id"].iloc[:2].tolist()
    out = tmp_path / "explain"
    res = CliRunner().invoke(app, ["explain", str(tiny_bundle), "--manifest", str(manifest), "--ids", ",".join(ids),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    for lid in ids:
        rep = json.loads((out / f"{lid}.json").read_text())
        assert rep["lesion_id"] == lid and len(rep["differential"]) == 7
        (hm,) = rep["explanations"]["heatmaps"]
        png = Image.open(out / hm["overlay_file"])
        assert png.size == (hm["original_width"], hm["original_height"])
        assert rep["inputs"]["metadata_used"].get("age") == float(
            ham_sample.set_index("lesion_id").loc[lid, "age"])
        assert rep["explanations"]["fusion"]["metadata"]
    res = CliRunner().invoke(app, ["explain", str(tiny_bundle), "--manifest", str(manifest), "--ids", "nope",
                                   "--out", str(out)])
    assert res.exit_code != 0 and "nope" in res.output
