"""vit_triage's attention-diversity regulariser: what it measures is the class-token attention entropy of the last
block, training on it alone spreads that attention, its gradient reaches the qkv weights, λ = 0 adds nothing, and
the network is otherwise exactly single_image (fused attention left on)."""
from __future__ import annotations

import math

import pytest
import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.models import create_model, tiny_backbone_spec
from dermfusion.models.vit_triage import LOSS_NAME, cls_attention_entropy
from dermfusion.training.losses import build_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = FeatureSpec(modalities=["dermoscopic"])
PATCHES = 16  # 32 px images, 8 px patches


def _model(weight: float = 1.0, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_model("vit_triage", num_classes=3, feature_spec=SPEC, encoder=tiny_backbone_spec(32),
                        diversity_weight=weight, **kw)


def _batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": {"dermoscopic": torch.randn(n, 3, 32, 32, generator=g)},
            "image_present": torch.ones(n, 1, dtype=torch.bool)}


def _attention_probs(model, batch) -> torch.Tensor:
    """The last block's attention probabilities B×H×N×N, captured the explainer's way (unfused path, attn_drop hook)."""
    attn = model.last_attention()
    seen, fused = [], attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        handle.remove()
        attn.fused_attn = fused
    return seen[-1]


def _cls_entropy(model, batch) -> float:
    """Mean over lesions and heads of the entropy of the class token's attention over the patches (renormalised)."""
    p = _attention_probs(model, batch)[:, :, 0, 1:]
    p = p / p.sum(-1, keepdim=True)
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def test_penalty_is_normalised_entropy_of_the_cls_attention():
    model = _model(weight=0.5)
    with torch.no_grad():
        model.last_attention().qkv.weight.mul_(10)  # non-uniform attention, so the check is not 0 == 0
    batch = _batch()
    expected = 0.5 * (1 - _cls_entropy(model, batch) / math.log(PATCHES))
    model.train()
    out = model(batch)
    assert set(out["losses"]) == {LOSS_NAME}
    assert float(out["losses"][LOSS_NAME].detach()) == pytest.approx(expected, rel=1e-4)
    assert expected > 0.05
    # the real training loss adds it to the total and reports it by name
    loss_fn = build_loss({"name": "ce", "alpha": "inverse_frequency"}, class_counts=[10, 5, 1])
    total, parts = loss_fn(out, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert float(parts[LOSS_NAME]) == pytest.approx(expected, rel=1e-4)
    assert float(total.detach()) == pytest.approx(float(parts["main"]) + expected, rel=1e-5)


def test_training_on_the_regulariser_alone_spreads_the_attention():
    model = _model(weight=1.0)
    with torch.no_grad():  # start from peaked attention (random init is already near uniform)
        model.last_attention().qkv.weight.mul_(25)
    probe = _batch(16, seed=100)
    before = _cls_entropy(model, probe)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)  # peaked softmax: small gradients at first
    for step in range(30):
        model.train()
        loss = model(_batch(16, seed=step))["losses"][LOSS_NAME]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _cls_entropy(model, probe)
    assert before < 1.0, f"the start is not peaked enough to show anything ({before:.2f} nats)"
    assert after > before + 1.0, f"entropy {before:.2f} → {after:.2f} nats (max {math.log(PATCHES):.2f})"


def test_gradient_reaches_the_query_and_key_weights_only_through_attention():
    model = _model(weight=1.0)
    model.train()
    model(_batch())["losses"][LOSS_NAME].backward()
    qkv = model.last_attention().qkv
    d = qkv.weight.shape[1]
    g = qkv.weight.grad
    assert g is not None
    assert g[:d].abs().sum() > 0 and g[d:2 * d].abs().sum() > 0, "queries and keys get a gradient"
    assert g[2 * d:].abs().sum() == 0, "values do not enter the attention weights"
    patch_embed = model.encoder("dermoscopic").model.patch_embed.proj.weight.grad
    assert patch_embed is not None and patch_embed.abs().sum() > 0, "earlier layers shape the last block's input"
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.parameters())


def test_zero_weight_and_evaluation_add_no_loss_term_and_equal_single_image():
    model = _model(weight=0.0)
    model.train()
    assert "losses" not in model(_batch())
    weighted = _model(weight=1.0).eval()
    assert "losses" not in weighted(_batch())
    torch.manual_seed(0)
    plain = create_model("single_image", num_classes=3, feature_spec=SPEC, encoder=tiny_backbone_spec(32))
    assert plain.state_dict().keys() == weighted.state_dict().keys()  # the same weights, nothing added
    plain.load_state_dict(weighted.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.eval()(_batch())["logits"], weighted(_batch())["logits"])


def test_fused_attention_stays_on_and_copies_record_into_themselves():
    import copy

    model = _model(weight=1.0)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    model.train()
    model(_batch())
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused
    twin = copy.deepcopy(model)  # e.g. an EMA copy: its own hook table, its own store
    out = twin(_batch())
    assert out["losses"][LOSS_NAME].requires_grad
    assert not any("_dermfusion_qkv_store" in m.__dict__ for m in (*model.modules(), *twin.modules()))


def test_entropy_helper_matches_explicit_attention_under_autocast():
    model = _model(weight=1.0).eval()
    with torch.no_grad():
        model.last_attention().qkv.weight.mul_(10)
    batch = _batch()
    seen = []
    handle = model.last_attention().qkv.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)
    handle.remove()
    ent = cls_attention_entropy(model.last_attention(), seen[-1], 1)
    assert ent.dtype == torch.float32 and ent.shape == (8, 2)
    assert float(ent.mean()) == pytest.approx(_cls_entropy(model, batch), abs=0.05)  # bf16 qkv, fp32 softmax


def test_a_model_without_absent_images_or_with_none_present():
    model = _model(weight=1.0)
    model.train()
    batch = _batch()
    batch["image_present"][::2] = False  # only the present rows are encoded and regularised
    assert torch.isfinite(model(batch)["losses"][LOSS_NAME])
    batch["image_present"][:] = False
    assert "losses" not in model(batch)


def test_needs_a_vit_with_a_class_token():
    with pytest.raises(ValueError, match="needs a timm ViT"):
        create_model("vit_triage", num_classes=3, feature_spec=SPEC, encoder="timm:resnet10t", input_size=32)
    with pytest.raises(ValueError, match="needs a timm ViT"):
        create_model("vit_triage", num_classes=3, feature_spec=SPEC,
                     encoder={**tiny_backbone_spec(32), "class_token": False, "global_pool": "avg"})
    with pytest.raises(ValueError, match=">= 0"):
        _model(weight=-0.1)


def test_settings_are_single_image_s_plus_diversity_weight():
    from dermfusion.models.registry import model_settings
    from dermfusion.models.settings import ModelSettingsError

    assert model_settings("single_image") | {"diversity_weight"} == model_settings("vit_triage")
    with pytest.raises(ModelSettingsError, match="did you mean 'diversity_weight'"):
        create_model("vit_triage", num_classes=3, feature_spec=SPEC, encoder=tiny_backbone_spec(32),
                     diversity_wieght=0.1)
    model = _model(weight=0.2, dropout=0.3, use_metadata=False)  # single_image's settings reach single_image
    assert model.diversity_weight == 0.2 and model.head.net[3].p == 0.3
