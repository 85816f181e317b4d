"""Predictions files: `lesion_id,<class…>` probabilities in the task's class order (MILK10k format)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..tasks import TaskSpec


def write_predictions(path: str | Path, lesion_ids, probs: np.ndarray, task: TaskSpec) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(task.classes))
    df.insert(0, "lesion_id", list(lesion_ids))
    df.to_csv(path, index=False, float_format="%.6f")
    return path


def read_predictions(path: str | Path, task: TaskSpec) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"lesion_id": str})
    missing = [c for c in ("lesion_id", *task.classes) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} for task {task.name}")
    return df
