"""Derm7pt: diagnosis mapped to the usual five groups (BCC, NEV, MEL, SK, MISC) plus the fine label;
the 7-point checklist criteria kept as auxiliary targets (`aux_<criterion>`, grouped as in the Derm7pt paper:
see ``dermfusion.criteria``; the published value in `aux_<criterion>_raw`); the official split kept. The
folds follow the official split — fold 0 = `valid`, fold 1 = `train`, test cases −1 — so `--folds 0` trains
on the training split and validates on the validation split, and `--folds full` trains on both.

Kept from meta.csv besides: `sex` and `location` (→ `site`) as metadata; `elevation` (flat / palpable / nodular),
a metadata field a network may read (``data.metadata_fields``); `level_of_diagnostic_difficulty` as `difficulty`
(low / medium / high: the atypical-lesion proxy `dermfusion evaluate` reports separately, never an input); and
`management` as `management_label_leak` — the clinicians' decision (excision, clinical follow up, no further
examination), taken *because of* the suspected diagnosis: for analysis only, and refused as a model input."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...criteria import SEVEN_POINT
from ...tasks import DERM7PT
from ..features import canonical_elevation
from ..manifest import normalise
from .common import ImportError_, clean_metadata, one_hot, read_csv, resolve_image

OFFICIAL_FOLDS = {"valid": 0, "train": 1}
DIFFICULTIES = ("low", "medium", "high")


def _column(src: pd.DataFrame, name: str) -> list[str]:
    """A text column of meta.csv, lower-cased and stripped ("" where absent or empty)."""
    if name not in src.columns:
        return [""] * len(src)
    return src[name].fillna("").astype(str).str.strip().str.lower().replace({"nan": ""}).tolist()


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


def import_derm7pt(meta_csv, images_dir=None, dataset: str = "derm7pt", splits=None) -> pd.DataFrame:
    """The manifest of Derm7pt's ``meta.csv`` (``splits``: keep only these official splits, e.g. train, valid)."""
    src = read_csv(meta_csv, ["case_num", "diagnosis", "split"], "Derm7pt meta")
    if splits:
        keep = {s.strip().lower() for s in splits}
        unknown = keep - {"train", "valid", "test"}
        if unknown:
            raise ImportError_(f"unknown Derm7pt split(s) {sorted(unknown)}: use train, valid, test")
        src = src[src["split"].str.strip().str.lower().isin(keep)].reset_index(drop=True)
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
        "fold": [OFFICIAL_FOLDS.get(str(v).strip().lower(), -1) for v in src["split"]],
        "image_clinical": [resolve_image(images_dir, csv_dir, r) for r in src["clinic"]] if "clinic" in src else "",
        "image_dermoscopic": [resolve_image(images_dir, csv_dir, r) for r in src[img_col]],
        "diagnosis_fine": src["diagnosis"].str.strip(),
        "source_image": src[img_col].astype(str).str.strip(),  # as in meta.csv: the id a submission is keyed by
    })
    df = clean_metadata(df, [""] * len(src), src.get("sex", [""] * len(src)), src.get("location", [""] * len(src)))
    df["elevation"] = [canonical_elevation(v) for v in _column(src, "elevation")]
    df["difficulty"] = [v if v in DIFFICULTIES else "" for v in _column(src, "level_of_diagnostic_difficulty")]
    df["management_label_leak"] = _column(src, "management")
    for c in SEVEN_POINT:
        if c.name in src.columns:
            df[f"aux_{c.name}"] = [c.group(v) for v in src[c.name]]
            df[f"aux_{c.name}_raw"] = src[c.name].fillna("").astype(str).str.strip()
    df = pd.concat([df, one_hot(labels, DERM7PT)], axis=1)
    return normalise(df)
