"""Models: strict checkpoint loading, offline hub errors, masking semantics, learning."""
from __future__ import annotations

import pytest
import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.models import (CheckpointMismatchError, HubUnavailableError, create_backbone, create_model,
                               list_models, tiny_backbone_spec)
from dermfusion.models.base import drop_present
from dermfusion.models.registry import ModelSettingsError
from perf_helpers import tiny_open_clip_dir

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
CONCEPTS = ["concept_clinical_hair", "concept_dermoscopic_hair", "concept_dermoscopic_vessels"]


def make_spec() -> FeatureSpec:
    return FeatureSpec(modalities=["clinical", "dermoscopic"], concepts=list(CONCEPTS))


def make_batch(b: int = 4, seed: int = 0, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0]], dtype=torch.bool).repeat(b // 4 + 1, 1)[:b]
    return {
        "images": {m: torch.randn(b, 3, size, size, generator=g) for m in ("clinical", "dermoscopic")},
        "image_present": present,
        "concepts": torch.rand(b, 3, generator=g),
        "concepts_present": torch.rand(b, 3, generator=g) > 0.3,
        "numeric": torch.rand(b, 1, generator=g),
        "numeric_present": torch.rand(b, 1, generator=g) > 0.3,
        "categorical": torch.randint(0, 3, (b, 3), generator=g),
    }


def tiny_model(name: str = "trimodal_fusion", **kw):
    if name == "early_fusion":
        kw = {"encoder": "timm:resnet18", "input_size": 32, **kw}
    elif name == "trimodal_fusion":
        kw = {"fusion_dim": 32, "num_heads": 2, **kw}
    elif name == "late_fusion":  # no attention: num_heads is not one of its settings (check_model_settings)
        kw = {"fusion_dim": 32, **kw}
    return create_model(name, num_classes=4, feature_spec=make_spec(), **kw)


# ------------------------------------------------------------------------------------ PanDerm / strict loads
def _beit_style(state_dict: dict) -> dict:
    """Rename a timm ViT state dict to PanDerm/CAE (BEiT) key names: the inverse of the filter."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            out["encoder." + k.replace("qkv.bias", "q_bias")] = q.clone()
            out["encoder." + k.replace("qkv.bias", "v_bias")] = vb.clone()
            continue
        out["encoder." + k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v.clone()
    return out


@pytest.fixture(scope="module")
def panderm_source():
    torch.manual_seed(0)
    src = create_backbone({"name": "panderm:vit_base_patch16_224", **TINY_VIT}).model
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make every tensor distinctive (gammas included)
    return src


def test_panderm_checkpoint_maps_and_loads_strictly(tmp_path, panderm_source):
    sd = _beit_style(panderm_source.state_dict())
    assert "encoder.blocks.0.attn.q_bias" in sd and "encoder.blocks.1.gamma_2" in sd
    path = tmp_path / "panderm.pth"
    torch.save({"model": sd}, path)
    bb = create_backbone({"name": "panderm:vit_base_patch16_224", **TINY_VIT}, pretrained_path=path)
    got, ref = bb.model.state_dict(), panderm_source.state_dict()
    for k in ("blocks.1.attn.qkv.weight", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "pos_embed", "norm.weight"):
        assert torch.equal(got[k], ref[k]), k
    d = got["blocks.0.attn.qkv.bias"].shape[0] // 3
    assert torch.equal(got["blocks.0.attn.qkv.bias"][:d], ref["blocks.0.attn.qkv.bias"][:d])       # q
    assert torch.count_nonzero(got["blocks.0.attn.qkv.bias"][d:2 * d]) == 0                          # k = 0
    assert torch.equal(got["blocks.0.attn.qkv.bias"][2 * d:], ref["blocks.0.attn.qkv.bias"][2 * d:])  # v


def test_panderm_renamed_key_is_refused_and_listed(tmp_path, panderm_source):
    sd = _beit_style(panderm_source.state_dict())
    sd["encoder.blocks.1.mlp.fc_one.weight"] = sd.pop("encoder.blocks.1.mlp.fc1.weight")
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as e:
        create_backbone({"name": "panderm:vit_base_patch16_224", **TINY_VIT}, pretrained_path=path)
    assert e.value.missing == ["blocks.1.mlp.fc1.weight"]
    assert e.value.unexpected == ["blocks.1.mlp.fc_one.weight"]
    assert "blocks.1.mlp.fc1.weight" in str(e.value) and "fc_one" in str(e.value)


def test_panderm_pretraining_keys_need_opt_in(tmp_path, panderm_source):
    sd = _beit_style(panderm_source.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 32)
    sd["teacher.blocks.0.attn.qkv.weight"] = torch.zeros(3)
    path = tmp_path / "pretrain.pth"
    torch.save(sd, path)
    spec = {"name": "panderm:vit_base_patch16_224", **TINY_VIT}
    with pytest.raises(CheckpointMismatchError, match="ignore_pretraining_keys"):
        create_backbone(spec, pretrained_path=path)
    create_backbone(spec, pretrained_path=path, ignore_pretraining_keys=True)


def test_relative_position_bias_is_rejected(tmp_path, panderm_source):
    sd = _beit_style(panderm_source.state_dict())
    sd["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 2)
    torch.save(sd, tmp_path / "rel.pth")
    with pytest.raises(ValueError, match="relative position"):
        create_backbone({"name": "panderm:vit_base_patch16_224", **TINY_VIT}, pretrained_path=tmp_path / "rel.pth")


def test_timm_checkpoint_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone(tiny_backbone_spec()).model
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    bb = create_backbone(tiny_backbone_spec(), pretrained_path=tmp_path)  # a directory works too
    assert torch.equal(bb.model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="extra.weight"):
        create_backbone(tiny_backbone_spec(), pretrained_path=tmp_path / "extra.safetensors")


# ------------------------------------------------------------------------------------ open_clip + hub errors
def test_open_clip_local_directory(tmp_path):
    src = tiny_open_clip_dir(tmp_path / "dermlip")
    bb = create_backbone(f"open_clip:{tmp_path / 'dermlip'}")
    assert bb.data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP, not ImageNet
    assert bb.data_config["input_size"] == (3, 32, 32)
    assert torch.equal(bb.model.conv1.weight, src.visual.conv1.weight)
    tokens, pooled = bb.forward_tokens(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 32) and pooled.shape == (2, 16)
    assert bb.block_index("model.transformer.resblocks.1.mlp.c_fc.weight") == 1
    assert bb.block_index("model.conv1.weight") == -1
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        create_backbone(f"open_clip:{tmp_path / 'noweights'}")


@pytest.mark.parametrize("spec", ["open_clip:hf-hub:redlessone/DermLIP_ViT-B-16", "timm:hf-hub:org/some-vit"])
def test_hub_id_offline_says_how_to_use_a_local_copy(monkeypatch, spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as e:
        create_backbone(spec)
    msg = str(e.value)
    assert "local" in msg and ("pretrained_path" in msg or "open_clip:/path" in msg)


def test_hub_download_failure_is_wrapped(monkeypatch):
    import open_clip

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    with pytest.raises(HubUnavailableError, match="local copy"):
        create_backbone("open_clip:hf-hub:redlessone/DermLIP_ViT-B-16")


# ------------------------------------------------------------------------------------ registry + masking
def test_registry_names_and_unknown_model():
    assert {"trimodal_fusion", "single_image", "late_fusion", "early_fusion"} <= set(list_models())
    with pytest.raises(ModelSettingsError, match="no_such_model"):
        create_model("no_such_model", num_classes=2, feature_spec=make_spec())
    with pytest.raises(ModelSettingsError, match="did you mean 'fusion_dim'"):
        create_model("trimodal_fusion", num_classes=2, feature_spec=make_spec(), fusoin_dim=64)


@pytest.mark.parametrize("name", ["trimodal_fusion", "late_fusion", "single_image", "early_fusion"])
def test_masked_image_pixels_do_not_change_outputs(name):
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    batch = make_batch()
    with torch.no_grad():
        ref = model(batch)
    changed = dict(batch, images={m: x.clone() for m, x in batch["images"].items()})
    for j, m in enumerate(("clinical", "dermoscopic")):
        absent = ~batch["image_present"][:, j]
        changed["images"][m][absent] = torch.randn_like(changed["images"][m][absent]) * 10 + 3
    with torch.no_grad():
        out = model(changed)
    assert torch.isfinite(ref["logits"]).all()
    assert torch.equal(out["logits"], ref["logits"])
    for k in ref["aux"]:
        assert torch.equal(out["aux"][k], ref["aux"][k])
    # and the present images do matter (row 0 has both views)
    changed["images"]["clinical"][0] += 1.0
    changed["images"]["dermoscopic"][0] += 1.0
    with torch.no_grad():
        assert not torch.equal(model(changed)["logits"][0], ref["logits"][0])


def test_sparse_rows_are_finite_and_shapes_follow_contract():
    model = tiny_model().eval()
    b = 3
    batch = {  # only a dermoscopic image; no concepts, no metadata at all
        "images": {m: torch.randn(b, 3, 32, 32) for m in ("clinical", "dermoscopic")},
        "image_present": torch.tensor([[0, 1]] * b, dtype=torch.bool),
        "concepts": torch.zeros(b, 3), "concepts_present": torch.zeros(b, 3, dtype=torch.bool),
        "numeric": torch.zeros(b, 1), "numeric_present": torch.zeros(b, 1, dtype=torch.bool),
        "categorical": torch.zeros(b, 3, dtype=torch.long),
    }
    with torch.no_grad():
        out = model(batch, return_attention=True)
        nothing = model(dict(batch, image_present=torch.zeros(b, 2, dtype=torch.bool)))
    assert out["logits"].shape == (b, 4) and out["features"].shape == (b, 32)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(nothing["logits"]).all()
    att = out["attention"]
    assert list(att["concept"]) == CONCEPTS and list(att["metadata"]) == ["age", "sex", "skin_tone", "site"]
    assert torch.count_nonzero(att["image"]["clinical"]) == 0          # absent view gets no attention
    assert all(torch.count_nonzero(v) == 0 for v in att["concept"].values())
    total = sum(v.sum(1) for v in att["image"].values()) + sum(att["concept"].values()) \
        + sum(att["metadata"].values()) + att["null"]
    assert torch.allclose(total, torch.ones(b), atol=1e-5)
    assert set(model.data_config) == {"clinical", "dermoscopic"}
    assert model.data_config["dermoscopic"]["input_size"] == (3, 32, 32)


def test_modality_dropout_never_removes_the_last_view():
    torch.manual_seed(0)
    present = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0]], dtype=torch.bool).repeat(64, 1)
    dropped = drop_present(present, 0.5)
    assert not (dropped & ~present).any()                       # never invents a view
    assert torch.equal(dropped.any(1), present.any(1))          # never empties a row that had one
    assert (dropped != present).any()                           # but does drop


@pytest.mark.parametrize("name", ["trimodal_fusion", "late_fusion"])
def test_metadata_dropout_trains_the_no_metadata_path(name):
    """p=1: in training every lesion is seen as if no metadata was supplied (outputs equal to a batch whose
    metadata really is missing, whatever the values); in evaluation nothing is dropped."""
    model = tiny_model(name, metadata_dropout=1.0, dropout=0.0, modality_dropout=0.0)
    model.train()
    batch = make_batch(8, seed=2)
    none = dict(batch, numeric_present=torch.zeros_like(batch["numeric_present"]),
                categorical=torch.zeros_like(batch["categorical"]))
    other = dict(batch, numeric=batch["numeric"] + 5, categorical=(batch["categorical"] + 1) % 3)
    with torch.no_grad():
        dropped = model(batch)["logits"]
        assert torch.allclose(dropped, model(none)["logits"], atol=1e-6)
        assert torch.allclose(dropped, model(other)["logits"], atol=1e-6)
        model.eval()
        assert not torch.allclose(model(batch)["logits"], model(other)["logits"], atol=1e-4)


def test_shared_encoder_is_stored_once():
    model = tiny_model(shared_encoder=True)
    assert list(model.encoders) == ["shared"]
    assert model.encoder("clinical") is model.encoder("dermoscopic")
    ptrs = [t.data_ptr() for t in model.state_dict().values()]
    assert len(ptrs) == len(set(ptrs))


def test_tiny_trimodal_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0)
    batch = make_batch(8, seed=1)
    target = torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(batch)["logits"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.2 * losses[0]:
            break
    assert losses[-1] < 0.2 * losses[0], losses
