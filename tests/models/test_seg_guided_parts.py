"""The segmentation-guided dual encoder's parts: attention gates, ASPP, BCE + Dice, the in-model Otsu targets, the
keyed cross-attention (whole image → query/value, lesion → key) and the model's own loss terms and masking.

The Otsu mask itself (synthetic dark disc with hair and noise on light skin, Dice > 0.9) is tested in
tests/data/test_lesion_mask.py; here only the model's wrapper around it (de-normalisation, working size)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.data.lesion_mask import dice
from dermfusion.models import create_model
from dermfusion.models.seg_guided import KeyedCrossAttention
from dermfusion.models.segmenter import AttentionGate, UNetDecoder, bce_dice_loss, fallback_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"name": "timm:test_efficientnet", "input_size": 64}
SMALL = dict(encoder=TINY, seg_encoder=TINY, decoder_channels=[16, 16, 8, 8], aspp_channels=16, fusion_dim=32,
             num_heads=2, meta_layers=1)


def _disc(h, w, r, cy=None, cx=None):
    y, x = np.ogrid[:h, :w]
    return (y - (h // 2 if cy is None else cy)) ** 2 + (x - (w // 2 if cx is None else cx)) ** 2 <= r * r


def test_attention_gate_passes_gradients_to_its_parameters_and_the_skip():
    torch.manual_seed(0)
    gate = AttentionGate(skip_channels=6, gate_channels=10, inter_channels=4)
    skip = torch.randn(2, 6, 16, 16, requires_grad=True)
    g = torch.randn(2, 10, 8, 8, requires_grad=True)   # coarser gating signal, upsampled inside
    out, alpha = gate(skip, g)
    assert out.shape == skip.shape and alpha.shape == (2, 1, 16, 16)
    assert float(alpha.detach().min()) > 0 and float(alpha.detach().max()) < 1
    params = [gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias]
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), [skip, g, *params])
    for t in grads:
        assert torch.isfinite(t).all() and float(t.abs().sum()) > 0


def test_aspp_keeps_the_spatial_size_and_the_decoder_returns_the_requested_size():
    torch.manual_seed(0)
    dec = UNetDecoder([8, 12, 16, 24, 32], decoder_channels=[16, 8], aspp_channels=8, aspp_rates=(1, 2, 3)).eval()
    deep = torch.randn(2, 32, 5, 7)
    assert dec.aspp(deep).shape == (2, 8, 5, 7)
    feats = [torch.randn(2, c, 40 // s, 56 // s) for c, s in zip([8, 12, 16, 24, 32], [1, 2, 4, 8, 8])]
    assert dec.num_levels == 3  # two decoder stages: the bottleneck plus the two deepest skips
    assert dec(feats, (40, 56)).shape == (2, 1, 40, 56)
    dec.train()
    assert dec([f[:1] for f in feats], (40, 56)).shape == (1, 1, 40, 56)  # batch of one: ASPP pooling still runs


def test_bce_dice_is_near_zero_for_a_perfect_mask_and_grows_with_error():
    target = torch.from_numpy(_disc(32, 32, 9)).float()[None, None].repeat(2, 1, 1, 1)
    perfect = (target * 2 - 1) * 30
    bce, d = bce_dice_loss(perfect, target)
    assert float(bce) < 1e-6 and float(d) < 1e-3
    shifted = torch.roll(perfect, shifts=6, dims=-1)  # half-right
    wrong = -perfect                                   # everything inverted
    losses = [sum(bce_dice_loss(x, target)) for x in (perfect, shifted, wrong)]
    assert losses[0] < losses[1] < losses[2] and float(losses[2]) > 10
    empty = torch.zeros_like(target)
    assert float(bce_dice_loss(torch.full_like(target, -30.0), empty)[1]) < 1e-6  # nothing to find, nothing found


def test_fallback_masks_denormalise_the_image_before_otsu():
    truth = _disc(80, 80, 22, cy=36, cx=44)
    skin, lesion = np.array([0.87, 0.70, 0.60]), np.array([0.45, 0.28, 0.18])
    rgb = np.where(truth[:, :, None], lesion, skin) + np.random.default_rng(0).normal(0, 0.03, (80, 80, 3))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (torch.from_numpy(rgb).float().permute(2, 0, 1)[None] - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    masks = fallback_masks(x.repeat(2, 1, 1, 1), mean, std, work_size=48, out_size=(80, 80))
    assert masks.shape == (2, 1, 80, 80) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert dice(masks[0, 0].numpy() > 0.5, truth) > 0.9
    # with the wrong statistics (the image read as if normalised differently) the mask changes
    assert not torch.equal(fallback_masks(x, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 48, (80, 80)), masks[:1])


@torch.no_grad()
def test_keyed_cross_attention_reads_values_from_the_query_stream_and_keys_from_the_lesion_stream():
    torch.manual_seed(0)
    xa = KeyedCrossAttention(8, num_heads=1).eval()
    xa.null.normal_()
    x, keys = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    present = torch.tensor([[True] * 5, [True, True, False, True, False], [False] * 5])
    out, w = xa(x, keys, present, need_weights=True)
    assert out.shape == (3, 5, 8) and w.shape == (3, 5, 6)
    # by hand: q from x, k from [null key; keys], v from [null value; x]; masked keys get no weight
    wq, wk, wv = xa.attn.in_proj_weight.chunk(3)
    bq, bk, bv = xa.attn.in_proj_bias.chunk(3)
    k_all = torch.cat([xa.null[:, :1].expand(3, -1, -1), keys], 1)
    v_all = torch.cat([xa.null[:, 1:].expand(3, -1, -1), x], 1)
    scores = (x @ wq.T + bq) @ (k_all @ wk.T + bk).transpose(1, 2) / math.sqrt(8)
    scores = scores.masked_fill(~torch.cat([torch.ones(3, 1, dtype=torch.bool), present], 1)[:, None], -math.inf)
    expected = xa.attn.out_proj(scores.softmax(-1) @ (v_all @ wv.T + bv))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert float(w[1][:, [3, 5]].abs().max()) == 0.0           # masked lesion tokens get no attention
    torch.testing.assert_close(w[2, :, 0], torch.ones(5))      # nothing present: everything on the null key
    assert torch.isfinite(out).all()
    # a masked row's keys and values cannot matter
    keys2, x2 = keys.clone(), x.clone()
    keys2[2], x2[2, :, :] = 100.0, x[2]
    torch.testing.assert_close(xa(x2, keys2, present)[0][2], out[2])
    with pytest.raises(ValueError, match="same token grid"):
        xa(x, keys[:, :4], present[:, :4])


def _batch(b=4, size=64, present=(True, True, False, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": {"dermoscopic": torch.randn(b, 3, size, size, generator=g)},
            "image_present": torch.tensor(present)[:, None],
            "numeric": torch.randn(b, 1, generator=g),
            "numeric_present": torch.tensor([[True], [False], [True], [True]]),
            "categorical": torch.tensor([[1, 0, 2], [0, 0, 0], [2, 1, 1], [1, 1, 0]]),
            "concepts": torch.zeros(b, 0), "concepts_present": torch.zeros(b, 0, dtype=torch.bool)}


def test_model_returns_its_segmentation_loss_while_training_and_masks_absent_images():
    spec = FeatureSpec(modalities=["dermoscopic"])
    torch.manual_seed(0)
    model = create_model("seg_guided_dual", num_classes=5, feature_spec=spec, seg_input_size=48, **SMALL)
    assert set(model.encoders) == {"dermoscopic", "lesion", "segmenter"}
    batch = _batch()
    model.train()
    out = model(batch)
    assert set(out["losses"]) == {"seg_bce", "seg_dice"} and out["mask_logits"].shape == (4, 1, 48, 48)
    assert all(torch.isfinite(v) and v.requires_grad for v in out["losses"].values())
    # given masks (a loader with expert masks) replace the Otsu targets
    ones = {"dermoscopic": torch.ones(4, 1, 64, 64)}
    torch.manual_seed(1)
    a = model({**batch, "masks": ones})["losses"]["seg_bce"]
    torch.manual_seed(1)
    b = model({**batch, "masks": {"dermoscopic": torch.zeros(4, 1, 64, 64)}})["losses"]["seg_bce"]
    assert not torch.isclose(a, b)
    model.eval()
    with torch.no_grad():
        ref = model(batch)
        assert "losses" not in ref
        changed = {**batch, "images": {"dermoscopic": batch["images"]["dermoscopic"].clone()}}
        changed["images"]["dermoscopic"][2] = 7.0        # the absent image's pixels cannot matter
        again = model(changed)
    torch.testing.assert_close(again["logits"], ref["logits"])
    assert torch.isfinite(ref["logits"]).all() and ref["logits"].shape == (4, 5)

