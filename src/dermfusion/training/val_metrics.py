"""The few metrics the training loop needs each epoch (early stopping, the epoch log).

Deliberately tiny and dependency-free so a long run never depends on the reporting stack;
`evaluation.metrics` has the full set (with CIs) and tests check that both agree.
"""
from __future__ import annotations

import numpy as np

from ..tasks import TaskSpec


def milk10k_dice(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    t, p = y_true > 0.5, y_prob > 0.5
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
    denom = 2 * tp + fp + fn
    return float(np.where(denom == 0, 1.0, 2 * tp / np.maximum(denom, 1)).mean())


def balanced_accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    t, p = y_true.argmax(1), y_prob.argmax(1)
    recalls = [(p[t == c] == c).mean() for c in np.unique(t)]
    return float(np.mean(recalls))


def macro_f1(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    t, p = y_true.argmax(1), y_prob.argmax(1)
    f1 = []
    for c in range(y_true.shape[1]):
        tp, fp, fn = ((p == c) & (t == c)).sum(), ((p == c) & (t != c)).sum(), ((p != c) & (t == c)).sum()
        f1.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def epoch_metrics(task: TaskSpec, y_true: np.ndarray, y_prob: np.ndarray) -> dict:
    official = milk10k_dice(y_true, y_prob) if task.metric == "milk10k_dice" else balanced_accuracy(y_true, y_prob)
    return {"official": official, "balanced_accuracy": balanced_accuracy(y_true, y_prob),
            "macro_f1": macro_f1(y_true, y_prob)}
