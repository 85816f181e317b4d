"""Lesion-level (and patient-level) cross-validation folds.

Stratified by class, grouped so that no lesion, lesion group or patient sits in two folds,
deterministic for a seed. Rare classes are spread across folds by StratifiedGroupKFold.
Unlabelled rows keep fold -1.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..tasks import TaskSpec
from .manifest import ManifestError, label_columns


def group_keys(df: pd.DataFrame) -> np.ndarray:
    """Patient id when known, else the dataset's lesion group, else the lesion id."""
    keys = df["lesion_id"].astype(str).to_numpy().copy()
    for col in ("lesion_group", "patient_id"):
        if col in df.columns:
            vals = df[col].fillna("").astype(str).to_numpy()
            keys = np.where(vals != "", col + ":" + vals, keys)
    return keys


def assign_folds(df: pd.DataFrame, task: TaskSpec | None = None, k: int = 5, seed: int = 0) -> pd.DataFrame:
    if k < 2:
        raise ManifestError("--k must be at least 2")
    df = df.copy()
    cols = task.label_columns() if task else label_columns(df)
    if not cols or any(c not in df.columns for c in cols):
        raise ManifestError("folds need a labelled manifest (label_<CLASS> columns)")
    labelled = df[cols].notna().all(axis=1).to_numpy()
    if labelled.sum() < k:
        raise ManifestError(f"only {labelled.sum()} labelled lesions: too few for {k} folds")
    y = df.loc[labelled, cols].to_numpy().argmax(axis=1)
    groups = group_keys(df)[labelled]
    # patient groups may link lesions: merge connected keys so both ids land in one fold
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1, int)
    idx = np.flatnonzero(labelled)
    for f, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        fold[idx[test]] = f
    df["fold"] = fold
    return df


def fold_table(df: pd.DataFrame, task: TaskSpec | None = None) -> pd.DataFrame:
    """Class counts per fold (rows: folds, columns: classes)."""
    cols = task.label_columns() if task else label_columns(df)
    lab = df[df["fold"] >= 0]
    counts = lab.groupby("fold")[cols].sum().astype(int)
    counts.columns = [c.removeprefix("label_") for c in counts.columns]
    return counts
