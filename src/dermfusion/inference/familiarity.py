"""The "cannot assess" gate's familiarity reference for a network bundle: its encoder's layer statistics
(``models.layer_stats``) over real lesions, fitted (``evaluation.embedding_reference``) and written into the
bundle, re-sealing its hash. Called at the end of ``dermfusion train`` and by ``dermfusion bundle reference``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..bundle import update_file
from ..console import make_progress
from ..data.manifest import IMAGE_COLUMNS
from ..evaluation.embedding_reference import MAX_ROWS, MIN_ROWS, fit_reference, write_reference
from ..evaluation.shift import ShiftError
from ..models.layer_stats import LayerStats
from ..runtime.device import move_batch
from .embeddings import _network_of
def familiarity_modality(net) -> str | None:
    """The image modality whose encoder the familiarity check watches: the dermoscopic one when the model has
    its own encoder for it, else the first that has one; None when no encoder has known layers."""
    mods = list(net.spec.modalities)
    for m in sorted(mods, key=lambda m: m != "dermoscopic"):
        if LayerStats(net.model, m).available:
            return m
    return None


def layer_statistics(net, rows: pd.DataFrame, modality: str, description: str = "layer statistics"):
    """(N×S layer statistics, layer widths, layer names) of ``rows``' ``modality`` images, seen through the
    bundle's own preprocessing, fp32 eager (the reference the service compares with)."""
    probe = LayerStats(net.model, modality)
    if not probe.available:
        raise ShiftError(f"{net.bundle.name}: no layers to watch in its {modality} encoder")
    frame = rows.copy()
    for m, col in IMAGE_COLUMNS.items():
        if m != modality:
            frame[col] = ""
    out, dims = [], []
    with torch.no_grad(), make_progress() as prog:
        task = prog.add_task(description, total=len(frame), info="")
        for batch in net.loader(frame):
            with probe:
                net.model(move_batch(batch, net.device))
            out.append(probe.take().cpu().numpy())
            dims = probe.dims()
            prog.advance(task, len(out[-1]))
    return np.concatenate(out), dims, probe.layer_names


def write_familiarity_reference(bundle_dir, rows: pd.DataFrame, source: str, net=None) -> dict | None:
    """Fit the gate's familiarity reference (``evaluation.embedding_reference``) on ``rows`` (at most
    ``MAX_ROWS`` of them, a seeded sample) and write it into the bundle, re-sealing its hash. None (nothing
    written) when the model has no encoder with known layers or too few readable lesions."""
    net = _network_of(bundle_dir) if net is None else net
    modality = familiarity_modality(net)
    col = IMAGE_COLUMNS.get(modality or "")
    if modality is None or col not in rows.columns:
        return None
    rows = rows[rows[col].fillna("").astype(str) != ""]
    if len(rows) < MIN_ROWS:
        return None
    if len(rows) > MAX_ROWS:
        rows = rows.sample(n=MAX_ROWS, random_state=0)
    stats, dims, names = layer_statistics(net, rows, modality, "familiarity reference")
    ref = fit_reference(stats, dims, layer_names=names, source=f"{source}; {modality} images")
    ref["modality"] = modality
    update_file(bundle_dir, "embedding_reference.npz", lambda path: write_reference(path.parent, ref))
    return ref
