"""Image encoders behind one interface: timm, open_clip and PanDerm.

``create_backbone("timm:resnet18")``, ``create_backbone("open_clip:/weights/dermlip_vit_b16")``,
``create_backbone("panderm:vit_large_patch16_224", pretrained_path=...)`` all return a
:class:`Backbone` whose ``forward_tokens(x)`` gives ``(tokens B×T×Dt, pooled B×D)``. Fusion models
only see this interface, so any encoder can feed any fusion head. Weights load strictly; hub ids
fail with a message that says how to use a local copy, because these machines are offline.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dermlip, efficientnet_lite
from .checkpoint import (WeightsNotFoundError, find_weight_file, hub_error, hub_offline, load_state_dict_strict,
                         read_state_dict)
from .panderm import PANDERM_DATA_CONFIG, create_panderm_vit
from .settings import ModelSettingsError, unexpected_encoder_setting

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_EMBED_NAMES = re.compile(r"(^|\.)(cls_token|reg_token|dist_token|pos_embed|mask_token|class_embedding|"
                          r"positional_embedding)$")


def tiny_backbone_spec(img_size: int = 32) -> dict:
    """A randomly initialised 2-block ViT (~0.1 M params): for tests and the CPU demo."""
    return {"name": "timm:vit_tiny_patch16_224", "img_size": img_size, "patch_size": 8, "depth": 2,
            "embed_dim": 32, "num_heads": 2}


class Backbone(nn.Module):
    """An image encoder wrapping ``self.model``.

    Attributes: ``dim`` (pooled width), ``token_dim`` (token width), ``data_config`` (input_size,
    mean, std, interpolation), ``num_blocks``. Parameter names given to :meth:`block_index` are
    relative to this module (``model.blocks.3.attn.qkv.weight``).
    """

    def __init__(self, model: nn.Module, *, name: str, dim: int, token_dim: int, data_config: dict,
                 layer_map: dict[str, int], num_blocks: int):
        super().__init__()
        self.model, self.name, self.dim, self.token_dim = model, name, dim, token_dim
        self.data_config = data_config
        self._layer_map, self.num_blocks = layer_map, num_blocks

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_tokens(x)

    def block_index(self, param_name: str) -> int | None:
        """-1 for stem / patch & position embeddings, 0…num_blocks-1 for blocks, None above the blocks."""
        if not param_name.startswith("model."):
            param_name = "model." + param_name
        return self._layer_map.get(param_name)

    def no_weight_decay_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if _EMBED_NAMES.search(n)}

    def freeze_blocks(self, n: int) -> None:
        """Freeze the stem and the first ``n`` blocks (``n < 0``: freeze everything)."""
        for pname, p in self.named_parameters():
            idx = self.block_index(pname)
            if n < 0 or (idx is not None and idx < n):
                p.requires_grad_(False)


class TimmBackbone(Backbone):
    """Any timm model: CNN tokens are the flattened feature map, ViT tokens the ``forward_features`` output."""
    def forward_tokens(self, x):
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats
        return tokens, pooled


class OpenClipBackbone(Backbone):
    """The visual tower of an open_clip model. Tokens come before the projection, pooled after it."""
    def forward_tokens(self, x):
        out = self.model(x)
        if isinstance(out, tuple):
            pooled, tokens = out
        else:  # towers without token output (timm trunks): a single pooled token
            pooled, tokens = out, out[:, None]
        return tokens, pooled


class ClipTowerBackbone(Backbone):
    """A CLIP image tower with a timm ``trunk`` and its own pooling + ``head`` (DermLIP PanDerm-base, DermFM-Zero):
    tokens from the trunk after its final norm, pooled = the image embedding the CLIP model computes."""
    def forward_tokens(self, x):
        return self.model.tokens_and_embedding(x)


# ----------------------------------------------------------------------------------------------- factory
def create_backbone(spec: str | dict, pretrained_path: str | Path | None = None, *, pretrained: bool | str = False,
                    input_size: int | None = None, allow_head_mismatch: bool = False,
                    ignore_pretraining_keys: bool = False, **kwargs: Any) -> Backbone:
    """Build an encoder from ``"<source>:<name>"``; ``spec`` may be a dict with ``name`` plus these kwargs.

    Sources: ``timm:`` (any timm name, ``hf-hub:`` ids included), ``open_clip:`` (built-in name,
    ``hf-hub:`` id or local directory), ``panderm:`` (``vit_base_patch16_224`` / ``vit_large_patch16_224``),
    ``dermlip:`` (``PanDerm-base-w-PubMed-256``: DermLIP's PanDerm-base image tower, weights = its HF download;
    ``DermFM-Zero`` likewise).
    ``pretrained_path`` (file or directory) is always loaded strictly. Extra kwargs go to the model
    constructor (``img_size``, ``depth``, ``drop_path_rate`` …). ``pretrained=True`` asks the
    library's own hub download (needs network).
    """
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name")
        pretrained_path = spec.pop("pretrained_path", pretrained_path)
        pretrained = spec.pop("pretrained", pretrained)
        input_size = spec.pop("input_size", input_size)
        allow_head_mismatch = spec.pop("allow_head_mismatch", allow_head_mismatch)
        ignore_pretraining_keys = spec.pop("ignore_pretraining_keys", ignore_pretraining_keys)
        kwargs = {**spec, **kwargs}
    else:
        name = spec
    source, _, ident = name.partition(":")
    if not ident:
        raise ValueError(f"backbone spec {name!r} must look like 'timm:<name>', 'open_clip:<name|hf-hub:id|dir>' "
                         f"or 'panderm:<arch>'")
    if source == "timm":
        return _create_timm(ident, pretrained_path, pretrained, input_size, allow_head_mismatch, kwargs)
    if source == "open_clip":
        return _create_open_clip(ident, pretrained_path, pretrained, input_size, kwargs)
    if source == "panderm":
        if input_size and "img_size" not in kwargs:
            kwargs["img_size"] = input_size
        model = create_panderm_vit(ident, pretrained_path, ignore_pretraining_keys=ignore_pretraining_keys,
                                   allow_head_mismatch=allow_head_mismatch, **kwargs)
        dc = dict(PANDERM_DATA_CONFIG, input_size=(3, *_img_size(model, input_size or 224)))
        return _wrap_timm(model, f"panderm:{ident}", dc)
    if source == "dermlip":  # DermLIP's PanDerm-base variant / DermFM-Zero: PanDerm's tower + head (dermlip.py)
        for key in kwargs:
            if key not in ("drop_path_rate", "arch"):
                raise ModelSettingsError(f"model.encoder.{key}: encoder {name!r} has no setting {key!r}; it takes "
                                         f"drop_path_rate (and input_size, pretrained_path)")
        tower, dc = dermlip.create_visual(ident, pretrained_path, input_size=input_size, **kwargs)
        layer_map, num = _timm_layer_map(tower.trunk, "model.trunk.")
        return ClipTowerBackbone(tower, name=f"dermlip:{ident}", dim=int(tower.head.out_features),
                                 token_dim=tower.trunk.num_features, data_config=dc, layer_map=layer_map,
                                 num_blocks=num)
    raise ValueError(f"unknown backbone source {source!r} in {name!r}; use timm:, open_clip:, panderm: or dermlip:")


def _img_size(model: nn.Module, default: int) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None) if pe is not None else None
    if size is None:
        return (default, default)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _create_timm(ident, pretrained_path, pretrained, input_size, allow_head_mismatch, kwargs) -> Backbone:
    import timm

    is_vit_like = "vit" in ident or "deit" in ident or "eva" in ident or "beit" in ident
    if input_size and is_vit_like and "img_size" not in kwargs:
        kwargs["img_size"] = input_size
    use_hub = bool(pretrained) or ident.startswith("hf-hub:")
    if use_hub and pretrained_path is None:
        how = "create_backbone('timm:<arch>', pretrained_path='DIR/model.safetensors')"
        if hub_offline():
            raise hub_error(ident, how)
        try:
            model = _timm_create(timm, ident, True, kwargs)
        except ModelSettingsError:
            raise
        except Exception as e:  # noqa: BLE001 — any download failure gets the same actionable message
            raise hub_error(ident, how, e) from e
    else:
        if ident.startswith("hf-hub:"):
            raise ValueError(f"{ident!r} is a hub id; with pretrained_path give the architecture name instead "
                             f"(e.g. 'timm:vit_base_patch16_224')")
        if pretrained_path is not None:
            find_weight_file(pretrained_path)  # a missing download fails before the network is built
        model = _timm_create(timm, ident, False, kwargs)
        if pretrained_path is not None:
            load_timm_checkpoint(model, pretrained_path, allow_head_mismatch=allow_head_mismatch)
    dc = timm.data.resolve_data_config({}, model=model)
    # pretrained_cfg keeps the checkpoint's 224; the model's real input size is what preprocessing needs
    dc = dict(dc, input_size=(3, *_img_size(model, input_size or dc["input_size"][-1])))
    return _wrap_timm(model, f"timm:{ident}", dc)


def _timm_create(timm, ident: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model`` — a misspelt encoder option is a ModelSettingsError, not a TypeError traceback."""
    try:
        return timm.create_model(ident, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as e:
        err = unexpected_encoder_setting(e, timm.models, f"timm:{ident}")
        if err is None:
            raise
        raise err from None


def load_timm_checkpoint(model: nn.Module, pretrained_path, *, allow_head_mismatch: bool = False) -> list[str]:
    """Load a checkpoint (file, directory or ``package:<module>``) strictly into a timm model.

    Foreign layouts are mapped first: the lukemelas EfficientNet layout by
    :func:`~dermfusion.models.efficientnet_lite.checkpoint_filter_fn`, others by timm's own filter for
    the model's family. A headless encoder (``num_classes=0``) has no classifier, so the checkpoint's
    classifier tensors are the only ones left out; they are returned (and nothing else may differ).
    """
    sd = read_state_dict(pretrained_path)
    if efficientnet_lite.is_lukemelas_layout(sd):
        sd = efficientnet_lite.checkpoint_filter_fn(sd, model)
    elif hasattr(model, "pretrained_cfg") and callable(getattr(_timm_module(model), "checkpoint_filter_fn", None)):
        sd = _timm_module(model).checkpoint_filter_fn(sd, model)
    left_out: list[str] = []
    if getattr(model, "num_classes", None) == 0:
        classifier = tuple(p for p in _head_prefixes(model)[:-2])  # the classifier's own prefixes
        own = model.state_dict()
        left_out = sorted(k for k in sd if k.startswith(classifier) and k not in own)
        sd = {k: v for k, v in sd.items() if k not in left_out}
    load_state_dict_strict(model, sd, source=str(pretrained_path), allow_head_mismatch=allow_head_mismatch,
                           head_prefixes=_head_prefixes(model))
    return left_out


def _timm_module(model):
    import sys

    return sys.modules.get(type(model).__module__)


def _head_prefixes(model) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    classifier = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    return tuple(c + "." for c in classifier) + ("head.", "fc_norm.")


def _wrap_timm(model, name: str, data_config: dict) -> TimmBackbone:
    layer_map, num_blocks = _timm_layer_map(model, "model.")
    token_dim = model.num_features  # width of forward_features; pooled may differ (head_hidden_size)
    dc = {k: data_config[k] for k in ("input_size", "mean", "std", "interpolation")}
    # a foundation model's published evaluation crop and where its preprocessing comes from travel with it (timm's
    # own crop_pct does not: Preprocess ignores it)
    dc.update({k: data_config[k] for k in ("resize_crop_pct", "preprocess_source") if k in data_config})
    dc["mean"], dc["std"] = tuple(dc["mean"]), tuple(dc["std"])
    return TimmBackbone(model, name=name, dim=getattr(model, "head_hidden_size", None) or token_dim, token_dim=token_dim,
                        data_config=dc, layer_map=layer_map, num_blocks=num_blocks)


def _timm_layer_map(model: nn.Module, prefix: str) -> tuple[dict[str, int], int]:
    """Block index per parameter from timm's own ``group_matcher`` (stem -> -1)."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        top = max(groups.values()) if groups else 0
        return {prefix + n: g - 1 for n, g in groups.items()}, max(top, 1)
    return _regex_layer_map(model, prefix)


def _regex_layer_map(model: nn.Module, prefix: str) -> tuple[dict[str, int], int]:
    pat = re.compile(r"(?:blocks|resblocks|layers|layer)\.(\d+)\.")
    stem = re.compile(r"(conv1|class_embedding|positional_embedding|ln_pre|patch_embed|cls_token|pos_embed|stem)")
    idx = {n: int(m.group(1)) for n, _ in model.named_parameters() if (m := pat.search(n))}
    num = max(idx.values()) + 1 if idx else 1
    out = {}
    for n, _ in model.named_parameters():
        if n in idx:
            out[prefix + n] = idx[n]
        elif stem.search(n):
            out[prefix + n] = -1
    return out, num


def _create_open_clip(ident, pretrained_path, pretrained, input_size, kwargs) -> Backbone:
    import open_clip

    how = "create_backbone('open_clip:/path/to/DIR') where DIR holds open_clip_config.json + weights"
    local = Path(ident).expanduser()
    if ident.startswith("local-dir:"):
        local = Path(ident[len("local-dir:"):]).expanduser()
    create_kwargs = dict(kwargs)
    if input_size:
        create_kwargs["force_image_size"] = input_size
    if local.is_dir():
        if not (local / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{local} has no open_clip_config.json (needed to build the model)")
        find_weight_file(local)  # refuse a directory without weights instead of a silent random init
        model = open_clip.create_model(f"local-dir:{local}", **create_kwargs)
    elif ident.startswith("hf-hub:") or (pretrained and pretrained_path is None):
        if hub_offline():
            raise hub_error(ident, how)
        try:
            model = open_clip.create_model(ident, pretrained=pretrained if isinstance(pretrained, str) else None,
                                           **create_kwargs)
        except Exception as e:  # noqa: BLE001
            raise hub_error(ident, how, e) from e
    elif ident.startswith(("/", ".", "~")):
        raise WeightsNotFoundError(f"open_clip directory not found: {ident} — download the model into it (DermLIP "
                                   f"ViT-B/16: `huggingface-cli download redlessone/DermLIP_ViT-B-16 --local-dir {ident}`)")
    else:  # built-in architecture, optional local weights file (loaded strictly by open_clip)
        if pretrained_path is not None:
            pretrained_path = find_weight_file(pretrained_path)  # missing: named as such, not as an unknown tag
        model = open_clip.create_model(ident, pretrained=str(pretrained_path) if pretrained_path else None,
                                       **create_kwargs)
    visual = model.visual
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    dc = {"input_size": (3, *size), "mean": tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
          "std": tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
          "interpolation": pp.get("interpolation", "bicubic"),
          "preprocess_source": (f"open_clip preprocess_cfg of {local / 'open_clip_config.json'}" if local.is_dir()
                                else f"open_clip preprocess_cfg of {ident}")}
    if hasattr(visual, "output_tokens"):
        visual.output_tokens = True
    dim = getattr(visual, "output_dim", None) or model.visual.proj.shape[1]
    token_dim = visual.transformer.width if hasattr(visual, "transformer") else dim
    if hasattr(visual, "trunk"):
        layer_map, num = _timm_layer_map(visual.trunk, "model.trunk.")
    else:
        layer_map, num = _regex_layer_map(visual, "model.")
    return OpenClipBackbone(visual, name=f"open_clip:{ident}", dim=dim, token_dim=token_dim, data_config=dc,
                            layer_map=layer_map, num_blocks=num)
