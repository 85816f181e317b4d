"""DermLIP's PanDerm-base variant (Derm1M) through its open_clip model config: a checkpoint in the published key
layout (``visual.trunk.*`` PanDerm ViT-B/16 with CAE-style q_bias / v_bias / gamma_1 / gamma_2, ``visual.head.proj``,
``text.*`` PubMedBERT, ``logit_scale``) loads strictly, and the image tower computes what a ViT written here from its
description computes — reading the checkpoint's own tensors by their published names, not through the project's
key mapping. A small width / depth with the same key names stands in for ViT-B/16 (the full-size key layout is
checked without a forward pass)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dermfusion.models import dermlip
from dermfusion.models.backbones import create_backbone
from dermfusion.models.checkpoint import CheckpointMismatchError, load_state_dict_strict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, DEPTH, HEADS, PATCH, IMG, EMBED = 32, 2, 2, 8, 32, 16         # PanDerm-base: 768, 12, 12, 16, 224; embed 512
TD, TDEPTH, THEADS, TFF, CTX = 24, 2, 2, 48, 16                   # PubMedBERT: 768, 12, 12, 3072; context 256
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "this", "is", "skin", "image", "of", "hair", "a", "photo",
         "dermatology", "lesion", "with", "erythema", "red"]
TRUNK = dermlip.register_panderm_trunk("test_tiny_dermlip_panderm", img_size=IMG, patch_size=PATCH, embed_dim=D,
                                       depth=DEPTH, num_heads=HEADS)
TINY = {"embed_dim": EMBED,
        "vision_cfg": {"timm_model_name": TRUNK, "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "image_size": IMG},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": CTX}}
SPEC = "dermlip:PanDerm-base-w-PubMed-256"


def trunk_keys(d: int, depth: int, patch: int, grid: int) -> dict[str, tuple]:
    """PanDerm's encoder (CAE / BEiT code), key by key with shapes."""
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, grid * grid + 1, d), "patch_embed.proj.weight": (d, 3, patch, patch),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.q_bias": (d,), b + "attn.v_bias": (d,), b + "attn.proj.weight": (d, d),
                     b + "attn.proj.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                     b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d),
                     b + "mlp.fc2.bias": (d,), b + "gamma_1": (d,), b + "gamma_2": (d,)})
    return keys


def text_keys() -> dict[str, tuple]:
    """A HuggingFace BERT (no pooler) under ``text.transformer.``, the MLP projection, as open_clip saves them."""
    t = "text.transformer."
    keys = {t + "embeddings.word_embeddings.weight": (len(VOCAB), TD), t + "embeddings.position_embeddings.weight": (CTX, TD),
            t + "embeddings.token_type_embeddings.weight": (2, TD), t + "embeddings.LayerNorm.weight": (TD,),
            t + "embeddings.LayerNorm.bias": (TD,)}
    for i in range(TDEPTH):
        L = f"{t}encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            keys.update({L + n + ".weight": (TD, TD), L + n + ".bias": (TD,)})
        keys.update({L + "attention.output.LayerNorm.weight": (TD,), L + "attention.output.LayerNorm.bias": (TD,),
                     L + "intermediate.dense.weight": (TFF, TD), L + "intermediate.dense.bias": (TFF,),
                     L + "output.dense.weight": (TD, TFF), L + "output.dense.bias": (TD,),
                     L + "output.LayerNorm.weight": (TD,), L + "output.LayerNorm.bias": (TD,)})
    hidden = (TD + EMBED) // 2
    keys.update({"text.proj.0.weight": (hidden, TD), "text.proj.2.weight": (EMBED, hidden), "logit_scale": ()})
    return keys


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in {**{f"visual.trunk.{k}": s for k, s in trunk_keys(D, DEPTH, PATCH, IMG // PATCH).items()},
                     "visual.head.proj.weight": (EMBED, D), **text_keys()}.items():
        t = torch.randn(shape, generator=g) * 0.05
        sd[k] = t + 1 if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "LayerNorm.weight")) else t
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    # written with transformers < 4.31, which kept BERT's position_ids buffer in the state dict
    sd["text.transformer.embeddings.position_ids"] = torch.arange(CTX)[None]
    return sd


def reference_image_tower(sd, images):
    """ViT with layer scale (BEiT/CAE): x + γ1·Attn(LN(x)) with no k bias, x + γ2·MLP(LN(x)) (exact GELU), final LN
    (eps 1e-6), CLS token, projection without bias. Returns (tokens after the final LN, image embedding)."""
    v = lambda k: sd["visual.trunk." + k]  # noqa: E731
    x = F.conv2d(images, v("patch_embed.proj.weight"), v("patch_embed.proj.bias"), stride=PATCH)
    x = torch.cat([v("cls_token").expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)], 1) + v("pos_embed")
    B, N, _ = x.shape
    for i in range(DEPTH):
        b = lambda k: v(f"blocks.{i}.{k}")  # noqa: E731
        h = F.layer_norm(x, (D,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv = h @ b("attn.qkv.weight").T + torch.cat([b("attn.q_bias"), torch.zeros(D), b("attn.v_bias")])
        q, k, val = (t.reshape(B, N, HEADS, D // HEADS).transpose(1, 2) for t in qkv.split(D, dim=-1))
        att = (q @ k.transpose(-2, -1) / math.sqrt(D // HEADS)).softmax(-1)
        a = (att @ val).transpose(1, 2).reshape(B, N, D) @ b("attn.proj.weight").T + b("attn.proj.bias")
        x = x + b("gamma_1") * a
        h = F.layer_norm(x, (D,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        x = x + b("gamma_2") * h
    x = F.layer_norm(x, (D,), v("norm.weight"), v("norm.bias"), eps=1e-6)
    return x, x[:, 0] @ sd["visual.head.proj.weight"].T


def reference_text_tower(sd, ids):
    """BERT (post-LN, exact GELU, eps 1e-12, padding masked), CLS of the last hidden state, MLP projection."""
    t = lambda k: sd["text.transformer." + k]  # noqa: E731
    ln = lambda x, n: F.layer_norm(x, (TD,), t(n + ".weight"), t(n + ".bias"), eps=1e-12)  # noqa: E731
    lin = lambda x, n: x @ t(n + ".weight").T + t(n + ".bias")  # noqa: E731
    B, L = ids.shape
    x = ln(t("embeddings.word_embeddings.weight")[ids] + t("embeddings.position_embeddings.weight")[:L]
           + t("embeddings.token_type_embeddings.weight")[0], "embeddings.LayerNorm")
    mask = torch.zeros(B, 1, 1, L).masked_fill((ids == 0)[:, None, None, :], float("-inf"))
    for i in range(TDEPTH):
        p = f"encoder.layer.{i}."
        q, k, val = (lin(x, p + f"attention.self.{n}").reshape(B, L, THEADS, -1).transpose(1, 2)
                     for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1) / math.sqrt(TD // THEADS) + mask).softmax(-1)
        a = (att @ val).transpose(1, 2).reshape(B, L, TD)
        x = ln(x + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        x = ln(x + lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
    return F.gelu(x[:, 0] @ sd["text.proj.0.weight"].T) @ sd["text.proj.2.weight"].T


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dermlip_panderm")
    torch.save(published_state_dict(), root / "open_clip_pytorch_model.bin")
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic", "size": IMG}}))
    return root


def test_the_shipped_config_is_registered_with_open_clip():
    import open_clip

    dermlip.register()
    cfg = open_clip.get_model_config("PanDerm-base-w-PubMed-256")
    assert cfg == dermlip.model_config("panderm-base")
    assert cfg["embed_dim"] == 512 and cfg["text_cfg"]["context_length"] == 256
    assert (cfg["vision_cfg"]["timm_pool"], cfg["vision_cfg"]["timm_proj"]) == ("", "linear")
    assert (cfg["text_cfg"]["hf_proj_type"], cfg["text_cfg"]["hf_pooler_type"]) == ("mlp", "cls_last_hidden_state_pooler")


def test_full_size_image_tower_takes_the_published_panderm_base_keys_exactly():
    tower = dermlip.build_visual(dermlip.model_config())
    assert tower.trunk.num_features == 768 and len(tower.trunk.blocks) == 12 and tower.image_size == (224, 224)
    published = {f"trunk.{k}": torch.zeros(s) for k, s in trunk_keys(768, 12, 16, 14).items()}
    published["head.proj.weight"] = torch.zeros(512, 768)
    load_state_dict_strict(tower, dermlip.map_visual(published, tower), source="PanDerm-base layout")  # raises if not
    del published["trunk.blocks.11.gamma_2"]
    with pytest.raises(CheckpointMismatchError, match="blocks.11.ls2.gamma"):
        load_state_dict_strict(tower, dermlip.map_visual(published, tower), source="one key short")


@pytest.mark.parametrize("trunk_naming", ["cae", "timm"])
def test_checkpoint_loads_strictly_and_the_image_tower_matches_a_reference_vit(weights_dir, tmp_path, trunk_naming):
    sd = published_state_dict()
    path = weights_dir
    if trunk_naming == "timm":  # the same tensors under timm's names (a fork that built the trunk with timm)
        timm_sd = {}
        for k, v in sd.items():
            if k.endswith("attn.q_bias"):
                timm_sd[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros(D), sd[k.replace("q_", "v_")]])
            elif not k.endswith("attn.v_bias"):
                timm_sd[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = v
        torch.save({"epoch": 30, "state_dict": {f"module.{k}": v for k, v in timm_sd.items()}}, tmp_path / "ep30.pt")
        path = tmp_path / "ep30.pt"  # an open_clip training checkpoint: wrapped, DDP prefix
    bb = create_backbone({"name": SPEC, "arch": TINY}, pretrained_path=path)
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    ref_tokens, ref_pooled = reference_image_tower(sd, images)
    with torch.no_grad():
        tokens, pooled = bb.forward_tokens(images)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-5)
    assert (bb.dim, bb.token_dim) == (EMBED, D)
    assert bb.block_index("model.trunk.blocks.1.attn.qkv.weight") == 1 and bb.block_index("model.trunk.pos_embed") == -1
    if trunk_naming == "cae":  # the published preprocessing beside the weights is the one used
        assert bb.data_config["mean"] == (0.485, 0.456, 0.406) and bb.data_config["interpolation"] == "bicubic"
    else:  # no open_clip_config.json beside the file: open_clip's default (OpenAI CLIP statistics)
        assert bb.data_config["mean"] == dermlip.OPENAI_MEAN
    assert bb.data_config["input_size"] == (3, IMG, IMG)


def test_a_foreign_or_incomplete_checkpoint_is_refused(tmp_path):
    sd = published_state_dict()
    del sd["visual.trunk.blocks.1.gamma_1"]
    torch.save(sd, tmp_path / "short.bin")
    with pytest.raises(CheckpointMismatchError, match="blocks.1.ls1.gamma"):
        create_backbone({"name": SPEC, "arch": TINY}, pretrained_path=tmp_path / "short.bin")
    sd = published_state_dict()
    sd["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3)  # a stock CLIP text tower: not this model
    torch.save(sd, tmp_path / "foreign.bin")
    with pytest.raises(CheckpointMismatchError, match="open_clip:<dir>") as e:
        create_backbone({"name": SPEC, "arch": TINY}, pretrained_path=tmp_path / "foreign.bin")
    assert e.value.unexpected == ["transformer.resblocks.0.attn.in_proj_weight"]


def test_missing_weights_and_unknown_names_fail_at_once(tmp_path):
    with pytest.raises(dermlip.DermLipWeightsError, match="huggingface-cli download redlessone/DermLIP_PanDerm-base"):
        create_backbone(SPEC, pretrained_path=tmp_path / "not_downloaded")
    with pytest.raises(ValueError, match="open_clip:<dir>"):
        create_backbone("dermlip:ViT-B-16")
    from dermfusion.models.settings import ModelSettingsError

    with pytest.raises(ModelSettingsError, match="drop_path_rate"):
        create_backbone({"name": SPEC, "arch": TINY, "drop_path": 0.1})


def test_both_towers_load_for_the_concept_scorer(weights_dir):
    """Needs ``transformers`` (the text tower is a HuggingFace BERT): a tiny BERT config + vocabulary stand in for
    PubMedBERT's files, in the folder the loader looks for beside the weights."""
    pytest.importorskip("transformers")
    from dermfusion.concepts import ConceptScorer
    from dermfusion.models.clip_family import create_clip

    text = weights_dir / "BiomedNLP-BiomedBERT-base-uncased-abstract"
    text.mkdir(exist_ok=True)
    (text / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (text / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    (text / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": len(VOCAB), "hidden_size": TD,
        "num_hidden_layers": TDEPTH, "num_attention_heads": THEADS, "intermediate_size": TFF, "hidden_act": "gelu",
        "max_position_embeddings": CTX, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    clip = create_clip(SPEC, weights_dir, arch=TINY)
    assert clip.dropped_keys == ["text.transformer.embeddings.position_ids"]  # the stale buffer, listed
    sd = published_state_dict()
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    prompts = ["This is skin image of hair", "a photo of a red lesion with erythema"]
    ids = clip.tokenizer(prompts)
    assert ids.shape == (2, CTX) and ids[0, 0].item() == VOCAB.index("[CLS]")
    torch.testing.assert_close(clip.encode_image(images), reference_image_tower(sd, images)[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(clip.encode_text(prompts), reference_text_tower(sd, ids), rtol=0, atol=1e-5)
    scores = ConceptScorer(clip).score_tensor(images)
    assert scores.shape == (2, 7) and ((scores >= 0) & (scores <= 1)).all()


def test_a_fusion_model_on_the_tower_trains_and_is_explained_by_attention_rollout():
    from dermfusion.data.features import FeatureSpec
    from dermfusion.explain import Explainer
    from dermfusion.models import create_model

    torch.manual_seed(0)
    model = create_model("single_image", num_classes=7, feature_spec=FeatureSpec(modalities=["dermoscopic"]),
                         encoder={"name": SPEC, "arch": TINY})
    batch = {"images": {"dermoscopic": torch.randn(2, 3, IMG, IMG)}, "image_present": torch.ones(2, 1, dtype=torch.bool),
             "numeric": torch.zeros(2, 0), "numeric_present": torch.zeros(2, 0, dtype=torch.bool),
             "categorical": torch.zeros(2, 0, dtype=torch.long), "concepts": torch.zeros(2, 0),
             "concepts_present": torch.zeros(2, 0, dtype=torch.bool)}
    model.train()(batch)["logits"].sum().backward()
    assert model.encoder("dermoscopic").model.trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # reaches the trunk
    res = Explainer.for_model(model.eval()).run({k: (v if k != "images" else {m: t[:1] for m, t in v.items()})
                                                 if not torch.is_tensor(v) else v[:1] for k, v in batch.items()})
    assert res.methods["dermoscopic"] == "attention_rollout" and res.maps["dermoscopic"][0].shape == (4, 4)
