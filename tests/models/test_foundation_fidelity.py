"""Foundation checkpoints in their published key layouts load strictly and compute what the published architecture
computes. Each reference forward below is written from the architecture's description, reading the checkpoint's
own tensors by their published names — not through the project's key mapping.

MONET = OpenAI CLIP ViT-L/14 (QuickGELU); a small width/depth with the same key names stands in for it.
PanDerm = CAE-v2 pre-training checkpoint: BEiT-style encoder (q_bias / v_bias, gamma_1 / gamma_2) plus regressor,
alignment encoder and mask token, which must be dropped — and listed — on request only."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dermfusion.models.backbones import create_backbone
from dermfusion.models.checkpoint import CheckpointMismatchError
from dermfusion.models.clip_family import MONET_ARCH, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_clip, create_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, LAYERS, PATCH, IMG, EMBED, HEADS = 32, 2, 8, 32, 16, 2       # vision tower (ViT-L/14: 1024, 24, 14, 224, 768, 16)
TW, TLAYERS, THEADS, CTX, VOCAB = 32, 2, 2, 77, 49408            # text tower (ViT-L/14: 768, 12, 12, 77, 49408)
SMALL_MONET = {"embed_dim": EMBED, "quick_gelu": True,
               "vision_cfg": {"image_size": IMG, "layers": LAYERS, "width": W, "patch_size": PATCH, "head_width": W // HEADS},
               "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": TW, "heads": THEADS, "layers": TLAYERS}}


def _resblocks(prefix: str, width: int, layers: int, g: torch.Generator) -> dict:
    sd = {}
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                   p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                   p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
                   p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width)})
    return sd


def openai_clip_state_dict(seed: int = 0) -> dict:
    """An OpenAI CLIP (clip/model.py) state dict, key by key as the published ViT-L/14 has them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    grid = IMG // PATCH
    sd = {"visual.conv1.weight": r(W, 3, PATCH, PATCH), "visual.class_embedding": r(W),
          "visual.positional_embedding": r(grid * grid + 1, W), "visual.ln_pre.weight": 1 + r(W),
          "visual.ln_pre.bias": r(W), "visual.ln_post.weight": 1 + r(W), "visual.ln_post.bias": r(W),
          "visual.proj": r(W, EMBED), "token_embedding.weight": r(VOCAB, TW), "positional_embedding": r(CTX, TW),
          "ln_final.weight": 1 + r(TW), "ln_final.bias": r(TW), "text_projection": r(TW, EMBED),
          "logit_scale": torch.tensor(math.log(1 / 0.07)),
          # the JIT archive's bookkeeping entries
          "input_resolution": torch.tensor(IMG), "context_length": torch.tensor(CTX), "vocab_size": torch.tensor(VOCAB)}
    sd.update(_resblocks("visual.", W, LAYERS, g))
    sd.update(_resblocks("", TW, TLAYERS, g))
    return sd


def _mha(x, w_in, b_in, w_out, b_out, heads, mask=None):
    B, N, D = x.shape
    q, k, v = (x @ w_in.T + b_in).split(D, dim=-1)
    q, k, v = (t.reshape(B, N, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-2, -1) / math.sqrt(D // heads)
    if mask is not None:
        att = att + mask
    out = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    return out @ w_out.T + b_out


def _clip_tower(x, sd, prefix, layers, heads, act, mask=None):
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        ln = lambda t, n: F.layer_norm(t, t.shape[-1:], sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
        x = x + _mha(ln(x, "ln_1"), sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
                     sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], heads, mask)
        h = act(ln(x, "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return x


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def reference_encode_image(sd, images, act=quick_gelu):
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _clip_tower(x, sd, "visual.", LAYERS, HEADS, act)
    return F.layer_norm(x[:, 0], (W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]


def reference_encode_text(sd, tokens, act=quick_gelu):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    mask = torch.full((CTX, CTX), float("-inf")).triu(1)  # causal
    x = _clip_tower(x, sd, "", TLAYERS, THEADS, act, mask)
    x = F.layer_norm(x, (TW,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]  # the end-of-text token


@pytest.fixture(scope="module")
def monet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("monet") / "monet.pt"
    torch.save(openai_clip_state_dict(), path)
    return path


def test_monet_architecture_is_vit_l14_with_quickgelu():
    import open_clip

    cfg = open_clip.get_model_config(MONET_ARCH)
    assert cfg["quick_gelu"] is True
    assert cfg["vision_cfg"] == {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}


def test_monet_checkpoint_loads_strictly_and_matches_a_reference_clip(monet_file):
    clip = create_clip(f"monet:{monet_file}", arch=SMALL_MONET)
    assert clip.dropped_keys == ["context_length", "input_resolution", "vocab_size"]
    # MONET's published preprocessing (suinleelab/MONET@3ae0a64 README): ImageNet statistics, not OpenAI CLIP's
    assert clip.data_config["mean"] == (0.485, 0.456, 0.406) and clip.data_config["std"] == (0.229, 0.224, 0.225)
    assert (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) != (clip.data_config["mean"], clip.data_config["std"])
    assert "suinleelab/MONET@3ae0a64" in clip.data_config["preprocess_source"]
    assert clip.data_config["interpolation"] == "bicubic" and clip.data_config["input_size"] == (3, IMG, IMG)
    sd = openai_clip_state_dict()
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), reference_encode_image(sd, images), rtol=1e-4, atol=1e-5)
        tokens = clip.tokenizer(["This is skin image of hair", "a photo of skin"])
        torch.testing.assert_close(clip.encode_text(["This is skin image of hair", "a photo of skin"]),
                                   reference_encode_text(sd, tokens), rtol=1e-4, atol=1e-5)
        # exact GELU instead of QuickGELU gives other embeddings: the activation matters
        gelu = reference_encode_image(sd, images, act=F.gelu)
        assert not torch.allclose(clip.encode_image(images), gelu, atol=1e-4)


def test_monet_checkpoint_with_a_foreign_key_is_refused(tmp_path):
    sd = openai_clip_state_dict()
    sd["visual.transformer.resblocks.0.mlp.fc1.weight"] = sd.pop("visual.transformer.resblocks.0.mlp.c_fc.weight")
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError, match="mlp.c_fc.weight"):
        create_clip(f"monet:{tmp_path / 'bad.pt'}", arch=SMALL_MONET)


# ------------------------------------------------------------------------------------------- PanDerm CAE-v2
PD = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def cae_v2_pretraining_state_dict(seed: int = 0) -> dict:
    """A CAE-v2 pre-training checkpoint as PanDerm's pre-training saves it: ``encoder.*`` (BEiT-style blocks) plus
    the latent regressor, its input projection and position embeddings, the alignment encoder and the mask token."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    D, P, N = PD["embed_dim"], PD["patch_size"], (PD["img_size"] // PD["patch_size"]) ** 2

    def encoder(prefix):
        sd = {prefix + "cls_token": r(1, 1, D), prefix + "pos_embed": r(1, N + 1, D),
              prefix + "patch_embed.proj.weight": r(D, 3, P, P), prefix + "patch_embed.proj.bias": r(D),
              prefix + "norm.weight": 1 + r(D), prefix + "norm.bias": r(D)}
        for i in range(PD["depth"]):
            b = f"{prefix}blocks.{i}."
            sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                       b + "attn.q_bias": r(D), b + "attn.v_bias": r(D), b + "attn.proj.weight": r(D, D),
                       b + "attn.proj.bias": r(D), b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
                       b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                       b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D),
                       b + "gamma_1": 0.1 + r(D), b + "gamma_2": 0.1 + r(D)})
        return sd

    sd = encoder("encoder.")
    sd.update({k.replace("encoder.", "alignment_encoder.", 1): v for k, v in encoder("encoder.").items()})
    sd.update({"mask_token": r(1, 1, D), "rd_pos_embed": r(1, N + 1, D),
               "encoder_to_regresser.weight": r(D, D), "encoder_to_regresser.bias": r(D),
               "encoder_to_regresser_norm.weight": 1 + r(D), "encoder_to_regresser_norm.bias": r(D),
               "regresser.blocks.0.attn.qkv.weight": r(3 * D, D), "regresser.norm.weight": 1 + r(D)})
    return sd


def reference_cae_encoder(sd, images):
    """BEiT/CAE encoder forward: x + γ1·Attn(LN(x)) (k has no bias), x + γ2·MLP(LN(x)) with exact GELU, final LN."""
    D, H = PD["embed_dim"], PD["num_heads"]
    e = lambda k: sd["encoder." + k]  # noqa: E731
    x = F.conv2d(images, e("patch_embed.proj.weight"), e("patch_embed.proj.bias"), stride=PD["patch_size"])
    x = torch.cat([e("cls_token").expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + e("pos_embed")
    for i in range(PD["depth"]):
        b = lambda k: e(f"blocks.{i}.{k}")  # noqa: E731
        h = F.layer_norm(x, (D,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv_bias = torch.cat([b("attn.q_bias"), torch.zeros(D), b("attn.v_bias")])
        x = x + b("gamma_1") * _mha(h, b("attn.qkv.weight"), qkv_bias, b("attn.proj.weight"), b("attn.proj.bias"), H)
        h = F.layer_norm(x, (D,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        x = x + b("gamma_2") * h
    return F.layer_norm(x, (D,), e("norm.weight"), e("norm.bias"), eps=1e-6)


def test_panderm_cae_v2_pretraining_checkpoint_loads_with_its_extra_keys_listed(tmp_path):
    sd = cae_v2_pretraining_state_dict()
    torch.save({"model": sd}, tmp_path / "panderm_pretrain.pth")
    spec = {"name": "panderm:vit_base_patch16_224", **PD}
    with pytest.raises(CheckpointMismatchError, match="ignore_pretraining_keys") as e:
        create_backbone(spec, pretrained_path=tmp_path / "panderm_pretrain.pth")
    assert {"regresser.norm.weight", "rd_pos_embed", "mask_token"} <= set(e.value.unexpected)
    bb = create_backbone(spec, pretrained_path=tmp_path / "panderm_pretrain.pth", ignore_pretraining_keys=True)
    extra = sorted(k for k in sd if not k.startswith("encoder."))
    assert bb.model.dropped_pretraining_keys == extra
    assert any(k.startswith("alignment_encoder.") for k in extra) and "encoder_to_regresser.weight" in extra
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(bb.model.forward_features(images), reference_cae_encoder(sd, images),
                                   rtol=1e-4, atol=1e-5)
