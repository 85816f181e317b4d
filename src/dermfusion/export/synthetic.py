"""A random batch for a network's inputs: what an export is traced and checked with."""
from __future__ import annotations

import torch
from torch import nn


def synthetic_batch(model: nn.Module, batch_size: int = 3, seed: int = 0, missing_image: bool = True) -> dict:
    """A random Batch for ``model``'s inputs; with ``missing_image`` the first row lacks its first image."""
    spec = model.feature_spec
    dc = model.data_config
    g = torch.Generator().manual_seed(seed)
    b, m = batch_size, len(spec.modalities)
    present = torch.ones(b, m, dtype=torch.bool)
    if missing_image and m > 1:
        present[0, 0] = False
    images = {}
    for j, mod in enumerate(spec.modalities):
        img = torch.randn(b, *dc[mod]["input_size"], generator=g)
        images[mod] = torch.where(present[:, j, None, None, None], img, torch.zeros_like(img))
    k, n = len(spec.concepts), len(spec.numeric)
    sizes = list(spec.categorical_sizes.values())
    cat = torch.stack([torch.randint(0, s, (b,), generator=g) for s in sizes], 1) if sizes \
        else torch.zeros(b, 0, dtype=torch.long)
    return {"images": images, "image_present": present,
            "concepts": torch.rand(b, k, generator=g), "concepts_present": torch.rand(b, k, generator=g) > 0.3,
            "numeric": torch.rand(b, n, generator=g) * 80, "numeric_present": torch.rand(b, n, generator=g) > 0.2,
            "categorical": cat, "lesion_id": [f"synthetic_{i}" for i in range(b)]}
