"""PAD-UFES-20: smartphone clinical photos of six diagnoses, one `metadata.csv` row per image.

Input: the dataset's `metadata.csv` (columns patient_id, lesion_id, smoke, drink, background_father,
background_mother, age, pesticide, gender, skin_cancer_history, cancer_history, has_piped_water,
has_sewage_system, fitspatrick, region, diameter_1, diameter_2, diagnostic, itch, grew, hurt, changed, bleed,
elevation, img_id, biopsed). Required: patient_id, lesion_id, img_id, diagnostic; any other column that is
absent is imported as missing.

One manifest row per image (some lesions have two or more photos), as for ISIC:
  lesion_id          the image id without extension (PAT_46_881_939) — unique per row
  image_id           the same; lesion_group: the dataset's lesion_id; patient_id: the dataset's patient_id
                     (`dermfusion folds` groups by patient, so no patient's images sit in two folds)
  image_clinical     `<--images>/<img_id>` (default: next to the CSV); `data check` reports missing files
  age, sex           age (0–120), gender FEMALE / MALE
  skin_tone          Fitzpatrick type minus one: `fitspatrick` 1..6 → "0".."5" (the manifest's 0–5 scale)
  site               `region` mapped by REGION_SITES onto the canonical sites (NOSE, LIP, EAR … → head_neck_face;
                     ARM, FOREARM → upper_extremity; THIGH → lower_extremity; CHEST, BACK, ABDOMEN → trunk)
  label_<CLASS>      one-hot over ACK, BCC, MEL, NEV, SCC, SEK (task pad_ufes_20); another diagnosis is an error
  diagnosis_fine     the dataset's diagnostic code
  dx_confirmation    biopsed True → "histo", False → "consensus" (the dataset's non-biopsied lesions were
                     diagnosed by a consensus of dermatologists); evaluation by provenance, never a model input
  pad_<field>        the remaining clinical fields, kept for analysis (no model reads them yet):
                     booleans (smoke, drink, pesticide, skin_cancer_history, cancer_history, has_piped_water,
                     has_sewage_system, itch, grew, hurt, changed, bleed, elevation) as 1.0 / 0.0 / NaN;
                     diameters (diameter_1, diameter_2, mm; ≤ 0 → missing) as floats; background_father,
                     background_mother and region (verbatim) as text ("" when unknown)
Unknown values ("UNK", "", "nan", …) become missing everywhere. The dataset has no official split: `split`
is "train" and `fold` -1 until `--k` or `dermfusion folds` assigns folds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...tasks import PAD_UFES_20
from ..features import MISSING_TOKENS, canonical_site
from ..manifest import normalise
from .common import ImportError_, clean_metadata, one_hot, read_csv, resolve_image

REQUIRED = ("patient_id", "lesion_id", "img_id", "diagnostic")
BOOLEAN_FIELDS = ("smoke", "drink", "pesticide", "skin_cancer_history", "cancer_history", "has_piped_water",
                  "has_sewage_system", "itch", "grew", "hurt", "changed", "bleed", "elevation")
NUMERIC_FIELDS = ("diameter_1", "diameter_2")
TEXT_FIELDS = ("background_father", "background_mother", "region")
EXTRA_PREFIX = "pad_"
REGION_SITES = {
    "face": "head_neck_face", "nose": "head_neck_face", "lip": "head_neck_face", "ear": "head_neck_face",
    "scalp": "head_neck_face", "neck": "head_neck_face",
    "chest": "trunk", "back": "trunk", "abdomen": "trunk",
    "arm": "upper_extremity", "forearm": "upper_extremity", "hand": "hand",
    "thigh": "lower_extremity", "foot": "foot",
}
TRUE_TOKENS = {"true", "1", "1.0", "yes"}
FALSE_TOKENS = {"false", "0", "0.0", "no"}


def _missing(value) -> bool:
    return str(value).strip().lower() in MISSING_TOKENS | {"unk"}


def _text(values) -> list[str]:
    return ["" if _missing(v) else str(v).strip() for v in values]


def _boolean(values) -> np.ndarray:
    def one(v) -> float:
        v = str(v).strip().lower()
        return 1.0 if v in TRUE_TOKENS else 0.0 if v in FALSE_TOKENS else np.nan
    return np.array([one(v) for v in values], np.float64)


def region_site(value) -> str:
    """PAD-UFES-20 `region` (e.g. NOSE) → canonical site; "" when unknown or unmapped."""
    if _missing(value):
        return ""
    v = str(value).strip().lower()
    return REGION_SITES.get(v) or canonical_site(v)


def _confirmation(value) -> str:
    v = str(value).strip().lower()
    return "histo" if v in TRUE_TOKENS else "consensus" if v in FALSE_TOKENS else ""


def _column(src: pd.DataFrame, name: str) -> pd.Series:
    return src[name] if name in src.columns else pd.Series([""] * len(src), index=src.index)


def import_pad_ufes(metadata_csv, images_dir=None, dataset: str = "pad_ufes_20") -> pd.DataFrame:
    src = read_csv(metadata_csv, list(REQUIRED), "PAD-UFES-20 metadata")
    empty_ids = src["img_id"].str.strip() == ""
    if empty_ids.any():
        raise ImportError_(f"{metadata_csv}: {int(empty_ids.sum())} row(s) have no img_id "
                           f"(first at data row {int(np.flatnonzero(empty_ids)[0]) + 1})")
    labels = []
    for i, value in enumerate(src["diagnostic"]):
        cls = value.strip().upper()
        if cls not in PAD_UFES_20.classes:
            raise ImportError_(f"{metadata_csv}: unknown diagnostic {value!r} for {src['img_id'].iloc[i]} "
                               f"(expected one of {', '.join(PAD_UFES_20.classes)})")
        labels.append(cls)
    csv_dir = Path(metadata_csv).resolve().parent
    images_dir = Path(images_dir).resolve() if images_dir else None
    image_ids = [Path(v.strip()).stem for v in src["img_id"]]
    dup = pd.Series(image_ids).duplicated()
    if dup.any():
        raise ImportError_(f"{metadata_csv}: img_id repeated: {', '.join(pd.Series(image_ids)[dup].head(5))}")

    df = pd.DataFrame({
        "lesion_id": image_ids,
        "dataset": dataset,
        "patient_id": _text(src["patient_id"]),
        "split": "train",
        "fold": -1,
        "image_clinical": [resolve_image(images_dir, csv_dir, v.strip()) for v in src["img_id"]],
        "image_dermoscopic": "",
        "image_id": image_ids,
        "lesion_group": _text(src["lesion_id"]),
        "diagnosis_fine": labels,
        "dx_confirmation": [_confirmation(v) for v in _column(src, "biopsed")],
    })
    df = clean_metadata(df, _column(src, "age"), _column(src, "gender"), [""] * len(src))
    df["site"] = [region_site(v) for v in _column(src, "region")]
    tones = pd.to_numeric(_column(src, "fitspatrick"), errors="coerce").to_numpy(float)
    df["skin_tone"] = [str(int(t) - 1) if t == t and t == int(t) and 1 <= t <= 6 else "" for t in tones]
    for name in BOOLEAN_FIELDS:
        df[EXTRA_PREFIX + name] = _boolean(_column(src, name))
    for name in NUMERIC_FIELDS:
        vals = pd.to_numeric(_column(src, name), errors="coerce").to_numpy(float)
        df[EXTRA_PREFIX + name] = np.where(vals > 0, vals, np.nan)
    for name in TEXT_FIELDS:
        df[EXTRA_PREFIX + name] = _text(_column(src, name))
    df = pd.concat([df, one_hot(labels, PAD_UFES_20)], axis=1)
    df.attrs["task"] = PAD_UFES_20.name
    return normalise(df)
