"""A network's image embeddings (the ``features`` of its output), for the covariate-shift check
(``evaluation.shift``), which receives them as a function: ``ShiftConfig(embed=bundle_embedder(bundle))``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..console import make_progress
from ..data.manifest import IMAGE_COLUMNS, METADATA_COLUMNS, concept_columns
from ..evaluation.shift import ShiftError
from ..runtime.device import move_batch
from .load import load_run


def _network_of(bundle):
    """The first network of a bundle or run (a fold ensemble's embedding spaces are not comparable)."""
    pred = load_run(bundle) if isinstance(bundle, (str, Path)) else bundle
    return pred.members[0] if hasattr(pred, "members") else pred


def bundle_embedder(bundle: str | Path) -> Callable[[pd.DataFrame, str, str], np.ndarray]:
    """``embed(rows, modality, description)`` for ``ShiftConfig``: the bundle is loaded once, on first use."""
    loaded: dict = {}

    def embed(rows: pd.DataFrame, modality: str, description: str = "embedding images") -> np.ndarray:
        if "net" not in loaded:
            loaded["net"] = _network_of(bundle)
        return embedding_features(loaded["net"], rows, modality, description, label=str(bundle))

    return embed


def embedding_features(bundle, rows: pd.DataFrame, modality: str, description: str = "embedding images",
                       label: str | None = None) -> np.ndarray:
    """N×D `features` of a network bundle (path, run or loaded predictor) for `rows`, seeing only the `modality` image.

    Other images, metadata and concept scores are masked (as missing), so the embedding differs between the
    sets only through the images — a metadata field one set lacks must not pass for an image shift. The
    images go through the bundle's own preprocessing (what the model sees). A fold-ensemble bundle uses its
    first member: the folds' embedding spaces are not comparable to each other."""
    net = _network_of(bundle)
    name = label or bundle
    if not (hasattr(net, "model") and hasattr(net, "loader")):
        raise ShiftError(f"{name}: a {net.bundle.kind!r} bundle has no image embeddings; pass a network bundle "
                         "(one trained on images) or leave out --bundle")
    if modality not in net.spec.modalities:
        raise ShiftError(f"{name}: the model does not read {modality} images (it reads "
                         f"{', '.join(net.spec.modalities) or 'none'}); choose --modality accordingly")
    frame = rows.copy()
    for m, col in IMAGE_COLUMNS.items():
        if m != modality:
            frame[col] = ""
    for col in METADATA_COLUMNS:
        frame[col] = np.nan if col == "age" else ""
    for col in concept_columns(frame):
        frame[col] = np.nan
    out = []
    with torch.no_grad(), make_progress() as prog:
        task = prog.add_task(description, total=len(frame), info="")
        for batch in net.loader(frame):
            feats = net.model(move_batch(batch, net.device)).get("features")
            if feats is None:
                raise ShiftError(f"{name}: the model's output has no 'features'; it cannot be used for embeddings")
            out.append(feats.float().reshape(len(feats), -1).cpu().numpy())
            prog.advance(task, len(feats))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

