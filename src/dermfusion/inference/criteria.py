"""Dermoscopic criteria predicted beside the diagnosis by a multi-task network (``model.criteria``): each
criterion's grouped-label probabilities, its predicted label and the 7-point score computed from those labels.

The criteria heads run in the same forward passes as the diagnosis (``clinical.model_pass``: the ONNX graph carries
them as a further output), averaged over the same test-time views and over the networks that predict criteria, with
their weights. Each network's probabilities are divided by the label prior its heads trained under
(``divide_label_prior``), so the predicted label is chosen for balanced accuracy; they are not otherwise calibrated.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..criteria import seven_point_score


def criteria_probabilities(logits: dict) -> dict[str, np.ndarray]:
    """Each criterion head's logits (tensors or arrays, N×L) as float64 probabilities."""
    return {k: torch.softmax(torch.as_tensor(z).float(), -1).cpu().numpy().astype(np.float64)
            for k, z in logits.items()}


def divide_label_prior(probs: dict[str, np.ndarray], prior: dict | None) -> dict[str, np.ndarray]:
    """Each criterion's probabilities divided by the label prior its head trained under (the bundle's
    ``criteria_prior``) and renormalised: labels chosen for balanced accuracy, as the diagnosis' training-prior
    division does — without it a head calls a rare label (irregular vessels, regression) almost never. Bundles
    without a prior are left as they are."""
    if not prior:
        return probs
    out = {}
    for name, p in probs.items():
        q = p / np.asarray(prior[name], float)[None, :] if name in prior else p
        out[name] = q / q.sum(1, keepdims=True)
    return out


def criteria_frame(criteria, probs: dict[str, np.ndarray], with_probabilities: bool = True) -> pd.DataFrame:
    """One column per criterion with its predicted grouped label, the 7-point score, and (optionally) the
    probabilities as ``<criterion>:<label>`` columns."""
    cols = {}
    for c in criteria:
        cols[c.name] = [c.labels[k] for k in probs[c.name].argmax(1)]
    n = len(next(iter(cols.values()))) if cols else 0
    cols["seven_point_score"] = [seven_point_score({c.name: cols[c.name][i] for c in criteria}, criteria)
                                 for i in range(n)]
    if with_probabilities:
        for c in criteria:
            for k, label in enumerate(c.labels):
                cols[f"{c.name}:{label}"] = probs[c.name][:, k]
    return pd.DataFrame(cols)
