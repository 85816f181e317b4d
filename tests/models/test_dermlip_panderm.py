"""DermLIP's PanDerm-base variant (Derm1M) as the authors' open_clip fork builds it: ``visual.*`` is PanDerm's CAE ViT
(q_bias / v_bias / gamma_1 / gamma_2, final norm, ``head`` with bias; the embedding is the head of the re-normalised
mean of the patch tokens), ``text.*`` a PubMedBERT tower with mean pooling and an MLP projection, ``logit_scale``.
A checkpoint in that layout loads strictly and the image tower computes what the fork's tower computes — the
reference is tools/upstream_arch.py's description, not dermfusion's key mapping. A small width / depth with the same
key names stands in for ViT-B/16 (the full-size key set: test_upstream_keysets.py)."""
from __future__ import annotations

import json

import pytest
import torch
from upstream_fixtures import SMALL_B, U, small_dermlip_config

from dermfusion.models import dermlip
from dermfusion.models.backbones import create_backbone
from dermfusion.models.checkpoint import CheckpointMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EMBED, IMG, D = 16, SMALL_B["img_size"], SMALL_B["embed_dim"]
TINY = small_dermlip_config(EMBED, SMALL_B, dermlip.PANDERM_BASE_CLIP)
SPEC = "dermlip:PanDerm-base-w-PubMed-256"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "this", "is", "skin", "image", "of", "hair", "a", "photo",
         "dermatology", "lesion", "with", "erythema", "red"] + [f"w{i}" for i in range(22)]   # 40 = the small BERT's


def reference():
    ref = U.catalogue(small=True)["dermlip_panderm_base"]["build"]().eval()
    ref.load_state_dict(U.random_state_dict(ref))
    return ref


def published_state_dict() -> dict[str, torch.Tensor]:
    sd = dict(reference().state_dict())
    # written with transformers < 4.31, which kept BERT's position_ids buffer in the state dict
    sd["text.transformer.embeddings.position_ids"] = torch.arange(16)[None]
    return sd


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dermlip_panderm")
    torch.save(published_state_dict(), root / "open_clip_pytorch_model.bin")
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": EMBED}, "preprocess_cfg": {
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic", "size": IMG}}))
    return root


def test_the_shipped_description_is_the_forks_model():
    cfg = dermlip.model_config("panderm-base")
    assert cfg["embed_dim"] == 512 and cfg["hub_id"] == "redlessone/DermLIP_PanDerm-base-w-PubMed-256"
    assert {k: cfg["vision"][k] for k in ("image_size", "patch_size", "width", "depth", "heads", "head_bias")} == \
        {"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12, "head_bias": True}
    assert cfg["text"] == {"hf_model_name": "neuml/pubmedbert-base-embeddings", "context_length": 256,
                           "pooler": "mean_pooler", "proj": "mlp"}
    zero = dermlip.model_config("dermfm-zero")
    assert (zero["embed_dim"], zero["vision"]["width"], zero["vision"]["depth"]) == (768, 1024, 24)


@pytest.mark.parametrize("trunk_naming", ["cae", "timm"])
def test_checkpoint_loads_strictly_and_the_image_tower_matches_the_forks(weights_dir, tmp_path, trunk_naming):
    ref = reference()
    path = weights_dir
    if trunk_naming == "timm":  # the same tensors under timm's names, as an open_clip training checkpoint (wrapped)
        timm_sd = {}
        sd = published_state_dict()
        for k, v in sd.items():
            if k.endswith("attn.q_bias"):
                timm_sd[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros(D), sd[k.replace("q_", "v_")]])
            elif not k.endswith("attn.v_bias"):
                timm_sd[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = v
        torch.save({"epoch": 30, "state_dict": {f"module.{k}": v for k, v in timm_sd.items()}}, tmp_path / "ep30.pt")
        path = tmp_path / "ep30.pt"
    bb = create_backbone({"name": SPEC, "arch": TINY}, pretrained_path=path)
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, pooled = bb.forward_tokens(images)
        torch.testing.assert_close(pooled, ref.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens, ref.visual.tokens(images), rtol=0, atol=1e-5)
    assert (bb.dim, bb.token_dim) == (EMBED, D)
    assert bb.block_index("model.trunk.blocks.1.attn.qkv.weight") == 1 and bb.block_index("model.trunk.pos_embed") == -1
    if trunk_naming == "cae":  # the published preprocessing beside the weights is the one used
        assert bb.data_config["mean"] == (0.485, 0.456, 0.406) and bb.data_config["interpolation"] == "bicubic"
        assert "published with the weights" in bb.data_config["preprocess_source"]
    else:  # no open_clip_config.json beside the file: open_clip's default (OpenAI CLIP statistics)
        assert bb.data_config["mean"] == dermlip.OPENAI_MEAN
        assert bb.data_config["preprocess_source"] == dermlip.DEFAULT_SOURCE
    assert bb.data_config["input_size"] == (3, IMG, IMG)


def test_a_foreign_or_incomplete_checkpoint_is_refused(tmp_path):
    sd = published_state_dict()
    del sd["visual.blocks.1.gamma_1"]
    torch.save(sd, tmp_path / "short.bin")
    with pytest.raises(CheckpointMismatchError, match="blocks.1.ls1.gamma"):
        create_backbone({"name": SPEC, "arch": TINY}, pretrained_path=tmp_path / "short.bin")
    sd = published_state_dict()
    sd["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3)  # a stock CLIP text tower: not this model
    torch.save(sd, tmp_path / "foreign.bin")
    with pytest.raises(CheckpointMismatchError, match="open_clip:<dir>") as e:
        create_backbone({"name": SPEC, "arch": TINY}, pretrained_path=tmp_path / "foreign.bin")
    assert e.value.unexpected == ["transformer.resblocks.0.attn.in_proj_weight"]
    sd = published_state_dict()  # the layout this project once guessed (BiomedCLIP-style): refused, key by key
    sd = {k.replace("visual.", "visual.trunk.", 1) if k.startswith("visual.") and "head" not in k else k: v
          for k, v in sd.items()}
    torch.save(sd, tmp_path / "guessed.bin")
    with pytest.raises(CheckpointMismatchError):
        create_backbone({"name": SPEC, "arch": TINY}, pretrained_path=tmp_path / "guessed.bin")


def test_missing_weights_and_unknown_names_fail_at_once(tmp_path):
    with pytest.raises(dermlip.DermLipWeightsError, match="huggingface-cli download redlessone/DermLIP_PanDerm-base"):
        create_backbone(SPEC, pretrained_path=tmp_path / "not_downloaded")
    with pytest.raises(dermlip.DermLipWeightsError, match="redlessone/DermFM-Zero"):
        create_backbone("dermlip:DermFM-Zero", pretrained_path=tmp_path / "not_downloaded")
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

    text = weights_dir / "pubmedbert-base-embeddings"
    text.mkdir(exist_ok=True)
    (text / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (text / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    (text / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(VOCAB), "hidden_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48, "hidden_act": "gelu",
        "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    clip = create_clip(SPEC, weights_dir, arch=TINY)
    assert clip.dropped_keys == ["text.transformer.embeddings.position_ids"]  # the stale buffer, listed
    ref = reference()
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    prompts = ["This is skin image of hair", "a photo of a red lesion with erythema"]
    ids = clip.tokenizer(prompts)
    assert ids.shape == (2, 16) and ids[0, 0].item() == VOCAB.index("[CLS]")
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), ref.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(clip.encode_text(prompts), ref.encode_text(ids), rtol=0, atol=1e-5)
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
