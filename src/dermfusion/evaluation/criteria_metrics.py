"""How well a multi-task model predicts the dermoscopic criteria (Derm7pt's 7-point checklist): per criterion
its balanced accuracy beside chance (1 / number of grouped labels), its macro one-vs-rest AUROC, and the
7-point score computed from the predicted labels against the score of the annotated labels.

Reads the predictions file's ``<criterion>`` (label) and ``<criterion>:<label>`` (probability) columns, and the
manifest's ``aux_<criterion>`` annotations; lesions without an annotation are left out per criterion.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from ..criteria import criteria_column, get_criteria, seven_point_score
from ..data.dataset import criteria_targets
from ..tasks import TaskSpec


def criteria_metrics(task: TaskSpec, pred: pd.DataFrame, rows: pd.DataFrame) -> dict:
    """{"available": bool, "criteria": {name: {...}}, "seven_point": {...}}; rows aligned with ``pred``."""
    if not task.criteria:
        return {"available": False, "reason": f"task {task.name} has no criteria"}
    criteria = get_criteria(task.criteria)
    have = [c for c in criteria if c.name in pred.columns and criteria_column(c) in rows.columns]
    if not have:
        return {"available": False, "reason": "the predictions or the manifest carry no criteria"}
    codes = criteria_targets(rows, task)  # N×K annotated label indices, −1 = not annotated
    out = {}
    for j, c in enumerate(criteria):
        known = codes[:, j] >= 0
        if c not in have or not known.any():
            continue
        t = np.asarray(c.labels)[codes[known, j]]
        p = pred[c.name].astype(str).to_numpy()[known]
        entry = {"n": int(known.sum()), "labels": list(c.labels), "chance": 1.0 / len(c.labels),
                 "balanced_accuracy": float(balanced_accuracy_score(t, p)),
                 "support": {label: int((t == label).sum()) for label in c.labels}}
        prob_cols = [f"{c.name}:{label}" for label in c.labels]
        if all(col in pred.columns for col in prob_cols):
            entry["auroc"] = _macro_auroc(t, pred.loc[known, prob_cols].to_numpy(float), c.labels)
        out[c.name] = entry
    result = {"available": bool(out), "criteria": out}
    complete = (codes >= 0).all(1)
    if len(have) == len(criteria) and "seven_point_score" in pred.columns and complete.any():
        true_score = np.array([seven_point_score({c.name: c.labels[k] for c, k in zip(criteria, row)}, criteria)
                               for row in codes[complete]])
        ps = pred["seven_point_score"].to_numpy(float)[complete]
        result["seven_point"] = {"n": int(complete.sum()), "mean_abs_error": float(np.abs(ps - true_score).mean()),
                                 "agreement_at_3": float(((ps >= 3) == (true_score >= 3)).mean())}
    return result


def _macro_auroc(truth: np.ndarray, probs: np.ndarray, labels) -> float | None:
    """Mean one-vs-rest AUROC over the labels that occur and do not cover every lesion (None if none does)."""
    aucs = []
    for k, label in enumerate(labels):
        y = truth == label
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, probs[:, k]))
    return float(np.mean(aucs)) if aucs else None


def criteria_section_html(result: dict) -> str:
    """The report's "7-point criteria" section ('' when the evaluation has no criteria)."""
    if not result.get("available"):
        return ""
    rows = []
    for name, e in result["criteria"].items():
        auc = "—" if e.get("auroc") is None else f"{e['auroc']:.3f}"
        flag = "" if e["balanced_accuracy"] > e["chance"] else " ⚠ not above chance"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{e['n']}</td><td>{e['balanced_accuracy']:.3f}{flag}</td>"
                    f"<td>{e['chance']:.3f}</td><td>{auc}</td></tr>")
    sp = result.get("seven_point")
    extra = (f"<p>7-point score from the predicted criteria vs from the annotated ones ({sp['n']} lesions): mean "
             f"absolute difference {sp['mean_abs_error']:.2f}; the same side of the melanoma cut-off (≥ 3) for "
             f"{100 * sp['agreement_at_3']:.1f} %.</p>") if sp else ""
    return ("<h2>Dermoscopic criteria (multi-task heads)</h2><table><tr><th>criterion</th><th>lesions</th>"
            "<th>balanced accuracy</th><th>chance</th><th>macro AUROC</th></tr>" + "".join(rows) + "</table>"
            + extra)
