"""Helpers shared by the importers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import DermfusionError
from ...tasks import TaskSpec
from ..features import canonical_sex, canonical_site


class ImportError_(DermfusionError, ValueError):
    """A dataset file that does not look like what the importer expects."""


def read_csv(path: str | Path, required: list[str], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise ImportError_(f"{what}: {path} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ImportError_(f"{what}: {path} lacks column(s) {', '.join(missing)} "
                           f"(it has: {', '.join(df.columns[:20])})")
    return df


def clean_age(values) -> pd.Series:
    age = pd.to_numeric(pd.Series(values), errors="coerce").astype(float)
    return age.where((age >= 0) & (age <= 120))


def clean_metadata(df: pd.DataFrame, age, sex, site, skin_tone=None) -> pd.DataFrame:
    df["age"] = clean_age(age).to_numpy()
    df["sex"] = [canonical_sex(v) for v in sex]
    df["site"] = [canonical_site(v) for v in site]
    if skin_tone is None:
        df["skin_tone"] = ""
    else:
        tones = pd.to_numeric(pd.Series(skin_tone), errors="coerce")
        df["skin_tone"] = [str(int(t)) if t == t and 0 <= t <= 5 else "" for t in tones]
    return df


def one_hot(labels: list[str | None], task: TaskSpec) -> pd.DataFrame:
    """label_<CLASS> columns; rows without a label are NaN (unlabelled)."""
    out = np.full((len(labels), task.num_classes), np.nan, np.float64)
    for i, lab in enumerate(labels):
        if lab:
            out[i] = 0.0
            out[i, task.index(lab)] = 1.0
    return pd.DataFrame(out, columns=task.label_columns())


def resolve_image(images_dir: Path | None, csv_dir: Path, rel: str) -> str:
    if not rel:
        return ""
    p = Path(rel)
    if p.is_absolute():
        return str(p)
    base = images_dir if images_dir is not None else csv_dir
    cand = base / p
    if images_dir is not None and not cand.exists() and (images_dir / p.name).exists():
        cand = images_dir / p.name  # CSV says images/x.jpg, --images already points into images/
    return str(cand.resolve())
