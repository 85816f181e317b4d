"""MILK10k: two rows per lesion (clinical close-up + dermoscopic) -> one manifest row per lesion.

Image columns: with `images_dir`, they point to where the official download keeps each image
(`<dir>/<lesion_id>/<isic_id>.jpg`, or `<dir>/<isic_id>.jpg` if that exists) whether or not the file
is there — `data check` reports missing files. Without `images_dir` they are empty, and the
ISIC ids stay in `isic_id_clinical` / `isic_id_dermoscopic`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...tasks import MILK10K
from ..manifest import normalise
from .common import ImportError_, clean_metadata, read_csv

IMAGE_TYPES = {"clinical: close-up": "clinical", "clinical": "clinical", "dermoscopic": "dermoscopic"}
CONCEPT_PREFIX = "MONET_"


def _concept_name(col: str) -> str:
    return col[len(CONCEPT_PREFIX):].lower()


def _image_path(images_dir: Path, lesion_id: str, isic_id: str) -> str:
    nested = images_dir / lesion_id / f"{isic_id}.jpg"
    flat = images_dir / f"{isic_id}.jpg"
    return str((flat if flat.exists() and not nested.exists() else nested).resolve())


def import_milk10k(metadata_csv, groundtruth_csv=None, supplement_csv=None, images_dir=None,
                   dataset: str = "milk10k") -> pd.DataFrame:
    meta = read_csv(metadata_csv, ["lesion_id", "image_type", "isic_id"], "MILK10k metadata")
    concepts = [c for c in meta.columns if c.startswith(CONCEPT_PREFIX)]
    unknown = sorted(set(meta["image_type"]) - set(IMAGE_TYPES))
    if unknown:
        raise ImportError_(f"{metadata_csv}: unknown image_type value(s) {unknown}; expected {sorted(IMAGE_TYPES)}")
    meta["modality"] = meta["image_type"].map(IMAGE_TYPES)
    dup = meta.duplicated(["lesion_id", "modality"])
    if dup.any():
        raise ImportError_(f"{metadata_csv}: lesion(s) with two images of the same type: "
                           f"{', '.join(meta.loc[dup, 'lesion_id'].head(5))}")
    images_dir = Path(images_dir) if images_dir else None

    lesion_ids = list(dict.fromkeys(meta["lesion_id"]))  # file order, unique
    rows = {lid: {"lesion_id": lid, "dataset": dataset, "patient_id": "", "split": "", "fold": -1,
                  "image_clinical": "", "image_dermoscopic": "", "isic_id_clinical": "", "isic_id_dermoscopic": ""}
            for lid in lesion_ids}
    lesion_meta: dict[str, dict] = {}
    for rec in meta.to_dict("records"):
        lid, mod = rec["lesion_id"], rec["modality"]
        row = rows[lid]
        row[f"isic_id_{mod}"] = rec["isic_id"]
        if images_dir is not None:
            row[f"image_{mod}"] = _image_path(images_dir, lid, rec["isic_id"])
        for c in concepts:
            row[f"concept_{mod}_{_concept_name(c)}"] = pd.to_numeric(rec[c], errors="coerce")
        # lesion-level metadata: the first non-empty value of the two rows
        lm = lesion_meta.setdefault(lid, {})
        for key in ("age_approx", "sex", "skin_tone_class", "site"):
            if not lm.get(key) and rec.get(key, ""):
                lm[key] = rec[key]
    df = pd.DataFrame([rows[lid] for lid in lesion_ids])
    # every lesion gets all 14 concept columns, NaN where that image is missing
    for mod in ("clinical", "dermoscopic"):
        for c in concepts:
            col = f"concept_{mod}_{_concept_name(c)}"
            if col not in df.columns:
                df[col] = float("nan")
    lm = pd.DataFrame([lesion_meta[lid] for lid in lesion_ids])
    for key in ("age_approx", "sex", "skin_tone_class", "site"):
        if key not in lm.columns:
            lm[key] = ""
    df = clean_metadata(df, lm["age_approx"], lm["sex"], lm["site"], lm["skin_tone_class"])

    if groundtruth_csv:
        gt = read_csv(groundtruth_csv, ["lesion_id", *MILK10K.classes], "MILK10k ground truth")
        gt = gt.set_index("lesion_id")
        missing = [lid for lid in lesion_ids if lid not in gt.index]
        if missing:
            raise ImportError_(f"{groundtruth_csv}: no ground truth for {len(missing)} lesion(s), e.g. {missing[:3]}")
        for cls in MILK10K.classes:
            df[f"label_{cls}"] = pd.to_numeric(gt.loc[lesion_ids, cls], errors="coerce").to_numpy()
    if supplement_csv:
        sup = read_csv(supplement_csv, ["isic_id", "diagnosis_full"], "MILK10k supplement")
        full = dict(zip(sup["isic_id"], sup["diagnosis_full"]))
        # label information, not a model input: kept for error analysis only
        df["diagnosis_full"] = [full.get(a) or full.get(b) or "" for a, b in
                                zip(df["isic_id_dermoscopic"], df["isic_id_clinical"])]
        if "diagnosis_confirm_type" in sup.columns:  # how the label was established (histopathology, …)
            how = dict(zip(sup["isic_id"], sup["diagnosis_confirm_type"].fillna("")))
            df["dx_confirmation"] = [how.get(a) or how.get(b) or "" for a, b in
                                      zip(df["isic_id_dermoscopic"], df["isic_id_clinical"])]
    return normalise(df)
