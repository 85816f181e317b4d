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


def criteria_report(criteria, criteria_set: str, probs: dict, k: int) -> dict:
    """Lesion ``k``'s criteria as the API answers them: per criterion its likeliest label and probabilities, the
    7-point score of those labels."""
    items, labels = [], {}
    for c in criteria:
        p = probs[c.name][k]
        labels[c.name] = c.labels[int(p.argmax())]
        items.append({"criterion": c.name, "label": labels[c.name],
                      "probabilities": {label: float(v) for label, v in zip(c.labels, p)}})
    return {"set": criteria_set, "items": items, "seven_point_score": seven_point_score(labels, criteria)}


def report_probabilities(criteria, report: dict) -> np.ndarray:
    """A ``criteria_report``'s label probabilities as one flat row (ΣL): criterion after criterion in ``criteria``'s
    order, each one's labels in their order — read by name, so the report's own ordering does not matter. The layout
    ``split_probabilities`` takes apart."""
    given = {item["criterion"]: item["probabilities"] for item in report["items"]}
    return np.array([given[c.name][label] for c in criteria for label in c.labels], dtype=np.float64)


def split_probabilities(criteria, flat: np.ndarray) -> dict[str, np.ndarray]:
    """N×ΣL rows of ``report_probabilities`` back into {criterion: N×L}."""
    cuts = np.cumsum([len(c.labels) for c in criteria])[:-1]
    return {c.name: part for c, part in zip(criteria, np.split(np.asarray(flat), cuts, axis=1))}


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
