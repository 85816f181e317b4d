"""DermLIP with PanDerm's image tower (Derm1M, github.com/SiyuanYan1/Derm1M) and its successor DermFM-Zero.

DermLIP comes in two layouts. ``DermLIP_ViT-B-16`` is a stock open_clip ViT-B/16 and loads as ``open_clip:<dir>``
(backbones.py, clip_family.py). ``DermLIP_PanDerm-base-w-PubMed-256`` is *not* a stock open_clip model: the authors'
open_clip fork builds a ``CustomTextCLIP`` and, because the model name contains "PanDerm-base", replaces its image
tower with PanDerm's own CAE ViT (loaded first from a separate PanDerm file, then overwritten by the DermLIP
checkpoint). What that tower is, read from the fork (SiyuanYan1/Derm1M@92d8fa9, src/CAE/models/modeling_finetune.py,
src/open_clip/{factory,utils,hf_model}.py; the facts with paths: models/upstream_keys/dermlip_panderm_base.json):

* ``visual.*`` in CAE naming (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.attn.q_bias`` /
  ``v_bias``, ``gamma_1`` / ``gamma_2``, ``norm``) plus ``visual.head`` — a Linear to the embedding width **with**
  bias; the embedding is ``head(norm(mean of the patch tokens of norm(tokens))))``: the final LayerNorm runs over
  every token, the patch tokens (not the class token) are averaged, and the same LayerNorm runs again;
* ``text.*``: a HuggingFace BERT (``neuml/pubmedbert-base-embeddings``, no pooler) under ``text.transformer``, a
  masked mean over the tokens, a bias-free 2-layer MLP projection (``text.proj.0`` / ``text.proj.2``);
* ``logit_scale``; context length 256.

DermFM-Zero (SiyuanYan1/DermFM-Zero@afbe6ba) is the same construction on PanDerm-*large* (1024 wide, 24 blocks) with
a 768-wide embedding; its weights were private at that commit. Both descriptions ship as ``dermlip_configs/*.json``.

Here the trunk is a timm ViT (PanDerm's key mapping, ``panderm.panderm_checkpoint_filter_fn``) and the tower adds the
head and the double-norm mean pooling (:class:`PanDermClipTower`). Loading is strict: every ``visual.*`` tensor must
fit; an image encoder needs the image tower only (no ``transformers``): the ``text.*`` / ``logit_scale`` tensors are
set aside by name and anything else is refused.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import DermfusionError
from .checkpoint import (CheckpointMismatchError, WeightsNotFoundError, load_state_dict_strict, read_state_dict,
                         strip_prefixes)
from .panderm import create_panderm_vit, panderm_checkpoint_filter_fn

CONFIG_DIR = Path(__file__).with_name("dermlip_configs")
PANDERM_BASE_CLIP = "PanDerm-base-w-PubMed-256"
DERMFM_ZERO = "DermFM-Zero"
MODELS = (PANDERM_BASE_CLIP, DERMFM_ZERO)
ALIASES = {"panderm-base": PANDERM_BASE_CLIP, "dermfm-zero": DERMFM_ZERO, **{m.lower(): m for m in MODELS}}
HUB_REPO = "redlessone/DermLIP_PanDerm-base-w-PubMed-256"
TEXT_MODEL = "neuml/pubmedbert-base-embeddings"
# open_clip's default preprocessing (PreprocessCfg: OpenAI CLIP statistics, bicubic, shortest side, centre crop): the
# fork trains and evaluates PanDerm-base with it (the tower sets no statistics of its own), and the hub config
# written by its push_to_hf_hub records the same values
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SOURCE = "open_clip default PreprocessCfg (SiyuanYan1/Derm1M@92d8fa9:src/open_clip/transform.py)"
NON_VISUAL = ("text.", "logit_scale", "logit_bias")
# transformers >= 4.31 no longer keeps BERT's position_ids buffer; checkpoints written before still carry it
STALE_TEXT_BUFFERS = ("text.transformer.embeddings.position_ids",)
log = logging.getLogger(__name__)


class DermLipWeightsError(WeightsNotFoundError):
    """DermLIP PanDerm-base weights (or its text model's files) named but not there."""


def how_to_get(target: str = "/weights/dermlip_panderm", name: str = PANDERM_BASE_CLIP) -> str:
    repo = model_config(name)["hub_id"] if name in MODELS else HUB_REPO
    return (f"download it on a machine with network: `huggingface-cli download {repo} --local-dir {target}` "
            f"(README, 'Foundation models')")


def resolve_name(ident: str) -> str:
    name = ALIASES.get(ident.lower(), ident)
    if name not in MODELS:
        raise ValueError(f"unknown DermLIP model {ident!r}: 'dermlip:{PANDERM_BASE_CLIP}' (alias "
                         f"'dermlip:panderm-base') or 'dermlip:{DERMFM_ZERO}'; the stock DermLIP ViT-B/16 loads as "
                         f"'open_clip:<dir>'")
    return name


def model_config(name: str = PANDERM_BASE_CLIP) -> dict:
    """The shipped description of ``name`` (a fresh copy)."""
    return json.loads((CONFIG_DIR / f"{resolve_name(name)}.json").read_text(encoding="utf-8"))


class PanDermClipTower(nn.Module):
    """The fork's image tower: PanDerm's ViT (``trunk``, a timm ViT with class token and final norm) and ``head``.

    ``forward`` gives the image embedding; :meth:`tokens_and_embedding` also the tokens after the final norm (what a
    fusion model attends over)."""

    def __init__(self, trunk: nn.Module, embed_dim: int, head_bias: bool = True):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.num_features, embed_dim, bias=head_bias)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.trunk.patch_embed.img_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def set_input_size(self, size: int) -> None:
        self.trunk.set_input_size(img_size=size)  # resamples the position embeddings

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        # upstream applies the final norm to all tokens, then again to the mean of the patch tokens (same weights)
        return self.trunk.norm(tokens[:, self.trunk.num_prefix_tokens:].mean(1))

    def tokens_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.trunk.forward_features(x)
        return tokens, self.head(self.pool(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens_and_embedding(x)[1]


def build_visual(cfg: dict, drop_path_rate: float | None = None) -> PanDermClipTower:
    """The image tower for a description's ``vision`` part, randomly initialised."""
    v = cfg["vision"]
    trunk = create_panderm_vit(v.get("arch", "vit_base_patch16_224"), None, embed_dim=v["width"], depth=v["depth"],
                               num_heads=v["heads"], img_size=v["image_size"], patch_size=v["patch_size"],
                               drop_path_rate=drop_path_rate or 0.0)
    return PanDermClipTower(trunk, cfg["embed_dim"], v.get("head_bias", True))


def weights_location(pretrained_path, name: str = PANDERM_BASE_CLIP) -> Path:
    path = Path(pretrained_path).expanduser()
    if not path.exists():
        raise DermLipWeightsError(f"DermLIP {name} weights not found: {path} — {how_to_get(name=name)} and give that "
                                  f"directory (or its weights file) as pretrained_path / --weights")
    return path


def published_preprocessing(pretrained_path) -> dict:
    """The data config: the ``preprocess_cfg`` of an ``open_clip_config.json`` beside the weights, else open_clip's
    default (OpenAI CLIP mean/std, bicubic short-side resize, centre crop); ``preprocess_source`` says which."""
    dc = dict(input_size=(3, 224, 224), mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic", crop_pct=1.0,
              preprocess_source=DEFAULT_SOURCE)
    if pretrained_path is None:
        return dc
    path = Path(pretrained_path).expanduser()
    f = (path if path.is_dir() else path.parent) / "open_clip_config.json"
    if not f.is_file():
        return dc
    pp = json.loads(f.read_text(encoding="utf-8")).get("preprocess_cfg") or {}
    if pp.get("resize_mode", "shortest") != "shortest":
        log.warning("%s: resize_mode %r — dermfusion resizes the short side and centre-crops ('shortest')", f,
                    pp["resize_mode"])
    size = pp.get("size", 224)
    size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    return dict(dc, input_size=(3, size, size), mean=tuple(pp.get("mean", OPENAI_MEAN)),
                std=tuple(pp.get("std", OPENAI_STD)), interpolation=pp.get("interpolation", "bicubic"),
                preprocess_source=f"preprocess_cfg of {f.name} published with the weights")


def split_checkpoint(sd: dict[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """(image-tower tensors without the ``visual.`` prefix, text-tower / logit tensors); anything else is refused."""
    sd = strip_prefixes(sd, ("module.",))
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    foreign = sorted(k for k in rest if not k.startswith(NON_VISUAL))
    if foreign or not any(k.startswith("blocks.") for k in visual):
        raise CheckpointMismatchError(source, [] if visual else ["visual.blocks.*"], foreign, hint=(
            "a DermLIP PanDerm checkpoint holds visual.* (PanDerm's CAE ViT: patch_embed, cls_token, pos_embed, "
            "blocks.N with q_bias / v_bias / gamma_1 / gamma_2, norm, head), text.* (PubMedBERT + proj) and "
            "logit_scale; a stock open_clip ViT (visual.conv1 …, transformer.*) loads as 'open_clip:<dir>'"))
    return visual, rest


def map_visual(visual_sd: dict[str, torch.Tensor], tower: nn.Module) -> dict[str, torch.Tensor]:
    """The fork's ``visual.*`` names (CAE trunk + ``head``) onto the tower's (``trunk.*`` timm names + ``head``)."""
    trunk = {k: v for k, v in visual_sd.items() if not k.startswith("head.")}
    out = {f"trunk.{k}": v for k, v in panderm_checkpoint_filter_fn(trunk, tower.trunk).items()}
    out.update({k: v for k, v in visual_sd.items() if k.startswith("head.")})
    return out


def load_visual_weights(tower: nn.Module, pretrained_path, name: str = PANDERM_BASE_CLIP) -> list[str]:
    """Load a DermLIP PanDerm checkpoint's image tower strictly; the text-tower keys set aside (returned)."""
    path = weights_location(pretrained_path, name)
    visual, rest = split_checkpoint(read_state_dict(path), str(path))
    load_state_dict_strict(tower, map_visual(visual, tower), source=str(path),
                           hint=f"the image tower of DermLIP {name} is PanDerm's CAE ViT ({tower.trunk.num_features} "
                                f"wide, {len(tower.trunk.blocks)} blocks) with a head to {tower.head.out_features}")
    return sorted(rest)


def create_visual(ident: str, pretrained_path=None, *, input_size: int | None = None, arch: dict | None = None,
                  drop_path_rate: float | None = None) -> tuple[PanDermClipTower, dict]:
    """(image tower, data config) of ``dermlip:<ident>``; ``pretrained_path`` (directory or file) loaded strictly,
    None for a randomly initialised tower (a bundle's weights follow). ``arch``: a description instead of the
    shipped one (tests use a small one with the same key names)."""
    name = resolve_name(ident)
    cfg = arch if arch is not None else model_config(name)
    if pretrained_path is not None:
        weights_location(pretrained_path, name)  # a missing download fails before the tower is built
    tower = build_visual(cfg, drop_path_rate)
    if pretrained_path is not None:
        set_aside = load_visual_weights(tower, pretrained_path, name)
        log.info("%s: image tower loaded; %d text-tower tensor(s) not needed by an image encoder", pretrained_path,
                 len(set_aside))
    dc = published_preprocessing(pretrained_path)
    size = int(tower.image_size[0])
    if input_size and int(input_size) != size:
        tower.set_input_size(int(input_size))
        size = int(input_size)
    return tower, dict(dc, input_size=(3, size, size))


# ------------------------------------------------------------------------------------ the whole CLIP (scorer)
class DermLipClip(nn.Module):
    """Both towers as the fork's ``CustomTextCLIP`` holds them (``visual``, ``text``, ``logit_scale``)."""

    def __init__(self, visual: PanDermClipTower, text: nn.Module):
        super().__init__()
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07); the checkpoint's value replaces it

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)


def text_model_dir(cfg: dict, pretrained_path, text_dir=None) -> Path:
    """The local copy of the text model's config and tokenizer: ``text_dir``, else a folder beside the weights named
    like the model (``pubmedbert-base-embeddings``) or ``text``."""
    hf_name = cfg["text"]["hf_model_name"]
    if text_dir is not None:
        found = Path(text_dir).expanduser()
        if not (found / "config.json").is_file():
            raise DermLipWeightsError(f"{found}: no config.json of the text model ({hf_name})")
        return found
    root = Path(pretrained_path).expanduser()
    root = root if root.is_dir() else root.parent
    names = [hf_name.split("/")[-1], "text"]
    for name in names:
        if (root / name / "config.json").is_file():
            return root / name
    raise DermLipWeightsError(
        f"the text tower needs {hf_name}'s config and tokenizer, looked for in "
        f"{', '.join(str(root / n) for n in names)}: on a machine with network run `huggingface-cli download "
        f"{hf_name} config.json vocab.txt tokenizer_config.json special_tokens_map.json --local-dir {root / names[0]}`")


def create_clip_model(ident: str, pretrained_path, *, text_dir=None, arch: dict | None = None):
    """(:class:`DermLipClip`, tokenizer, data config, set-aside keys) for the concept scorer: both towers, the text
    tower from a local copy of its HF config (needs ``transformers``), the checkpoint loaded strictly."""
    name = resolve_name(ident)
    if pretrained_path is None:
        raise DermLipWeightsError(f"dermlip:{ident} needs its weights (a random scorer gives meaningless concept "
                                  f"scores): {how_to_get(name=name)}")
    path = weights_location(pretrained_path, name)
    cfg = arch if arch is not None else model_config(name)
    text = text_model_dir(cfg, path, text_dir)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DermfusionError("DermLIP's text tower is a HuggingFace BERT: `pip install transformers` (the image "
                              "encoder alone needs no transformers)") from None
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer

    t = cfg["text"]
    model = DermLipClip(build_visual(cfg), HFTextEncoder(str(text), output_dim=cfg["embed_dim"],
                                                         pooler_type=t.get("pooler", "mean_pooler"),
                                                         proj_type=t.get("proj", "mlp"), pretrained=False))
    visual, rest = split_checkpoint(read_state_dict(path), str(path))
    sd = OrderedDict((f"visual.{k}", v) for k, v in map_visual(visual, model.visual).items())
    own = model.state_dict()
    dropped = sorted(k for k in rest if k in STALE_TEXT_BUFFERS and k not in own)
    sd.update((k, v) for k, v in rest.items() if k not in dropped)
    load_state_dict_strict(model, sd, source=str(path))
    tokenizer = HFTokenizer(str(text), context_length=int(t.get("context_length", 256)))
    dc = published_preprocessing(path)
    size = int(model.visual.image_size[0])
    return model.eval(), tokenizer, dict(dc, input_size=(3, size, size)), dropped
