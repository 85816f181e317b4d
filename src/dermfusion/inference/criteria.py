"""Dermoscopic criteria predicted beside the diagnosis by a multi-task network (``model.criteria``): each
criterion's grouped-label probabilities, its predicted label and the 7-point score computed from those labels.

The criteria heads run in an eager float32 pass of their own (the fast backends — ONNX Runtime, int8 — export
only the diagnosis), averaged over the same test-time views and over the ensemble's networks with their
weights. Each head's probabilities are divided by the label prior it trained under (``divide_label_prior``), so
the predicted label is chosen for balanced accuracy; they are not otherwise calibrated.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..console import track
from ..criteria import seven_point_score
from .predict_loop import predict_heads


def criteria_networks(pred) -> list[tuple[float, object]]:
    """``[(weight, network predictor)]`` of the members that predict criteria (empty: none does)."""
    return [(w, leaf) for w, leaf in (pred.mixture() or [])
            if getattr(getattr(leaf, "model", None), "criteria_heads", None) is not None]


def predict_criteria(pred, df: pd.DataFrame, *, tta: int = 0, progress: bool = False):
    """``(criteria, {criterion: N×L probabilities})`` averaged over the criteria-predicting networks, or None."""
    nets = criteria_networks(pred)
    if not nets:
        return None
    criteria = nets[0][1].model.criteria_heads.criteria
    total, acc = sum(w for w, _ in nets), {}
    for w, net in nets:
        if net.model.criteria_heads.criteria != criteria:
            raise ValueError("the ensemble's networks predict different criteria sets")
        probs = predict_heads(net.model, net.loader(df), net.device, tta=tta, modalities=net.spec.modalities,
                              progress=track if progress else None, heads=lambda out: out["criteria"])
        probs = divide_label_prior(probs, net.bundle.config.get("criteria_prior"))
        for name, p in probs.items():
            acc[name] = acc.get(name, 0) + (w / total) * p
    return criteria, acc


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
