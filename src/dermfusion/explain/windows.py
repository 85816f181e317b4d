"""Maps of encoders that read an image as a grid of windows.

An encoder that reads each image as gh×gw windows (``model.encoder_windows[modality] == (gh, gw)``, e.g.
remixformer's dermoscopy branch, whose window encoder sees B·gh·gw windows of B images) yields one map per window.
:func:`tile_windows` puts them back together, one map per image, each window's map scaled by the weight the model
gave that window (``attention["windows"][modality]``, B×gh·gw) when it reports one — without it every window
would look equally important.
"""
from __future__ import annotations

import torch
from torch import nn


def tile_windows(model: nn.Module, modality: str, grid: torch.Tensor, b: int, attention: dict | None) -> torch.Tensor:
    """(B·gh·gw)×h×w window maps → B×(gh·h)×(gw·w); any other ``grid`` is returned as it is."""
    windows = (getattr(model, "encoder_windows", None) or {}).get(modality)
    if not windows or grid.shape[0] != b * windows[0] * windows[1]:
        return grid
    (gh, gw), (h, w) = windows, grid.shape[-2:]
    weights = ((attention or {}).get("windows") or {}).get(modality)
    if weights is not None:
        grid = grid * weights.detach().reshape(-1, 1, 1).to(grid.dtype)
    return grid.reshape(b, gh, gw, h, w).permute(0, 1, 3, 2, 4).reshape(b, gh * h, gw * w)
