"""Optimiser groups: layer-wise LR decay formula, weight-decay exclusions, warmup + cosine."""
from __future__ import annotations

import math

import pytest
import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.models import create_model
from dermfusion.training.optim import build_optimizer, build_param_groups, build_scheduler

LR, HEAD_LR, LD, WD = 1e-3, 5e-3, 0.5, 0.05


@pytest.fixture(scope="module")
def model():
    spec = FeatureSpec(modalities=["clinical", "dermoscopic"], concepts=["concept_dermoscopic_hair"])
    return create_model("trimodal_fusion", num_classes=3, feature_spec=spec, fusion_dim=32, num_heads=2)


def _lookup(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_layerwise_lr_matches_formula(model):
    groups = build_param_groups(model, lr=LR, head_lr=HEAD_LR, layer_decay=LD, weight_decay=WD)
    by_name = _lookup(groups)
    n_blocks = model.encoder("dermoscopic").num_blocks
    assert n_blocks == 2
    enc = "encoders.dermoscopic.model."
    assert by_name[enc + "blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(LR * LD ** (n_blocks - 0))
    assert by_name[enc + "blocks.1.mlp.fc1.weight"]["lr"] == pytest.approx(LR * LD ** (n_blocks - 1))
    assert by_name[enc + "patch_embed.proj.weight"]["lr"] == pytest.approx(LR * LD ** (n_blocks + 1))
    assert by_name[enc + "pos_embed"]["lr"] == pytest.approx(LR * LD ** (n_blocks + 1))
    assert by_name["encoders.clinical.model.blocks.1.attn.proj.weight"]["lr"] == pytest.approx(LR * LD)
    for head_param in ("head.net.1.weight", "pool_attn.attn.in_proj_weight", "concepts.concept_embed",
                       "aux_heads.dermoscopic.1.weight"):
        assert by_name[head_param]["lr"] == pytest.approx(HEAD_LR), head_param


def test_weight_decay_exclusions_and_coverage(model):
    groups = build_param_groups(model, lr=LR, head_lr=HEAD_LR, layer_decay=LD, weight_decay=WD)
    by_name = _lookup(groups)
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}  # every param, once
    assert sum(len(g["params"]) for g in groups) == len(by_name)
    no_decay = ["encoders.dermoscopic.model.blocks.0.norm1.weight", "encoders.dermoscopic.model.blocks.0.attn.qkv.bias",
                "encoders.dermoscopic.model.pos_embed", "encoders.dermoscopic.model.cls_token",
                "metadata.categorical.0.weight", "pool_queries", "view_attn.null", "concepts.concept_embed"]
    for n in no_decay:
        assert by_name[n]["weight_decay"] == 0.0, n
    for n in ("encoders.dermoscopic.model.blocks.0.attn.qkv.weight", "head.net.1.weight"):
        assert by_name[n]["weight_decay"] == WD, n
    assert all({"lr", "weight_decay", "name"} <= set(g) for g in groups)


def test_frozen_blocks_are_left_out():
    spec = FeatureSpec(modalities=["dermoscopic"], concepts=[])
    m = create_model("single_image", num_classes=2, feature_spec=spec, freeze_blocks=1)
    names = set(_lookup(build_param_groups(m, lr=LR, layer_decay=LD)))
    assert "encoders.dermoscopic.model.blocks.0.attn.qkv.weight" not in names
    assert "encoders.dermoscopic.model.patch_embed.proj.weight" not in names
    assert "encoders.dermoscopic.model.blocks.1.attn.qkv.weight" in names


def test_optimizer_and_warmup_cosine_schedule(model):
    opt = build_optimizer(model, {"lr": LR, "head_lr": HEAD_LR, "layer_decay": LD, "weight_decay": WD})
    base = [g["lr"] for g in opt.param_groups]
    sched = build_scheduler(opt, warmup_steps=4, total_steps=14)
    factors = []
    for _ in range(14):
        factors.append(opt.param_groups[0]["lr"] / base[0])
        opt.step()
        sched.step()
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert factors[-1] < factors[5]
    ratios = [g["lr"] / b for g, b in zip(opt.param_groups, base)]  # every group follows the same curve
    assert max(ratios) == pytest.approx(min(ratios))
    assert isinstance(opt, torch.optim.AdamW)
