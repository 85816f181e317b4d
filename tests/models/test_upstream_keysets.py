"""Every foundation encoder dermfusion claims, checked against the code that produced its weights.

The key sets in src/dermfusion/models/upstream_keys/*.json are the upstream state dicts (names and shapes), written by
tools/foundation_keysets.py from this project's own description of each upstream architecture (tools/upstream_arch.py,
with the upstream repository / path / commit of every fact). Here:

* the committed files are what the descriptions build (and record their sources);
* at full size (meta device: no memory), dermfusion's loaders take *every* upstream key of each — strictly;
* at reduced width (same names), a synthetic checkpoint with exactly the description's key set loads through
  dermfusion's public entry points and the forward pass equals the description's own forward — written without
  dermfusion's key mapping, timm or open_clip.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from upstream_fixtures import SMALL_B, SMALL_L, U, small_dermlip_config, small_open_clip_config

from dermfusion.models import dermlip
from dermfusion.models.backbones import create_backbone
from dermfusion.models.checkpoint import CheckpointMismatchError, load_state_dict_strict
from dermfusion.models.clip_family import MONET_ARCH, build_clip, create_clip
from dermfusion.models.foundations import FOUNDATIONS, KEYSET_DIR
from dermfusion.models.panderm import create_panderm_vit, panderm_checkpoint_filter_fn

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def upstream(name: str) -> dict:
    return json.loads((KEYSET_DIR / f"{name}.json").read_text(encoding="utf-8"))


def meta_tensors(keys: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(s, device="meta") for k, s in keys.items()}


# ------------------------------------------------------------------------------------------- the fixtures
def test_committed_key_sets_are_what_the_descriptions_build():
    import foundation_keysets

    assert foundation_keysets.main(["--check"]) == 0, "run: python tools/foundation_keysets.py"
    assert sorted(p.stem for p in KEYSET_DIR.glob("*.json")) == sorted(U.catalogue())
    assert {f.keyset for f in FOUNDATIONS.values()} == set(U.catalogue())


@pytest.mark.parametrize("name", sorted(U.catalogue()))
def test_every_key_set_records_where_its_facts_come_from(name):
    doc = upstream(name)
    assert doc["upstream"] and doc["keys"]
    for src in doc["upstream"]:
        assert src["repository"] and src["path"] and src["fact"]
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]), src
    assert (KEYSET_DIR / f"{name}.json").stat().st_size < 64 * 1024  # small fixtures only


def test_the_full_size_shapes_are_the_published_ones():
    pb, pl = upstream("panderm_base")["keys"], upstream("panderm_large")["keys"]
    clip_l = upstream("monet_vit_l14")["keys"]
    assert pb["pos_embed"] == [1, 197, 768] and pb["blocks.11.attn.qkv.weight"] == [2304, 768]
    assert "blocks.12.norm1.weight" not in pb
    assert pl["blocks.23.mlp.fc1.weight"] == [4096, 1024] and pl["blocks.0.gamma_1"] == [1024]
    assert clip_l["visual.conv1.weight"] == [1024, 3, 14, 14] and clip_l["visual.positional_embedding"] == [257, 1024]
    assert clip_l["text_projection"] == [768, 768] and clip_l["token_embedding.weight"] == [49408, 768]
    d = upstream("dermlip_panderm_base")["keys"]
    assert d["visual.head.weight"] == [512, 768] and d["visual.head.bias"] == [512]
    assert d["text.proj.0.weight"] == [640, 768] and d["text.proj.2.weight"] == [512, 640]
    assert d["text.transformer.embeddings.word_embeddings.weight"] == [30522, 768]
    assert not any("pooler" in k for k in d)  # open_clip builds the BERT without its pooler (mean_pooler)
    z = upstream("dermfm_zero")["keys"]
    assert z["visual.head.weight"] == [768, 1024] and z["text.proj.0.weight"] == [768, 768]
    assert upstream("dermlip_vit_b16")["keys"]["visual.proj"] == [768, 512]


# ------------------------------------------------------------------------ full size: every key is taken
@pytest.mark.parametrize("name,arch,prefix", [("panderm_base", "vit_base_patch16_224", "encoder."),
                                              ("panderm_base", "vit_base_patch16_224", ""),
                                              ("panderm_large", "vit_large_patch16_224", "encoder.")])
def test_panderm_encoders_take_every_upstream_key(name, arch, prefix):
    with torch.device("meta"):
        model = create_panderm_vit(arch)
    sd = meta_tensors(upstream(name)["keys"], prefix)  # the released ViT-L file: 'encoder.' before every key
    load_state_dict_strict(model, panderm_checkpoint_filter_fn(sd, model), source=name)  # raises on any mismatch
    del sd[prefix + "blocks.3.gamma_2"]
    with pytest.raises(CheckpointMismatchError, match="blocks.3.ls2.gamma"):
        load_state_dict_strict(model, panderm_checkpoint_filter_fn(sd, model), source="one key short")


@pytest.mark.parametrize("name,arch", [("panderm_cae_v2_pretraining_base", "vit_base_patch16_224"),
                                       ("panderm_cae_v2_pretraining_large", "vit_large_patch16_224")])
def test_raw_cae_v2_pretraining_checkpoints_drop_exactly_the_non_encoder_keys(name, arch):
    keys = upstream(name)["keys"]
    with torch.device("meta"):
        model = create_panderm_vit(arch)
    sd = meta_tensors(keys)
    dropped: list[str] = []
    mapped = panderm_checkpoint_filter_fn(sd, model, ignore_pretraining_keys=True, dropped=dropped)
    load_state_dict_strict(model, mapped, source=name)
    assert sorted(dropped) == sorted(k for k in keys if not k.startswith("encoder."))
    with pytest.raises(CheckpointMismatchError):  # not dropped unless asked
        load_state_dict_strict(model, panderm_checkpoint_filter_fn(sd, model), source=name)


@pytest.mark.parametrize("name,model", [("dermlip_panderm_base", "PanDerm-base-w-PubMed-256"),
                                        ("dermfm_zero", "DermFM-Zero")])
def test_dermlip_panderm_image_towers_take_every_upstream_visual_key(name, model):
    keys = upstream(name)["keys"]
    with torch.device("meta"):
        tower = dermlip.build_visual(dermlip.model_config(model))
    visual, rest = dermlip.split_checkpoint(meta_tensors(keys, "module."), name)  # DDP prefix too
    load_state_dict_strict(tower, dermlip.map_visual(visual, tower), source=name)
    assert sorted(rest) == sorted(k for k in keys if not k.startswith("visual."))  # the text tower, set aside
    assert all(k.startswith(("text.", "logit_scale")) for k in rest)


@pytest.mark.parametrize("name,arch", [("monet_vit_l14", MONET_ARCH), ("dermlip_vit_b16", "ViT-B-16-quickgelu")])
def test_openai_layout_clips_take_every_upstream_key(name, arch):
    with torch.device("meta"):
        model = build_clip(arch)
    load_state_dict_strict(model, meta_tensors(upstream(name)["keys"]), source=name)


# --------------------------------------------------------------- reduced width: the forward is the upstream one
SMALL = U.catalogue(small=True)


def _save(module, path, prefix: str = "", seed: int = 0) -> dict:
    sd = U.random_state_dict(module, seed)
    module.load_state_dict(sd)
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    return sd


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,arch,dims,prefix", [("panderm_base", "vit_base_patch16_224", SMALL_B, "encoder."),
                                                   ("panderm_large", "vit_large_patch16_224", SMALL_L, "")])
def test_panderm_forward_equals_the_upstream_encoder(tmp_path, name, arch, dims, prefix):
    ref = SMALL[name]["build"]().eval()
    _save(ref, tmp_path / "w.pth", prefix)
    bb = create_backbone({"name": f"panderm:{arch}", **dims}, pretrained_path=tmp_path / "w.pth").eval()
    with torch.no_grad():
        tokens, pooled = bb.forward_tokens(IMAGES)
        torch.testing.assert_close(tokens, ref.tokens(IMAGES), rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, ref(IMAGES), rtol=0, atol=1e-5)  # class token after the final norm


def test_panderm_mean_pooling_equals_upstream_fine_tuning_pooling(tmp_path):
    """``global_pool: avg`` is upstream's fine-tuning head input: fc_norm (the checkpoint's final norm) of the mean of
    the patch tokens, with no norm before it."""
    ref = SMALL["panderm_base"]["build"]().eval()
    _save(ref, tmp_path / "w.pth", "encoder.")
    bb = create_backbone({"name": "panderm:vit_base_patch16_224", "global_pool": "avg", **SMALL_B},
                         pretrained_path=tmp_path / "w.pth").eval()
    with torch.no_grad():
        x = ref.patch_embed.proj(IMAGES).flatten(2).transpose(1, 2)
        x = torch.cat([ref.cls_token.expand(2, -1, -1), x], 1) + ref.pos_embed
        for blk in ref.blocks:
            x = blk(x)
        torch.testing.assert_close(bb.forward_tokens(IMAGES)[1], ref.norm(x[:, 1:].mean(1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,arch,dims", [("panderm_cae_v2_pretraining_base", "vit_base_patch16_224", SMALL_B),
                                            ("panderm_cae_v2_pretraining_large", "vit_large_patch16_224", SMALL_L)])
def test_cae_v2_pretraining_checkpoint_forward_equals_its_encoder(tmp_path, name, arch, dims):
    ref = SMALL[name]["build"]().eval()
    sd = _save(ref, tmp_path / "w.pth")
    with pytest.raises(CheckpointMismatchError, match="ignore_pretraining_keys"):
        create_backbone({"name": f"panderm:{arch}", **dims}, pretrained_path=tmp_path / "w.pth")
    bb = create_backbone({"name": f"panderm:{arch}", **dims}, pretrained_path=tmp_path / "w.pth",
                         ignore_pretraining_keys=True).eval()
    assert bb.model.dropped_pretraining_keys == sorted(k for k in sd if not k.startswith("encoder."))
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_tokens(IMAGES)[1], ref(IMAGES), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,model,embed,dims", [("dermlip_panderm_base", "PanDerm-base-w-PubMed-256", 16, SMALL_B),
                                                   ("dermfm_zero", "DermFM-Zero", 20, SMALL_L)])
def test_dermlip_panderm_image_tower_equals_the_forks_tower(tmp_path, name, model, embed, dims):
    """The fork's tower: final norm over all tokens, mean of the patch tokens, the same norm again, head with bias."""
    ref = SMALL[name]["build"]().eval()
    (tmp_path / "dl").mkdir()
    _save(ref, tmp_path / "dl" / "open_clip_pytorch_model.bin")
    arch = small_dermlip_config(embed, dims, model)
    bb = create_backbone({"name": f"dermlip:{model}", "arch": arch}, pretrained_path=tmp_path / "dl").eval()
    with torch.no_grad():
        tokens, pooled = bb.forward_tokens(IMAGES)
        torch.testing.assert_close(pooled, ref.encode_image(IMAGES), rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens, ref.visual.tokens(IMAGES), rtol=0, atol=1e-5)
        # not the class token: the pooling matters
        assert not torch.allclose(pooled, ref.visual.head(ref.visual.tokens(IMAGES)[:, 0]), atol=1e-4)
    assert (bb.dim, bb.token_dim) == (embed, dims["embed_dim"])


def test_monet_forward_equals_openai_clip(tmp_path):
    ref = SMALL["monet_vit_l14"]["build"]().eval()
    _save(ref, tmp_path / "weight_clip.pt")
    clip = create_clip(f"monet:{tmp_path / 'weight_clip.pt'}", arch=small_open_clip_config(16, 32, 2))
    ids = clip.tokenizer(["This is skin image of hair", "This is skin image"])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(IMAGES), ref.encode_image(IMAGES), rtol=0, atol=1e-5)
        torch.testing.assert_close(clip.model.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)


def test_dermlip_vit_b16_forward_equals_openai_clip(tmp_path):
    """DermLIP ViT-B/16 was trained from OpenAI's CLIP (QuickGELU); open_clip builds what its config says."""
    ref = SMALL["dermlip_vit_b16"]["build"]().eval()
    d = tmp_path / "dermlip_vit_b16"
    d.mkdir()
    _save(ref, d / "open_clip_pytorch_model.bin")
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": small_open_clip_config(24, 48, 3),
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    clip = create_clip(f"open_clip:{d}")
    ids = clip.tokenizer(["This is a skin image of melanoma"])
    bb = create_backbone(f"open_clip:{d}").eval()
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(IMAGES), ref.encode_image(IMAGES), rtol=0, atol=1e-5)
        torch.testing.assert_close(clip.model.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(bb.forward_tokens(IMAGES)[1], ref.encode_image(IMAGES), rtol=0, atol=1e-5)
