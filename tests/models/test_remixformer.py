"""remixformer's parts: lesion selection (picks the attention peaks, differentiably), crops, windows, texture
attention; and the network's contract (missing images masked, never encoded in training)."""
from __future__ import annotations

import pytest
import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.explain import Explainer
from dermfusion.models import create_model, tiny_backbone_spec
from dermfusion.models.layer_stats import LayerStats
from dermfusion.models.lesion_selection import crop_regions, select_regions
from dermfusion.models.remix_branches import inner_model
from dermfusion.models.texture_attention import MultiScaleTextureAttention, window_partition, window_reverse

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = FeatureSpec(modalities=["clinical", "dermoscopic"], concepts=["concept_clinical_hair"])


def _saliency() -> torch.Tensor:
    """8×8 map, background 0.01; peaks 0.5 at (row 2, col 5), 0.4 beside it at (2, 6), 0.3 at (6, 1), 0.2 at (5, 6)."""
    s = torch.full((1, 8, 8), 0.01)
    for (r, c), v in {(2, 5): 0.5, (2, 6): 0.4, (6, 1): 0.3, (5, 6): 0.2}.items():
        s[0, r, c] = v
    return s


def _cell_centre(r: int, c: int, side: int = 8) -> tuple[float, float]:
    return (c + 0.5) / side * 2 - 1, (r + 0.5) / side * 2 - 1


def test_lesion_selection_picks_the_highest_attention_regions():
    centres, scores, cells = select_regions(_saliency(), k=3, window=1)
    # (2, 6) is the second highest cell but lies in the first pick's neighbourhood: the regions are distinct
    assert cells[0].tolist() == [2 * 8 + 5, 6 * 8 + 1, 5 * 8 + 6]
    assert scores[0, 0] > scores[0, 1] > scores[0, 2]
    # an isolated peak on a flat background: the soft-argmax is the cell's own centre
    assert centres[0, 1].tolist() == pytest.approx(_cell_centre(6, 1), abs=1e-6)
    # the first region is pulled towards its strong neighbour (2, 6), by its attention-weighted share
    x0, y0 = _cell_centre(2, 5)
    pull = (0.4 - 0.01) / (0.5 + 0.4 + 7 * 0.01) * (2 / 8)  # one cell = 2/8 in [-1, 1] coordinates
    assert centres[0, 0].tolist() == pytest.approx([x0 + pull, y0], abs=1e-6)


def test_gradients_reach_the_attention_through_the_crops():
    torch.manual_seed(0)
    saliency = _saliency().requires_grad_(True)
    image = torch.randn(1, 3, 64, 64)
    centres, scores, _ = select_regions(saliency, k=2, window=1)
    crops = crop_regions(image, centres, fraction=0.25, out_size=16)
    loss = (crops * torch.randn_like(crops)).sum()
    (grad,) = torch.autograd.grad(loss, saliency, retain_graph=True)
    near = torch.zeros(8, 8, dtype=torch.bool)
    near[1:4, 4:7] = near[5:8, 0:3] = True  # the 3×3 neighbourhoods of the two picks
    assert grad[0][near].abs().sum() > 0
    assert torch.count_nonzero(grad[0][~near]) == 0  # only the picked neighbourhoods decide where the crops are
    (g_scores,) = torch.autograd.grad(scores.sum(), saliency)
    assert g_scores[0][near].eq(1).all() and g_scores[0][~near].eq(0).all()


def test_crops_cut_exactly_the_chosen_square():
    image = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16)
    centres = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # the middle; a corner (moved inwards to fit)
    crops = crop_regions(image, centres, fraction=0.5, out_size=8)
    assert torch.allclose(crops[0], image[0, :, 4:12, 4:12])
    assert torch.allclose(crops[1], image[0, :, 8:16, 8:16])


def test_window_partition_then_reverse_is_the_identity():
    x = torch.randn(2, 3, 64, 96)
    w = window_partition(x, 32)
    assert w.shape == (2 * 2 * 3, 3, 32, 32)
    assert torch.equal(w[1], x[0, :, :32, 32:64]) and torch.equal(w[6 + 3], x[1, :, 32:, :32])  # row-major per image
    assert torch.equal(window_reverse(w, 64, 96), x)
    with pytest.raises(ValueError, match="multiple"):
        window_partition(x, 40)


def test_texture_assignments_sum_to_one_over_templates():
    torch.manual_seed(0)
    tex = MultiScaleTextureAttention(dim=8, out_dim=6, num_textures=5, scales=(1, 2))
    x = torch.randn(3, 16, 8)
    a = tex.assignments(x)
    assert a.shape == (3, 16, 5) and (a >= 0).all()
    assert torch.allclose(a.sum(-1), torch.ones(3, 16), atol=1e-6)
    with torch.no_grad():  # a patch equal to template k, with sharp scales, belongs to template k
        tex.log_scale.fill_(6.0)
    a = tex.assignments(tex.templates.detach()[None] * 3)
    assert a[0].argmax(-1).tolist() == list(range(5))
    assert tex(x).shape == (3, 6)


def test_texture_encoding_aggregates_the_residuals():
    torch.manual_seed(1)
    tex = MultiScaleTextureAttention(dim=4, out_dim=4, num_textures=3)
    x = torch.randn(2, 9, 4)
    a = tex.assignments(x)
    expected = torch.stack([(a[:, :, k, None] * (x - tex.templates[k])).mean(1) for k in range(3)], 1)
    assert torch.allclose(tex.encode(x), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the network
def _model(**kw):
    torch.manual_seed(0)
    kw = {"fusion_dim": 32, "num_heads": 2, "num_regions": 2, "dermoscopic_size": 64, "num_textures": 4,
          "region_depth": 1, "fusion_depth": 1, "dropout": 0.0, **kw}
    return create_model("remixformer", num_classes=4, feature_spec=SPEC, **kw)


def _batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": {m: torch.randn(b, 3, 64, 64, generator=g) for m in ("clinical", "dermoscopic")},
            "image_present": torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1]], dtype=torch.bool)[:b],
            "concepts": torch.rand(b, 1, generator=g), "concepts_present": torch.ones(b, 1, dtype=torch.bool),
            "numeric": torch.rand(b, 1, generator=g), "numeric_present": torch.ones(b, 1, dtype=torch.bool),
            "categorical": torch.randint(0, 3, (b, 3), generator=g)}


def test_network_contract_and_masked_images():
    model = _model().eval()
    assert model.data_config["clinical"]["input_size"] == (3, 64, 64)  # the photo; the global view is 32²
    assert model.data_config["dermoscopic"]["input_size"] == (3, 64, 64) and model.encoder_windows == {
        "dermoscopic": (2, 2)}
    batch = _batch()
    with torch.no_grad():
        ref = model(batch, return_attention=True)
    assert ref["logits"].shape == (4, 4) and ref["features"].shape == (4, 32) and torch.isfinite(ref["logits"]).all()
    assert set(ref["aux"]) == {"clinical", "dermoscopic", "tabular"}
    assert ref["attention"]["windows"]["dermoscopic"].shape == (4, 4)
    assert ref["attention"]["regions"]["clinical"].shape == (4, 2, 2)
    changed = dict(batch, images={m: x.clone() for m, x in batch["images"].items()})
    for j, m in enumerate(("clinical", "dermoscopic")):
        absent = ~batch["image_present"][:, j]
        changed["images"][m][absent] = torch.randn_like(changed["images"][m][absent]) * 10 + 3
    with torch.no_grad():
        assert torch.equal(model(changed)["logits"], ref["logits"])  # an absent image's pixels never matter
        changed["images"]["clinical"][0] += 1.0
        assert not torch.equal(model(changed)["logits"][0], ref["logits"][0])


def test_training_never_encodes_absent_images():
    model = _model().train()
    seen = []
    for m in ("clinical", "dermoscopic"):
        inner_model(model.encoder(m)).patch_embed.register_forward_hook(lambda mod, i, o, m=m: seen.append((m, i[0])))
    batch = _batch()
    for j, m in enumerate(("clinical", "dermoscopic")):
        batch["images"][m][~batch["image_present"][:, j]] = float("nan")  # absent = NaN: it must not reach anything
    out = model(batch)
    loss = out["logits"].sum() + sum(v.sum() for v in out["aux"].values())
    loss.backward()
    assert all(torch.isfinite(x).all() for _, x in seen)
    # clinical: 3 present photos (global view) + 2 close-ups each; dermoscopic: 3 present images × 4 windows
    assert sorted((m, len(x)) for m, x in seen) == [("clinical", 3), ("clinical", 6), ("dermoscopic", 12)]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # every parameter learns (DDP-safe)


def test_crop_positions_are_learned_through_the_global_attention():
    """The close-ups' positions depend on the clinical encoder's last block only through its class-token
    attention, and its query/key weights get a gradient from them."""
    model = _model().train()
    enc = model.encoder("clinical")
    out = model.branches["clinical"](enc, _batch()["images"]["clinical"])
    qkv = inner_model(enc).blocks[-1].attn.qkv.weight
    (g,) = torch.autograd.grad(out["centres"].sum(), qkv)
    d = qkv.shape[1]
    assert g[:2 * d].abs().sum() > 0  # queries and keys
    assert torch.count_nonzero(g[2 * d:]) == 0  # values do not move the attention


def test_explanations_and_layer_statistics_are_per_image():
    model = _model().eval()
    batch = _batch()
    res = Explainer.for_model(model).run(batch)
    assert res.methods == {"clinical": "attention_rollout", "dermoscopic": "attention_rollout"}
    assert res.maps["clinical"][0].shape == (4, 4)  # the global view's 4×4 patches
    assert res.maps["dermoscopic"][0].shape == (8, 8)  # 2×2 windows of 4×4 patches, tiled
    assert res.maps["clinical"][1] is None and res.maps["dermoscopic"][2] is None  # absent images: no map
    with torch.no_grad():
        assert torch.allclose(res.logits, model(batch)["logits"], atol=1e-5)
    for m in ("dermoscopic", "clinical"):  # one row per image, not per window or close-up
        with LayerStats(model, m) as ls, torch.no_grad():
            model(batch)
        assert ls.take().shape[0] == 4


@pytest.mark.parametrize("modality", ["clinical", "dermoscopic"])
def test_runs_with_one_image_modality(modality):
    torch.manual_seed(0)
    model = create_model("remixformer", num_classes=3, feature_spec=FeatureSpec(modalities=[modality]), fusion_dim=32,
                         num_heads=2, num_regions=2, dermoscopic_size=64, num_textures=4, region_depth=1,
                         fusion_depth=1).eval()
    assert list(model.branches) == [modality] and set(model.data_config) == {modality}
    batch = {"images": {modality: torch.randn(2, 3, 64, 64)}, "image_present": torch.ones(2, 1, dtype=torch.bool),
             "numeric": torch.rand(2, 1), "numeric_present": torch.ones(2, 1, dtype=torch.bool),
             "categorical": torch.zeros(2, 3, dtype=torch.long)}
    with torch.no_grad():
        out = model(batch)
    assert out["logits"].shape == (2, 3) and torch.isfinite(out["logits"]).all()


def test_the_clinical_encoder_must_have_a_class_token():
    with pytest.raises(ValueError, match="class token"):
        _model(encoder={"clinical": {"name": "timm:resnet18"}, "dermoscopic": tiny_backbone_spec(32)})


def test_exports_to_onnx_with_parity(tmp_path):
    """The whole network — lesion selection, crops, windows — as one ONNX graph (the service's fast backends), with
    the dermoscopic layer statistics per image (the familiarity check's input)."""
    ort = pytest.importorskip("onnxruntime")
    from dermfusion.export.onnx import batch_to_onnx_inputs, export_onnx, input_specs
    from dermfusion.export.synthetic import synthetic_batch

    model = _model().eval()
    res = export_onnx(model, tmp_path / "remix.onnx", exporter="torchscript", layer_stats="dermoscopic",
                      batch_sizes=(1, 3))
    assert res.max_abs_prob_diff <= 1e-4, res.parity
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    stats = sess.run(["layer_stats"], batch_to_onnx_inputs(synthetic_batch(model, 3, seed=1),
                                                          specs=input_specs(model)))[0]
    assert stats.shape[0] == 3
