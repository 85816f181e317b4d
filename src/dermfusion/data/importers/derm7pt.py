"""Derm7pt: diagnosis mapped to the usual five groups (BCC, NEV, MEL, SK, MISC) plus the fine label;
the 7-point checklist criteria kept as auxiliary targets (`aux_<criterion>`); the official split kept."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...tasks import DERM7PT
from ..manifest import normalise
from .common import ImportError_, clean_metadata, one_hot, read_csv, resolve_image

CRITERIA = ("pigment_network", "streaks", "pigmentation", "regression_structures", "dots_and_globules",
            "blue_whitish_veil", "vascular_structures")


def five_group(diagnosis: str) -> str:
    d = diagnosis.strip().lower()
    if not d:
        return ""
    if d.startswith("basal cell carcinoma"):
        return "BCC"
    if d.startswith("melanoma"):
        return "MEL"
    if "nevus" in d:
        return "NEV"
    if d.startswith("seborrheic keratosis"):
        return "SK"
    return "MISC"


def import_derm7pt(meta_csv, images_dir=None, dataset: str = "derm7pt") -> pd.DataFrame:
    src = read_csv(meta_csv, ["case_num", "diagnosis", "split"], "Derm7pt meta")
    img_col = "image" if "image" in src.columns else "derm" if "derm" in src.columns else None
    if img_col is None:
        raise ImportError_(f"{meta_csv}: needs the dermoscopic image column ('image' or 'derm')")
    csv_dir = Path(meta_csv).resolve().parent
    images_dir = Path(images_dir).resolve() if images_dir else None
    labels = [five_group(d) for d in src["diagnosis"]]
    df = pd.DataFrame({
        "lesion_id": [f"D7P_{int(c):04d}" if str(c).isdigit() else str(c) for c in src["case_num"]],
        "dataset": dataset,
        "patient_id": "",
        "split": src["split"].str.strip().str.lower(),
        "fold": -1,
        "image_clinical": [resolve_image(images_dir, csv_dir, r) for r in src["clinic"]] if "clinic" in src else "",
        "image_dermoscopic": [resolve_image(images_dir, csv_dir, r) for r in src[img_col]],
        "diagnosis_fine": src["diagnosis"].str.strip(),
    })
    df = clean_metadata(df, [""] * len(src), src.get("sex", [""] * len(src)), src.get("location", [""] * len(src)))
    for c in CRITERIA:
        if c in src.columns:
            df[f"aux_{c}"] = src[c].str.strip()
    df = pd.concat([df, one_hot(labels, DERM7PT)], axis=1)
    return normalise(df)
