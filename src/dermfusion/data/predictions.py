"""Predictions files: `<id>,<class…>` probabilities in the task's class order.

The id column is headed as the task's official submission is (``TaskSpec.id_column``): `lesion_id` for
MILK10k (and the tasks without an official format), `image` for the single-image ISIC 2018 / 2019
challenges and Derm7pt. It holds the ids the dataset keys its cases by: the manifest's `lesion_id` (for an
ISIC test set, the image id), or — for a task whose dataset keys cases by another column
(``TaskSpec.id_source``; Derm7pt: meta.csv's `image` path, kept as `source_image`) — that column's values, when
the writer is given the manifest rows. Without them such a file is headed `lesion_id`.
Readers accept both headers and hand back a frame whose id column is named `lesion_id`;
``to_manifest_ids`` maps dataset ids back to the manifest's lesion ids.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DermfusionError
from ..tasks import TaskSpec

ID_COLUMNS = ("lesion_id", "image")


class PredictionsError(DermfusionError, ValueError):
    """Predictions that cannot be written or keyed as asked."""


def prediction_ids(manifest: pd.DataFrame, task: TaskSpec) -> tuple[str, list[str]]:
    """(header, ids) of a predictions file for these manifest rows: the dataset's own ids under the task's
    ``id_column`` where the task names an ``id_source`` column and every row has a value there, else the lesion
    ids (headed ``id_column``, or ``lesion_id`` when the task's official ids are another column's)."""
    lesion_ids = manifest["lesion_id"].astype(str).tolist()
    src = task.id_source
    if not src:
        return task.id_column, lesion_ids
    vals = manifest[src].fillna("").astype(str).str.strip() if src in manifest.columns else None
    if vals is None or (vals == "").any():
        return "lesion_id", lesion_ids
    dup = vals[vals.duplicated()].unique()
    if len(dup):
        raise PredictionsError(f"{src} repeats {', '.join(dup[:3])}: a predictions file needs one row per id")
    return task.id_column, vals.tolist()


def write_predictions(path: str | Path, lesion_ids, probs: np.ndarray, task: TaskSpec,
                      extra: pd.DataFrame | None = None, manifest: pd.DataFrame | None = None) -> Path:
    """``extra``: further columns after the classes (a multi-task model's criteria), row-aligned. ``manifest``: the
    predicted manifest rows (row-aligned with ``lesion_ids``), so that rows are keyed as the dataset keys them
    (``prediction_ids``; Derm7pt: meta.csv's image path under `image`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(task.classes))
    lesion_ids = [str(i) for i in lesion_ids]
    if manifest is not None:
        if manifest["lesion_id"].astype(str).tolist() != lesion_ids:
            raise PredictionsError("the manifest rows given to write_predictions are not the predicted lesions, "
                                   "in order")
        header, ids = prediction_ids(manifest, task)
    else:
        header, ids = ("lesion_id" if task.id_source else task.id_column), lesion_ids
    df.insert(0, header, ids)
    if extra is not None:
        df = pd.concat([df, extra.reset_index(drop=True)], axis=1)
    df.to_csv(path, index=False, float_format="%.6f")
    return path


def _image_key(values) -> pd.Series:
    """Image ids as the official scorer compares them: strings without a trailing `.jpg`."""
    return pd.Series(values, dtype=object).astype(str).str.replace(r"\.jpg$", "", case=False, regex=True)


def to_manifest_ids(pred: pd.DataFrame, manifest: pd.DataFrame, task: TaskSpec) -> pd.DataFrame:
    """``pred`` (read by ``read_predictions_csv``) with the dataset's own ids replaced by the manifest's lesion
    ids, where they name a row's ``task.id_source`` (Derm7pt: `images/Nel035.jpg` → `D7P_…`); ids that already
    are lesion ids, or name no row, are left as they are."""
    src = task.id_source
    if not src or src not in manifest.columns or "lesion_id" not in pred.columns:
        return pred
    known = set(manifest["lesion_id"].astype(str))
    lookup = dict(zip(_image_key(manifest[src].fillna("")), manifest["lesion_id"].astype(str)))
    lookup.pop("", None)
    ids = pred["lesion_id"].astype(str)
    mapped = [i if i in known else lookup.get(k, i) for i, k in zip(ids, _image_key(ids))]
    return pred.assign(lesion_id=mapped)


def with_lesion_id(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its id column named `lesion_id`: a frame headed `image` (the ISIC single-image
    format) has that column renamed, with a trailing `.jpg` dropped as the official scorer does. A frame
    with a `lesion_id` column, or with neither, is returned unchanged."""
    if "lesion_id" in df.columns or "image" not in df.columns:
        return df
    df = df.rename(columns={"image": "lesion_id"})
    df["lesion_id"] = _image_key(df["lesion_id"]).to_numpy()
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
