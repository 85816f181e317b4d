"""Predictions files: `<id>,<class…>` probabilities in the task's class order.

The id column is headed as the task's official submission is (``TaskSpec.id_column``): `lesion_id` for
MILK10k (and the tasks without an official format), `image` for the single-image ISIC 2018 / 2019
challenges. Either way it holds the manifest's `lesion_id` (for an ISIC test set, the image id).
Readers accept both headers and hand back a frame whose id column is named `lesion_id`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..tasks import TaskSpec

ID_COLUMNS = ("lesion_id", "image")


def write_predictions(path: str | Path, lesion_ids, probs: np.ndarray, task: TaskSpec,
                      extra: pd.DataFrame | None = None) -> Path:
    """``extra``: further columns after the classes (a multi-task model's criteria), row-aligned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(task.classes))
    df.insert(0, task.id_column, list(lesion_ids))
    if extra is not None:
        df = pd.concat([df, extra.reset_index(drop=True)], axis=1)
    df.to_csv(path, index=False, float_format="%.6f")
    return path


def with_lesion_id(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its id column named `lesion_id`: a frame headed `image` (the ISIC single-image
    format) has that column renamed, with a trailing `.jpg` dropped as the official scorer does. A frame
    with a `lesion_id` column, or with neither, is returned unchanged."""
    if "lesion_id" in df.columns or "image" not in df.columns:
        return df
    df = df.rename(columns={"image": "lesion_id"})
    df["lesion_id"] = df["lesion_id"].astype(str).str.replace(r"\.jpg$", "", case=False, regex=True)
    return df


def read_predictions_csv(path: str | Path) -> pd.DataFrame:
    """A predictions CSV headed `lesion_id` or `image`, ids as strings, id column named `lesion_id`."""
    return with_lesion_id(pd.read_csv(path, dtype={c: str for c in ID_COLUMNS}))


def read_predictions(path: str | Path, task: TaskSpec) -> pd.DataFrame:
    df = read_predictions_csv(path)
    missing = [c for c in ("lesion_id", *task.classes) if c not in df.columns]
    if missing:
        missing = ["lesion_id (or image)" if c == "lesion_id" else c for c in missing]
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} for task {task.name}")
    return df
