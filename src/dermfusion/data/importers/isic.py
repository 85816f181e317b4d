"""ISIC / HAM10000 style CSVs: one image per row.

Diagnosis from a `dx`/`diagnosis` column (HAM10000, ISIC 2018 names) or from one-hot class columns
(ISIC 2019 ground truth). The row's id is the dataset's `lesion_id` when it is unique per row,
else the image id — so a predictions file names the dataset's own ids. Repeated lesion ids and
patient ids are kept in `lesion_group` / `patient_id` so folds never split them.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...tasks import ISIC2018, ISIC2019, TaskSpec, get_task
from ..manifest import normalise
from .common import ImportError_, clean_metadata, one_hot, read_csv, resolve_image

DX_ALIASES = {"akiec": "AKIEC", "ak": "AK", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL",
              "nv": "NV", "vasc": "VASC", "scc": "SCC", "unk": "UNK"}
ID_COLUMNS = ("image_id", "image", "image_name", "isic_id")
PATH_COLUMNS = ("image", "image_path", "path", "file")
PROVENANCE_COLUMNS = ("dx_type", "diagnosis_confirm_type")


def _pick(df: pd.DataFrame, names) -> str | None:
    return next((c for c in names if c in df.columns), None)


def _map_dx(value: str, task: TaskSpec) -> str:
    v = value.strip()
    if not v:
        return ""
    cls = DX_ALIASES.get(v.lower(), v.upper())
    if task is ISIC2019 and cls == "AKIEC":
        cls = "AK"
    if task is ISIC2018 and cls == "AK":
        cls = "AKIEC"
    if cls not in task.classes:
        raise ImportError_(f"diagnosis {value!r} is not a class of task {task.name} ({', '.join(task.classes)}); "
                           "choose the task with --task")
    return cls


def import_isic(csv_path, images_dir=None, task: str | TaskSpec | None = None, dataset: str = "isic",
                image_ext: str = ".jpg") -> pd.DataFrame:
    src = read_csv(csv_path, [], "ISIC CSV")
    csv_dir = Path(csv_path).resolve().parent
    images_dir = Path(images_dir).resolve() if images_dir else None
    id_col = _pick(src, ID_COLUMNS)
    if id_col is None:
        raise ImportError_(f"{csv_path}: needs an image id column (one of {', '.join(ID_COLUMNS)})")
    image_ids = [Path(v).stem for v in src[id_col]]
    path_col = _pick(src, PATH_COLUMNS)
    if path_col and src[path_col].str.contains(r"[/\\.]", regex=True).any():
        rels = list(src[path_col])
    else:
        rels = [f"{i}{image_ext}" for i in image_ids]

    dx_col = _pick(src, ("dx", "diagnosis"))
    if isinstance(task, str):
        task = get_task(task)
    if task is None:
        values = set(src[dx_col].str.lower()) if dx_col else {c.lower() for c in src.columns}
        task = ISIC2019 if ({"scc", "ak"} & values) else ISIC2018
    if dx_col:
        labels = [_map_dx(v, task) for v in src[dx_col]]
    elif all(c in src.columns for c in task.classes):
        onehot = src[list(task.classes)].apply(pd.to_numeric, errors="coerce")
        labels = [task.classes[int(r.argmax())] if r.max() > 0.5 else "" for r in onehot.to_numpy()]
    else:
        labels = [""] * len(src)

    lesion_col = src["lesion_id"] if "lesion_id" in src.columns else pd.Series([""] * len(src))
    unique_lesions = lesion_col.ne("").all() and not lesion_col.duplicated().any()
    df = pd.DataFrame({
        "lesion_id": list(lesion_col) if unique_lesions else image_ids,
        "dataset": dataset,
        "patient_id": list(src["patient_id"]) if "patient_id" in src.columns else "",
        "split": "train" if any(labels) else "test",
        "fold": -1,
        "image_clinical": "",
        "image_dermoscopic": [resolve_image(images_dir, csv_dir, r) for r in rels],
        "image_id": image_ids,
        "lesion_group": list(lesion_col),
    })
    provenance = _pick(src, PROVENANCE_COLUMNS)
    if provenance:  # how each label was established (HAM10000 dx_type: histo / follow_up / consensus / confocal)
        df["dx_confirmation"] = src[provenance].fillna("").astype(str).str.strip().str.lower().to_numpy()
    df = clean_metadata(df, src.get("age", src.get("age_approx", [""] * len(src))),
                        src.get("sex", [""] * len(src)),
                        src.get("localization", src.get("anatom_site_general", [""] * len(src))))
    if any(labels):
        if not all(labels):
            raise ImportError_(f"{csv_path}: {sum(not x for x in labels)} row(s) have no diagnosis while others do")
        df = pd.concat([df, one_hot(labels, task)], axis=1)
    df.attrs["task"] = task.name
    return normalise(df)
