"""What an image looks like *inside* the network: mean and standard deviation of the intermediate layers' channels.

The "cannot assess" gate compares these with the lesions a model was trained on
(``evaluation.embedding_reference``). Intermediate layers, not the final pooled features: a classifier fine-tuned
on lesions maps a photo of a cat or a cup of coffee into its lesion space (its final features put them among the
test lesions — BENCHMARKS.md), while the middle stages still see textures and shapes no dermoscopic image has.

``probe_layers(encoder)`` picks the layers: of a ``blocks`` sequence (timm EfficientNet, MobileNet, ConvNeXt-style
stages, ViT blocks) the middle ones — all but the first two and the last (all of fewer than 4), at most
`MAX_LAYERS` evenly spread; of a
ResNet ``layer2``/``layer3``. ``LayerStats(model, modality)`` hooks them during any forward pass (eager, the
explainer's, or an ONNX export's trace) and returns one B×S row per image: per layer, channel means then channel
standard deviations (over H×W of a feature map, over the tokens of a token sequence).
"""
from __future__ import annotations

import threading

import torch
from torch import nn

MAX_LAYERS = 4


def _unwrap(encoder: nn.Module) -> nn.Module:
    """The timm / open_clip model inside a dermfusion Backbone (or a backend's cast wrapper of one)."""
    m = encoder
    for attr in ("inner", "model", "visual", "trunk"):
        while hasattr(m, attr) and isinstance(getattr(m, attr), nn.Module):
            m = getattr(m, attr)
    return m


def probe_layers(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose statistics describe an image (see the module docstring); empty when none is known."""
    m = _unwrap(encoder)
    blocks = getattr(m, "blocks", None) or getattr(m, "stages", None) or getattr(getattr(m, "transformer", None),
                                                                                 "resblocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        idx = list(range(2, len(blocks) - 1)) if len(blocks) >= 4 else list(range(len(blocks)))
        if len(idx) > MAX_LAYERS:
            idx = sorted({idx[round(i * (len(idx) - 1) / (MAX_LAYERS - 1))] for i in range(MAX_LAYERS)})
        return [(f"blocks.{i}", blocks[i]) for i in idx]
    if all(hasattr(m, f"layer{i}") for i in (2, 3)):
        return [("layer2", m.layer2), ("layer3", m.layer3)]
    return []


def pooled_stats(x: torch.Tensor) -> torch.Tensor:
    """B×2C: channel means then standard deviations of a B×C×H×W map or a B×N×C token sequence."""
    x = x.float()
    if x.ndim == 4:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    if x.ndim == 3:
        return torch.cat([x.mean(1), x.std(1)], 1)
    raise ValueError(f"cannot pool a {x.ndim}-D layer output")


def _join_windows(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B·n)×T×C tokens → B×(n·T)×C; (B·n)×C×H×W maps → B×C×(n·H)×W: each image's n windows as one."""
    if x.ndim == 4:
        return x.reshape(-1, n, *x.shape[1:]).transpose(1, 2).flatten(2, 3)
    return x.reshape(-1, n * x.shape[1], *x.shape[2:])


class LayerStats:
    """Collects `pooled_stats` of ``modality``'s encoder layers while the model runs::

        with LayerStats(model, "dermoscopic") as ls:
            model(batch)
        rows = ls.take()          # B×S, or None when the encoder never ran

    Hooks fire in the thread that runs the forward pass; only that of the thread that entered the block is kept,
    so concurrent requests through one model (the service's workers) never see each other's statistics.
    ``available`` is False (and nothing is hooked) when the model has no own encoder for ``modality`` (a shared
    encoder runs once per modality, so its calls could not be told apart) or no known layers."""

    def __init__(self, model: nn.Module, modality: str):
        self.modality, self.layers, self._handles, self._out = modality, [], [], {}
        encoders = getattr(model, "encoders", None)
        enc = encoders[modality] if isinstance(encoders, nn.ModuleDict) and modality in encoders else None
        if enc is not None and sum(e is enc for e in encoders.values()) == 1:
            self.layers = probe_layers(enc)
        # an encoder that reads each image as n windows (remixformer's dermoscopy branch): n rows make one image
        windows = (getattr(model, "encoder_windows", None) or {}).get(modality)
        self.rows_per_image = int(windows[0] * windows[1]) if windows else 1

    @property
    def available(self) -> bool:
        return bool(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [n for n, _ in self.layers]

    def __enter__(self) -> "LayerStats":
        self._out, self._thread = {}, threading.get_ident()
        for i, (_, layer) in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        def fn(_module, _inputs, output):
            if threading.get_ident() != self._thread:  # another request's forward pass through the shared model
                return
            if i in self._out:  # the model reran these layers in this pass (remixformer's close-ups): the image's first
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if self.rows_per_image > 1:
                out = _join_windows(out, self.rows_per_image)
            self._out[i] = pooled_stats(out).detach()
        return fn

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> torch.Tensor | None:
        if len(self._out) != len(self.layers) or not self.layers:
            return None
        return torch.cat([self._out[i] for i in range(len(self.layers))], 1)

    def dims(self) -> list[int]:
        """Width of each layer's block in a `take` row (known after one pass)."""
        return [int(self._out[i].shape[1]) for i in range(len(self.layers))] if len(self._out) == len(self.layers) \
            else []
