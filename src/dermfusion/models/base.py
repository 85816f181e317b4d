"""What every dermfusion network shares: per-modality encoders, their data configs, masked encoding.

``encoders`` is a ModuleDict (modality -> Backbone, or ``"shared"`` -> one Backbone used for all
modalities, so shared weights are stored once and safetensors can save them). The optimiser finds
encoder parameters through it for layer-wise LR decay.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data.features import FeatureSpec
from .backbones import Backbone, create_backbone, tiny_backbone_spec
from .layers import frozen_batchnorm, zero_masked


def _per_modality(value, modalities) -> dict:
    """A value given once or as {modality: value}."""
    if isinstance(value, dict) and value and set(value) <= set(modalities) and "name" not in value:
        return {m: value.get(m) for m in modalities}
    return {m: value for m in modalities}


class MultiModalNet(nn.Module):
    def __init__(self, feature_spec: FeatureSpec, modalities: list[str] | None = None, *, encoder=None,
                 shared_encoder: bool = False, pretrained_path=None, freeze_blocks: int = 0, **backbone_kwargs):
        super().__init__()
        self.feature_spec = feature_spec
        self.modalities = list(modalities or feature_spec.modalities)
        specs = _per_modality(encoder if encoder is not None else tiny_backbone_spec(), self.modalities)
        paths = _per_modality(pretrained_path, self.modalities)
        if shared_encoder:
            m0 = self.modalities[0]
            self.encoders = nn.ModuleDict({"shared": create_backbone(specs[m0], paths[m0], **backbone_kwargs)})
            self.encoder_keys = {m: "shared" for m in self.modalities}
        else:
            self.encoders = nn.ModuleDict({m: create_backbone(specs[m], paths[m], **backbone_kwargs)
                                           for m in self.modalities})
            self.encoder_keys = {m: m for m in self.modalities}
        if freeze_blocks:
            for enc in self.encoders.values():
                enc.freeze_blocks(freeze_blocks)

    def encoder(self, modality: str) -> Backbone:
        return self.encoders[self.encoder_keys[modality]]

    @property
    def data_config(self) -> dict[str, dict]:
        return {m: dict(self.encoder(m).data_config) for m in self.modalities}

    def image_presence(self, batch: dict) -> torch.Tensor:
        """B×len(self.modalities) presence, picked by name from the batch's feature_spec column order."""
        present = batch["image_present"].bool()
        cols = [self.feature_spec.modalities.index(m) for m in self.modalities]
        return present[:, cols]

    def encode_images(self, batch: dict, present: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{modality: (tokens, pooled)} with absent rows replaced by exact zeros.

        In eval mode every image is encoded and *then* masked (one static graph for export; no encoder
        mixes rows at inference). In training, only the present images enter the encoder: a BatchNorm
        encoder (EfficientNet, ResNet) would otherwise mix absent images into its batch statistics, and
        NaN pixels of an absent image would reach the weight gradients (0 × NaN is NaN in the backward).
        """
        out = {}
        for j, m in enumerate(self.modalities):
            images, keep = batch["images"][m], present[:, j]
            if self.training and not bool(keep.all()):
                tokens, pooled = encode_present_rows(self.encoder(m), images, keep)
            else:
                tokens, pooled = self.encoder(m).forward_tokens(images)
            out[m] = (zero_masked(tokens, keep), zero_masked(pooled, keep))
        return out


def encode_present_rows(encoder: Backbone, images: torch.Tensor, keep: torch.Tensor):
    """(tokens, pooled) for a batch in which only rows ``keep`` are encoded; the other rows are zeros."""
    out = run_present_rows(lambda x: dict(zip(("tokens", "pooled"), encoder.forward_tokens(x))), images, keep,
                           encoder)
    return out["tokens"], out["pooled"]


def run_present_rows(fn: Callable[[torch.Tensor], dict], images: torch.Tensor, keep: torch.Tensor,
                     module: nn.Module) -> dict:
    """``fn`` (images → {name: batch-first tensor}) on the rows ``keep`` only; the other rows are zeros. Absent
    images must not enter batch statistics or gradients. With no row present one blank image runs with BatchNorm
    frozen and its outputs times zero, so every parameter stays in the graph (DDP expects every parameter to get a
    gradient) while neither batch statistics nor gradients change."""
    n = images.shape[0]
    idx = keep.nonzero().squeeze(1)
    if idx.numel() == 0:
        with frozen_batchnorm(module):
            out = fn(torch.zeros_like(images[:1]))
        return {k: (v * 0).expand(n, *v.shape[1:]) for k, v in out.items()}
    out = fn(images.index_select(0, idx))
    return {k: v.new_zeros((n, *v.shape[1:])).index_copy(0, idx, v) for k, v in out.items()}


def drop_present(present: torch.Tensor, p: float, keep_one: bool = True) -> torch.Tensor:
    """Train-time dropout on a presence mask: drop entries with prob ``p``; never drop a row's last one."""
    if p <= 0 or present.numel() == 0:
        return present
    new = present & (torch.rand(present.shape, device=present.device) >= p)
    if keep_one:
        new = torch.where(new.any(-1, keepdim=True), new, present)
    return new


def drop_metadata(numeric_present: torch.Tensor, categorical: torch.Tensor, p: float):
    """Train-time metadata dropout: with prob ``p`` a lesion's whole patient record (numeric fields and
    categorical codes) is withheld, so the model also learns to answer when no metadata is supplied
    (the ISIC 2018 test CSV; an API request without the form)."""
    if p <= 0 or numeric_present.shape[0] == 0:
        return numeric_present, categorical
    dev = numeric_present.device if numeric_present.numel() else categorical.device
    drop = torch.rand(numeric_present.shape[0], 1, device=dev) < p
    return numeric_present & ~drop, torch.where(drop, torch.zeros_like(categorical), categorical)
