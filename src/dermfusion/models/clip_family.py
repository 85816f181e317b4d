"""CLIP-family image–text models for concept scoring: MONET as published, or any open_clip model.

MONET (Kim et al., Nature Medicine 2024) is OpenAI CLIP ViT-L/14 fine-tuned on dermatology image–text pairs. Its
weights are an OpenAI-CLIP-layout state dict (``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.
in_proj_weight``, ``token_embedding.weight``, ``text_projection``, ``logit_scale`` …) for a network with
**QuickGELU** activations — open_clip's ``ViT-L-14-quickgelu``. Loading those weights into the plain ``ViT-L-14``
(exact GELU) would run without error and give subtly wrong embeddings, so the architecture is fixed here and the
load is strict (key set with shapes and sources: models/upstream_keys/monet_vit_l14.json).

MONET's preprocessing is pinned to suinleelab/MONET@3ae0a64 (README "Using original openai CLIP implementation",
``get_transform(n_px=224)``): bicubic resize of the short side to 224, centre crop 224, RGB, ImageNet mean/std
(0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) — the statistics its training data module also defaults to
(src/MONET/datamodules/multiplex_datamodule.py). The first published tutorial (219b2e8, 2024-03-27) used
``clip.load``'s own preprocessing instead, i.e. OpenAI CLIP's statistics; every revision since 6c6cf38 (2024-04-09)
uses ImageNet's. Other open_clip models keep their own ``preprocess_cfg``.

``create_clip("monet:/weights/weight_clip.pt")``, ``create_clip("open_clip:/dir")``, ``create_clip("open_clip:ViT-B-32",
pretrained_path=...)`` return a :class:`ClipModel` (network, tokenizer, data config). Hub ids fail fast when offline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import dermlip
from .checkpoint import (WeightsNotFoundError, hub_error, hub_offline, load_state_dict_strict, read_state_dict,
                         strip_prefixes)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's default (PreprocessCfg): bicubic short-side resize, centre crop, OpenAI CLIP mean/std
CLIP_DATA_CONFIG = dict(input_size=(3, 224, 224), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                        interpolation="bicubic", crop_pct=1.0, crop_mode="center")
MONET_SOURCE = "suinleelab/MONET@3ae0a64dcc96a6fa23c191f85d85325181caf1dd:README.md (get_transform)"
MONET_DATA_CONFIG = dict(CLIP_DATA_CONFIG, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         preprocess_source=MONET_SOURCE)
MONET_WEIGHTS_URL = "https://aimslab.cs.washington.edu/MONET/weight_clip.pt"
MONET_ARCH = "ViT-L-14-quickgelu"
# bookkeeping entries of an OpenAI JIT archive's state dict: not parameters (open_clip drops them too)
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


class ClipWeightsError(WeightsNotFoundError):
    """Weights for a CLIP-family model were named but are not there."""


@dataclass
class ClipModel:
    """A CLIP-family network with what it needs around it: ``tokenizer(list[str]) -> LongTensor`` and the data
    config (input size, mean, std, interpolation) its images must be preprocessed with."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    data_config: dict
    name: str
    dropped_keys: list[str] = field(default_factory=list)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


def build_clip(cfg: str | dict) -> nn.Module:
    """An open_clip ``CLIP`` network, randomly initialised, from an architecture name or a config dict
    (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``) — built locally, never from a hub."""
    import open_clip
    from open_clip.model import CLIP

    if isinstance(cfg, str):
        named = open_clip.get_model_config(cfg)
        if named is None:
            raise ValueError(f"unknown open_clip architecture {cfg!r}; e.g. {MONET_ARCH!r}, 'ViT-B-16', 'ViT-B-32'")
        cfg = named
    cfg = dict(cfg)
    cfg.pop("custom_text", None)
    return CLIP(**cfg)


def load_openai_clip_state_dict(model: nn.Module, path: str | Path) -> list[str]:
    """Load an OpenAI-CLIP-layout checkpoint (MONET) **strictly** into an open_clip ``CLIP``; return the
    non-parameter entries that were dropped (``input_resolution``, ``context_length``, ``vocab_size``)."""
    if _is_jit_archive(path):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd = read_state_dict(path)
    sd = strip_prefixes(sd, ("module.", "model."))
    dropped = sorted(k for k in sd if k in OPENAI_METADATA_KEYS)
    sd = {k: v for k, v in sd.items() if k not in OPENAI_METADATA_KEYS}
    load_state_dict_strict(model, sd, source=str(path),
                           hint="a MONET checkpoint is an OpenAI-CLIP ViT-L/14 state dict (visual.*, transformer.*, "
                                "token_embedding, text_projection, logit_scale)")
    return dropped


def _is_jit_archive(path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    import zipfile

    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _tokenizer(model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    import open_clip

    ctx = int(getattr(model, "context_length", 77) or 77)
    tok = open_clip.tokenize  # OpenAI's BPE; its vocabulary ships inside open_clip (no download)
    return lambda texts: tok(list(texts), context_length=ctx)


def create_clip(spec: str, pretrained_path: str | Path | None = None, *, arch: str | dict | None = None,
                text_dir: str | Path | None = None) -> ClipModel:
    """A CLIP-family model for concept scoring.

    ``monet:<file>`` (or ``monet`` with ``pretrained_path``): the MONET weights file (OpenAI-CLIP layout, ``.pt``
    JIT archive, ``.pth`` or ``.safetensors``) into ``ViT-L-14-quickgelu`` (``arch`` overrides it — tests use a
    small config with the same key names). ``open_clip:<dir>``: a directory with ``open_clip_config.json`` + weights
    (DermLIP). ``open_clip:<arch>`` with ``pretrained_path``: a built-in architecture and a local weights file.
    ``open_clip:hf-hub:<id>``: the hub (needs network; fails at once when offline). ``dermlip:PanDerm-base-w-PubMed-256``
    (or ``dermlip:DermFM-Zero``) with ``pretrained_path`` (the HF download): PanDerm's tower + PubMedBERT
    (models/dermlip.py); the text model's config + tokenizer come from ``text_dir`` or a folder beside the weights
    (needs ``transformers``).
    """
    source, _, ident = spec.partition(":")
    if source == "monet":
        path = ident or pretrained_path
        if not path or str(path).startswith("hf-hub:"):
            how = "create_clip('monet:/weights/weight_clip.pt') (an OpenAI-CLIP-layout ViT-L/14 state dict)"
            if path and hub_offline():
                raise hub_error(str(path), how)
            if not path:
                raise ClipWeightsError(f"MONET needs its weights file: {how}")
            return _from_hub(str(path), how)
        if not Path(path).expanduser().exists():
            raise ClipWeightsError(f"MONET weights not found: {path} — download {MONET_WEIGHTS_URL} (README, "
                                   f"'Foundation models') and give its local path")
        model = build_clip(arch or MONET_ARCH)
        dropped = load_openai_clip_state_dict(model, Path(path).expanduser())
        return ClipModel(model.eval(), _tokenizer(model), dict(MONET_DATA_CONFIG, input_size=(3, *_size(model))),
                         name=f"monet:{Path(path).name}", dropped_keys=dropped)
    if source == "open_clip":
        return _create_open_clip(ident, pretrained_path, arch)
    if source == "dermlip":
        model, tokenizer, dc, dropped = dermlip.create_clip_model(ident, pretrained_path, text_dir=text_dir,
                                                                  arch=arch if isinstance(arch, dict) else None)
        return ClipModel(model, tokenizer, dc, name=f"dermlip:{dermlip.resolve_name(ident)}", dropped_keys=dropped)
    raise ValueError(f"concept scorer model {spec!r}: use 'monet:<weights file>', 'open_clip:<dir|arch|hf-hub:id>' "
                     f"or 'dermlip:{dermlip.PANDERM_BASE_CLIP}' (with weights)")


def _create_open_clip(ident: str, pretrained_path, arch) -> ClipModel:
    import open_clip

    how = "open_clip:/path/to/DIR where DIR holds open_clip_config.json + weights"
    local = Path(ident).expanduser()
    if ident.startswith("hf-hub:"):
        if hub_offline():
            raise hub_error(ident, how)
        return _from_hub(ident, how)
    if local.is_dir():
        if not (local / "open_clip_config.json").is_file():
            raise ClipWeightsError(f"{local} has no open_clip_config.json (needed to build the model)")
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{local}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{local}")
    elif ident.startswith(("/", ".", "~")):
        raise ClipWeightsError(f"open_clip directory not found: {ident}")
    else:
        model = build_clip(arch or ident)
        if pretrained_path is None:
            raise ClipWeightsError(f"open_clip:{ident} needs weights: give pretrained_path (a local file) — a "
                                   f"randomly initialised scorer gives meaningless concept scores")
        if not Path(pretrained_path).expanduser().exists():
            raise ClipWeightsError(f"weights not found: {pretrained_path}")
        load_state_dict_strict(model, read_state_dict(Path(pretrained_path).expanduser()), source=str(pretrained_path))
        tokenizer = _tokenizer(model)
    return ClipModel(model.eval(), tokenizer, _data_config(model), name=f"open_clip:{ident}")


def _from_hub(ident: str, how: str) -> ClipModel:
    import open_clip

    try:
        model, _, _ = open_clip.create_model_and_transforms(ident)
        return ClipModel(model.eval(), open_clip.get_tokenizer(ident), _data_config(model), name=ident)
    except Exception as e:  # noqa: BLE001 — any download failure gets the same actionable message
        raise hub_error(ident, how, e) from e


def _size(model: nn.Module) -> tuple[int, int]:
    s = getattr(getattr(model, "visual", None), "image_size", 224)
    return tuple(s) if isinstance(s, (tuple, list)) else (int(s), int(s))


def _data_config(model: nn.Module) -> dict[str, Any]:
    import open_clip

    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", _size(model))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return dict(CLIP_DATA_CONFIG, input_size=(3, *size), mean=tuple(pp.get("mean", OPENAI_CLIP_MEAN)),
                std=tuple(pp.get("std", OPENAI_CLIP_STD)), interpolation=pp.get("interpolation", "bicubic"),
                preprocess_source="the model's open_clip preprocess_cfg")
