"""DermLIP with the PanDerm-base image tower (Derm1M, github.com/SiyuanYan1/Derm1M), built from its open_clip config.

DermLIP comes in two layouts. ``DermLIP_ViT-B-16`` is a stock open_clip ViT-B/16 and loads as ``open_clip:<dir>``
(backbones.py, clip_family.py). ``DermLIP_PanDerm-base-w-PubMed-256`` pairs PanDerm's ViT-B/16 encoder (CAE/BEiT
blocks: layer scale, q/v biases only) with PubMedBERT at 256 tokens; open_clip has no config for it — Derm1M
registers its own. That config is shipped here as ``open_clip_configs/PanDerm-base-w-PubMed-256.json`` (registered
with ``open_clip.add_model_config``), reconstructed without network access on these assumptions (docs/CONCEPTS.md):

* BiomedCLIP's layout (``embed_dim`` 512; a timm image tower ``visual.trunk.*`` with its own CLS-token pooling and
  final norm, then ``visual.head.proj`` 768→512 without bias; an HF text tower ``text.transformer.*`` with CLS
  pooling and a 2-layer MLP projection ``text.proj.0`` / ``text.proj.2`` without biases; ``logit_scale``);
* the trunk is PanDerm-base: ViT-B/16, 224 px, absolute position embeddings, LayerNorm eps 1e-6, layer scale.
  Its keys may be CAE-style (``q_bias``/``v_bias``, ``gamma_1``/``gamma_2``, as PanDerm's own code names them) or
  timm-style; both load (CAE keys through :func:`~dermfusion.models.panderm.panderm_checkpoint_filter_fn`);
* preprocessing: the ``preprocess_cfg`` of the ``open_clip_config.json`` next to the weights when there is one,
  else open_clip's default (OpenAI CLIP mean/std, bicubic short-side resize to 224, centre crop).

The timm name the config refers to (``dermlip_panderm_base_patch16_224``) is this project's; it is registered in
timm on first use. Loading is strict: every ``visual.*`` tensor must fit. An image encoder needs the image tower
only (no ``transformers``): the text-tower keys are set aside by name — and anything else is refused.
"""
from __future__ import annotations

import json
import logging
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import DermfusionError
from .checkpoint import (CheckpointMismatchError, WeightsNotFoundError, load_state_dict_strict, read_state_dict,
                         strip_prefixes)
from .panderm import PANDERM_ARCHS, panderm_checkpoint_filter_fn

CONFIG_DIR = Path(__file__).with_name("open_clip_configs")
PANDERM_BASE_CLIP = "PanDerm-base-w-PubMed-256"
ALIASES = {"panderm-base": PANDERM_BASE_CLIP, PANDERM_BASE_CLIP.lower(): PANDERM_BASE_CLIP}
TRUNK_NAME = "dermlip_panderm_base_patch16_224"
HUB_REPO = "redlessone/DermLIP_PanDerm-base-w-PubMed-256"
TEXT_MODEL = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"   # formerly BiomedNLP-PubMedBERT-…
# open_clip's default preprocessing (its OpenAI CLIP statistics), used unless the published config says otherwise
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
NON_VISUAL = ("text.", "logit_scale", "logit_bias")
# transformers >= 4.31 no longer keeps BERT's position_ids buffer; checkpoints written before still carry it
STALE_TEXT_BUFFERS = ("text.transformer.embeddings.position_ids",)
log = logging.getLogger(__name__)
_REGISTERED: set[str] = set()


class DermLipWeightsError(WeightsNotFoundError):
    """DermLIP PanDerm-base weights (or its text model's files) named but not there."""


def how_to_get(target: str = "/weights/dermlip_panderm") -> str:
    return (f"download it on a machine with network: `huggingface-cli download {HUB_REPO} --local-dir {target}` "
            f"(README, 'Foundation models')")


def resolve_name(ident: str) -> str:
    name = ALIASES.get(ident.lower(), ident)
    if name != PANDERM_BASE_CLIP:
        raise ValueError(f"unknown DermLIP model {ident!r}: 'dermlip:{PANDERM_BASE_CLIP}' (alias 'dermlip:panderm-base')"
                         f" is the PanDerm-base variant; the stock DermLIP ViT-B/16 loads as 'open_clip:<dir>'")
    return name


def register_panderm_trunk(name: str, **arch) -> str:
    """Register a PanDerm-shaped timm ViT (layer scale, qkv bias, eps 1e-6) under ``name`` so an open_clip config can
    name it as ``timm_model_name``; ``arch`` overrides PanDerm-base's shape. Idempotent."""
    if name in _REGISTERED:
        return name
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    args = dict(PANDERM_ARCHS["vit_base_patch16_224"], patch_size=16, img_size=224, init_values=0.1, qkv_bias=True)
    args.update(arch)
    size = args["img_size"]

    def entry(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name} has no timm weights: load a DermLIP checkpoint (dermlip.load_visual_weights)")
        if kwargs.get("pretrained_cfg") is None:
            kwargs["pretrained_cfg"] = dict(input_size=(3, size, size), mean=OPENAI_MEAN, std=OPENAI_STD,
                                            interpolation="bicubic", crop_pct=1.0, num_classes=0)
        return build_model_with_cfg(VisionTransformer, name, pretrained, **{**args, **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    setattr(sys.modules[__name__], name, entry)  # timm looks the entrypoint up in its module
    register_model(entry)
    _REGISTERED.add(name)
    return name


def register() -> None:
    """The PanDerm-base trunk in timm and this package's model configs in open_clip (once per process)."""
    if "open_clip" in _REGISTERED:
        return
    import open_clip

    register_panderm_trunk(TRUNK_NAME)
    open_clip.add_model_config(CONFIG_DIR)
    _REGISTERED.add("open_clip")


def model_config(name: str = PANDERM_BASE_CLIP) -> dict:
    """The shipped open_clip model config (a fresh copy)."""
    return json.loads((CONFIG_DIR / f"{resolve_name(name)}.json").read_text(encoding="utf-8"))


def build_visual(cfg: dict, drop_path_rate: float | None = None) -> nn.Module:
    """open_clip's timm image tower (``trunk`` + ``head``) for a config's ``vision_cfg`` — no text tower."""
    from open_clip.timm_model import TimmModel

    register()
    vc = cfg["vision_cfg"]
    return TimmModel(vc["timm_model_name"], cfg["embed_dim"], image_size=vc.get("image_size", 224),
                     pool=vc.get("timm_pool", ""), proj=vc.get("timm_proj", "linear"),
                     proj_bias=vc.get("timm_proj_bias", False), drop=vc.get("timm_drop", 0.0),
                     drop_path=drop_path_rate if drop_path_rate is not None else vc.get("timm_drop_path"))


def weights_location(pretrained_path) -> Path:
    path = Path(pretrained_path).expanduser()
    if not path.exists():
        raise DermLipWeightsError(f"DermLIP PanDerm-base weights not found: {path} — {how_to_get()} and give that "
                                  f"directory (or its weights file) as pretrained_path / --weights")
    return path


def published_preprocessing(pretrained_path) -> dict:
    """The data config: the ``preprocess_cfg`` of an ``open_clip_config.json`` beside the weights, else
    open_clip's default (OpenAI CLIP mean/std, bicubic short-side resize, centre crop)."""
    dc = dict(input_size=(3, 224, 224), mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic", crop_pct=1.0)
    if pretrained_path is None:
        return dc
    path = Path(pretrained_path).expanduser()
    f = (path if path.is_dir() else path.parent) / "open_clip_config.json"
    if not f.is_file():
        return dc
    pp = json.loads(f.read_text(encoding="utf-8")).get("preprocess_cfg") or {}
    size = pp.get("size", 224)
    size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    return dict(dc, input_size=(3, size, size), mean=tuple(pp.get("mean", OPENAI_MEAN)),
                std=tuple(pp.get("std", OPENAI_STD)), interpolation=pp.get("interpolation", "bicubic"))


def split_checkpoint(sd: dict[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """(image-tower tensors without the ``visual.`` prefix, text-tower / logit tensors); anything else is refused."""
    sd = strip_prefixes(sd, ("module.",))
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    foreign = sorted(k for k in rest if not k.startswith(NON_VISUAL))
    if foreign or not any(k.startswith("trunk.") for k in visual):
        raise CheckpointMismatchError(source, [] if visual else ["visual.trunk.*"], foreign, hint=(
            "a DermLIP PanDerm-base checkpoint holds visual.trunk.* (PanDerm ViT-B/16), visual.head.proj.weight, "
            "text.* (PubMedBERT) and logit_scale; a stock open_clip ViT (visual.conv1 …, transformer.*) loads as "
            "'open_clip:<dir>'"))
    return visual, rest


def map_visual(visual_sd: dict[str, torch.Tensor], tower: nn.Module) -> dict[str, torch.Tensor]:
    """CAE/BEiT-named trunk tensors onto timm names (timm-named ones pass through); the head is kept as is."""
    trunk = {k[len("trunk."):]: v for k, v in visual_sd.items() if k.startswith("trunk.")}
    out = {f"trunk.{k}": v for k, v in panderm_checkpoint_filter_fn(trunk, tower.trunk).items()}
    out.update({k: v for k, v in visual_sd.items() if not k.startswith("trunk.")})
    return out


def load_visual_weights(tower: nn.Module, pretrained_path) -> list[str]:
    """Load a DermLIP PanDerm-base checkpoint's image tower strictly; the text-tower keys set aside (returned)."""
    path = weights_location(pretrained_path)
    visual, rest = split_checkpoint(read_state_dict(path), str(path))
    load_state_dict_strict(tower, map_visual(visual, tower), source=str(path),
                           hint="the image tower of DermLIP PanDerm-base is a ViT-B/16 (768 wide, 12 blocks) projected "
                                "to 512")
    return sorted(rest)


def create_visual(ident: str, pretrained_path=None, *, input_size: int | None = None, arch: dict | None = None,
                  drop_path_rate: float | None = None) -> tuple[nn.Module, dict]:
    """(image tower, data config) of ``dermlip:<ident>``; ``pretrained_path`` (directory or file) loaded strictly,
    None for a randomly initialised tower (a bundle's weights follow). ``arch``: a config dict instead of the
    shipped one (tests use a small one with the same key names)."""
    cfg = arch if arch is not None else model_config(resolve_name(ident))
    if pretrained_path is not None:
        weights_location(pretrained_path)  # a missing download fails before the tower is built
    tower = build_visual(cfg, drop_path_rate)
    if pretrained_path is not None:
        set_aside = load_visual_weights(tower, pretrained_path)
        log.info("%s: image tower loaded; %d text-tower tensor(s) not needed by an image encoder", pretrained_path,
                 len(set_aside))
    dc = published_preprocessing(pretrained_path)
    size = int(tower.image_size[0])
    if input_size and int(input_size) != size:
        tower.set_input_size(int(input_size))  # resamples the position embeddings
        size = int(input_size)
    return tower, dict(dc, input_size=(3, size, size))


# ------------------------------------------------------------------------------------ the whole CLIP (scorer)
def text_model_dir(cfg: dict, pretrained_path, text_dir=None) -> Path:
    """The local copy of the text model's config and tokenizer: ``text_dir``, else a folder beside the weights
    named like the model (``BiomedNLP-BiomedBERT-base-uncased-abstract``, the older ``…PubMedBERT…``, ``text``)."""
    if text_dir is not None:
        found = Path(text_dir).expanduser()
        if not (found / "config.json").is_file():
            raise DermLipWeightsError(f"{found}: no config.json of the text model ({TEXT_MODEL})")
        return found
    root = Path(pretrained_path).expanduser()
    root = root if root.is_dir() else root.parent
    names = [cfg["text_cfg"]["hf_model_name"].split("/")[-1], "BiomedNLP-PubMedBERT-base-uncased-abstract", "text"]
    for name in names:
        if (root / name / "config.json").is_file():
            return root / name
    raise DermLipWeightsError(
        f"DermLIP PanDerm-base's text tower needs {TEXT_MODEL}'s config and tokenizer, looked for in "
        f"{', '.join(str(root / n) for n in names[:1] + names[2:])}: on a machine with network run `huggingface-cli "
        f"download {TEXT_MODEL} config.json vocab.txt tokenizer_config.json --local-dir {root / names[0]}`")


def create_clip_model(ident: str, pretrained_path, *, text_dir=None, arch: dict | None = None):
    """(open_clip ``CustomTextCLIP``, tokenizer, data config, set-aside keys) for the concept scorer: both towers,
    the text tower from a local copy of its HF config (needs ``transformers``), the checkpoint loaded strictly."""
    if pretrained_path is None:
        raise DermLipWeightsError(f"dermlip:{ident} needs its weights (a random scorer gives meaningless concept "
                                  f"scores): {how_to_get()}")
    path = weights_location(pretrained_path)
    cfg = arch if arch is not None else model_config(resolve_name(ident))
    text = text_model_dir(cfg, path, text_dir)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DermfusionError("DermLIP PanDerm-base's text tower is a HuggingFace BERT: `pip install transformers` "
                              "(the image encoder alone needs no transformers)") from None
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer

    register()
    text_cfg = dict(cfg["text_cfg"], hf_model_name=str(text), hf_tokenizer_name=str(text), hf_model_pretrained=False)
    model = CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], text_cfg)
    visual, rest = split_checkpoint(read_state_dict(path), str(path))
    sd = OrderedDict((f"visual.{k}", v) for k, v in map_visual(visual, model.visual).items())
    own = model.state_dict()
    dropped = sorted(k for k in rest if k in STALE_TEXT_BUFFERS and k not in own)
    sd.update((k, v) for k, v in rest.items() if k not in dropped)
    load_state_dict_strict(model, sd, source=str(path))
    tokenizer = HFTokenizer(str(text), context_length=int(cfg["text_cfg"].get("context_length", 256)))
    dc = published_preprocessing(path)
    size = int(model.visual.image_size[0])
    return model.eval(), tokenizer, dict(dc, input_size=(3, size, size)), dropped
