"""The lesion manifest: one row per lesion, the contract between importers and everything else.

Columns
  lesion_id, dataset, patient_id (may be empty), split ("train"/"valid"/"test"/""), fold (int, -1 = none)
  image_clinical, image_dermoscopic   path or "" where the modality is missing
  age (float, NaN = unknown), sex ("male"/"female"/""), skin_tone ("0".."5"/""), site (canonical or "")
  concept_<modality>_<name>           MONET-style concept scores in [0, 1], NaN = not available
  label_<CLASS>                       one column per class of the task (absent for unlabelled data)
  aux_<name>                          optional auxiliary targets (e.g. Derm7pt criteria)
  dx_confirmation                     optional: how the label was established (HAM10000 dx_type, MILK10k
                                      diagnosis_confirm_type) — for evaluation by provenance, never a model input
  difficulty, management_label_leak   optional (Derm7pt): diagnostic difficulty low/medium/high (reported per level
                                      by `evaluate`) and the clinicians' management decision — never model inputs
  elevation                           optional (Derm7pt): flat/palpable/nodular, a metadata field a network may read
Relative image paths are resolved against the manifest file's folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DermfusionError
from ..tasks import MODALITIES, TaskSpec

IMAGE_COLUMNS = {m: f"image_{m}" for m in MODALITIES}
METADATA_COLUMNS = ("age", "sex", "skin_tone", "site")
BASE_COLUMNS = ("lesion_id", "dataset", "patient_id", "split", "fold", *IMAGE_COLUMNS.values(), *METADATA_COLUMNS)


class ManifestError(DermfusionError, ValueError):
    """A manifest that does not follow the contract; the message says what to fix."""


def concept_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("concept_")]


def label_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("label_")]


def aux_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("aux_")]


def has_labels(df: pd.DataFrame, task: TaskSpec | None = None) -> bool:
    cols = task.label_columns() if task else label_columns(df)
    return bool(cols) and all(c in df.columns for c in cols) and df[cols].notna().all(axis=None)


def train_only_mask(df: pd.DataFrame) -> pd.Series:
    """Rows added for training only (``train_only`` true, written by ``dermfusion data combine``): they train every
    fold and the full-data refit but are never validated, so out-of-fold figures stay on the main dataset."""
    if "train_only" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["train_only"].fillna(False).astype(bool)


def targets(df: pd.DataFrame, task: TaskSpec) -> np.ndarray:
    """N x C float array of labels in the task's class order."""
    missing = [c for c in task.label_columns() if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest has no labels for {', '.join(missing)}; was it imported with ground truth?")
    return df[task.label_columns()].to_numpy(dtype=np.float32)


def class_index(df: pd.DataFrame, task: TaskSpec) -> np.ndarray:
    return targets(df, task).argmax(axis=1)


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in BASE_COLUMNS})


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Fill in optional base columns and fix dtypes, so every stage can rely on them."""
    df = df.copy()
    for col in BASE_COLUMNS:
        if col not in df.columns:
            df[col] = -1 if col == "fold" else (np.nan if col == "age" else "")
    for col in ("lesion_id", "dataset", "patient_id", "split", *IMAGE_COLUMNS.values(), "sex", "skin_tone", "site"):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str).replace({"nan": "", "None": ""})
    df["age"] = pd.to_numeric(df["age"], errors="coerce").astype(float)
    df["fold"] = pd.to_numeric(df["fold"], errors="coerce").fillna(-1).astype(int)
    for col in concept_columns(df) + label_columns(df):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    ordered = list(BASE_COLUMNS) + [c for c in df.columns if c not in BASE_COLUMNS]
    return df[ordered].reset_index(drop=True)


def save_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = normalise(df)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        raise ManifestError(f"{path}: a manifest must end in .parquet or .csv")
    return path


def load_manifest(path: str | Path, resolve_paths: bool = True) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist; create one with `dermfusion import …`")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".csv":
        df = pd.read_csv(path, dtype={"lesion_id": str, "patient_id": str, "skin_tone": str}, keep_default_na=True)
    else:
        raise ManifestError(f"{path}: a manifest must end in .parquet or .csv")
    if "lesion_id" not in df.columns:
        raise ManifestError(f"{path} has no lesion_id column; is it a dermfusion manifest?")
    df = normalise(df)
    df["skin_tone"] = df["skin_tone"].str.replace(r"\.0$", "", regex=True)
    if resolve_paths:
        base = path.parent.resolve()
        for col in IMAGE_COLUMNS.values():
            df[col] = [str(base / p) if p and not Path(p).is_absolute() else p for p in df[col]]
    return df


def present_modalities(df: pd.DataFrame) -> list[str]:
    return [m for m, col in IMAGE_COLUMNS.items() if (df[col] != "").any()]
