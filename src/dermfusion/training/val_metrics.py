"""The metrics the training loop logs each epoch (and early-stops on)."""
from __future__ import annotations

import numpy as np

from ..evaluation.metrics import balanced_accuracy, macro_f1, official_score
from ..tasks import TaskSpec


def epoch_metrics(task: TaskSpec, y_true: np.ndarray, y_prob: np.ndarray) -> dict:
    return {"official": official_score(task, y_true, y_prob), "balanced_accuracy": balanced_accuracy(y_true, y_prob),
            "macro_f1": macro_f1(y_true, y_prob)}
