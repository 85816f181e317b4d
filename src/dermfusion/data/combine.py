"""Training on several datasets at once: another dataset's lesions added to a manifest, relabelled through an
explicit label map, de-duplicated against it, and marked ``train_only``.

``train_only`` rows train every fold and the full-data refit but are never validated (``data.manifest
.train_only_mask``), so the out-of-fold figures — and everything fitted on them: calibration, the operating point,
the conformal sets — stay on the main dataset, the one the model is meant for. The ``dataset`` column says where
each row came from (the provenance report counts it per dataset).

Label maps are YAML files (``data/label_maps/*.yaml`` in the package, or a path): ``source_task``, ``target_task``,
``by`` (``diagnosis_fine``: the importer's fine diagnosis column; ``label``: the source task's class) and ``map``
(source value → target class, ``null`` = leave out). A source value the map does not name is an error — a new
diagnosis must be placed on purpose, never by default.

De-duplication: an added image whose content (SHA-256) or grey thumbnail (near-identical: a re-saved or resized
copy, correlation ≥ ``near_duplicate_correlation``) matches an image of the manifest is left out and listed, so one
lesion never sits on both sides of a validation split.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from ..errors import DermfusionError
from ..tasks import TaskSpec, get_task
from .manifest import IMAGE_COLUMNS, label_columns, normalise


class CombineError(DermfusionError, ValueError):
    """A label map or manifest that cannot be combined as asked."""


def label_map_names() -> list[str]:
    root = resources.files("dermfusion") / "data" / "label_maps"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def read_label_map(name_or_path: str | Path) -> dict:
    """A label map by its built-in name (``derm7pt_to_isic2018``) or a YAML path, validated."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = resources.files("dermfusion") / "data" / "label_maps" / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise CombineError(f"no label map {str(name_or_path)!r}: give a YAML file or one of "
                               f"{', '.join(label_map_names())}")
        text = builtin.read_text()
    else:
        text = path.read_text()
    lm = yaml.safe_load(text) or {}
    for key in ("source_task", "target_task", "by", "map"):
        if key not in lm:
            raise CombineError(f"label map {name_or_path}: missing '{key}'")
    target = get_task(lm["target_task"])
    bad = {k: v for k, v in lm["map"].items() if v is not None and v not in target.classes}
    if bad:
        raise CombineError(f"label map {name_or_path}: {bad} are not {target.name} classes {list(target.classes)}")
    if lm["by"] not in ("diagnosis_fine", "label"):
        raise CombineError(f"label map {name_or_path}: 'by' must be diagnosis_fine or label, not {lm['by']!r}")
    lm["map"] = {str(k).strip().lower(): v for k, v in lm["map"].items()}
    return lm


def relabel(df: pd.DataFrame, label_map: dict) -> tuple[pd.DataFrame, dict]:
    """``df``'s labelled rows with the target task's label columns (one-hot) instead of the source task's; rows the
    map leaves out dropped. Returns (rows, {"kept": n, "left_out": {value: n}})."""
    source, target = get_task(label_map["source_task"]), get_task(label_map["target_task"])
    if label_map["by"] == "diagnosis_fine":
        if "diagnosis_fine" not in df.columns:
            raise CombineError("the label map reads diagnosis_fine, which this manifest has not (import it with "
                               f"`dermfusion import {source.name}`)")
        values = df["diagnosis_fine"].fillna("").astype(str).str.strip().str.lower()
    else:
        cols = [f"label_{c}" for c in source.classes]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise CombineError(f"the label map reads {source.name} labels; the manifest lacks {missing}")
        lab = df[cols].to_numpy(float)
        values = pd.Series([source.classes[i].lower() if np.isfinite(r).all() else "" for i, r in
                            zip(np.nan_to_num(lab).argmax(1), lab)], index=df.index)
    labelled = values != ""
    unknown = sorted(set(values[labelled]) - set(label_map["map"]))
    if unknown:
        raise CombineError(f"the label map does not place {unknown}: add them to its map (a class or null)")
    target_class = values.map(lambda v: label_map["map"].get(v) if v else None)
    keep = target_class.notna()
    out = df[keep].drop(columns=label_columns(df)).copy()
    for c in target.classes:
        out[f"label_{c}"] = (target_class[keep] == c).astype(float).to_numpy()
    left = values[labelled & ~keep].value_counts().to_dict()
    return out.reset_index(drop=True), {"kept": int(keep.sum()), "left_out": {k: int(v) for k, v in left.items()}}


def _image_path(row) -> str:
    for col in IMAGE_COLUMNS.values():
        v = row.get(col, "")
        if isinstance(v, str) and v:
            return v
    return ""


def image_fingerprints(paths: list[str], side: int = 24) -> tuple[list[str], np.ndarray]:
    """(SHA-256 of each file, a zero-mean unit-norm ``side``² grey thumbnail of each image) — "" / zeros for a
    missing file. Two thumbnails' dot product is their correlation: ≥ 0.99 for a re-saved or resized copy; distinct
    dermoscopic lesions (a dark blob on skin) reach 0.98 at most between HAM10000 and Derm7pt."""
    shas, thumbs = [], np.zeros((len(paths), side * side), dtype=np.float32)
    for i, p in enumerate(paths):
        if not p or not Path(p).is_file():
            shas.append("")
            continue
        shas.append(hashlib.sha256(Path(p).read_bytes()).hexdigest())
        with Image.open(p) as im:
            im.draft("L", (4 * side, 4 * side))
            g = np.asarray(im.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
        g = g - g.mean()
        thumbs[i] = g / (np.linalg.norm(g) + 1e-6)
    return shas, thumbs


def combine(main: pd.DataFrame, extra: pd.DataFrame, label_map: dict, task: TaskSpec, *,
            near_duplicate_correlation: float = 0.99) -> tuple[pd.DataFrame, dict]:
    """``main`` plus ``extra``'s lesions relabelled onto ``task`` and marked ``train_only`` (fold −1), duplicates of
    ``main``'s images left out. Returns (manifest, report)."""
    if get_task(label_map["target_task"]).name != task.name:
        raise CombineError(f"the label map targets {label_map['target_task']}, the manifest is {task.name}")
    added, lab_report = relabel(extra, label_map)
    main_paths = [_image_path(r) for r in main.to_dict("records")]
    add_paths = [_image_path(r) for r in added.to_dict("records")]
    m_sha, m_th = image_fingerprints(main_paths)
    a_sha, a_th = image_fingerprints(add_paths)
    exact = set(s for s in m_sha if s)
    corr = a_th @ m_th.T if len(a_th) and len(m_th) else np.zeros((len(a_th), 0))
    dupes = []
    for i, s in enumerate(a_sha):
        if s and s in exact:
            dupes.append((added.loc[i, "lesion_id"], "identical file"))
        elif s and corr.shape[1]:
            j = int(corr[i].argmax())
            if corr[i, j] >= near_duplicate_correlation:
                dupes.append((added.loc[i, "lesion_id"], f"near-identical to {main['lesion_id'].iloc[j]} "
                                                         f"(thumbnail correlation {corr[i, j]:.3f})"))
    drop = {d for d, _ in dupes}
    added = added[~added["lesion_id"].isin(drop)].copy()
    clash = set(added["lesion_id"]) & set(main["lesion_id"])
    if clash:
        raise CombineError(f"lesion ids in both manifests: {sorted(clash)[:5]} …")
    added["fold"] = -1
    added["train_only"] = True
    base = main.copy()
    base["train_only"] = base["train_only"].fillna(False).astype(bool) if "train_only" in base.columns else False
    out = normalise(pd.concat([base, added], ignore_index=True, sort=False))
    out["train_only"] = out["train_only"].fillna(False).astype(bool)
    counts = {ds: {c: int(v) for c, v in zip(task.classes, out.loc[out["dataset"] == ds,
                                                                    [f"label_{c}" for c in task.classes]].sum())}
              for ds in out["dataset"].unique()}
    report = {"label_map": f"{label_map['source_task']} → {label_map['target_task']} by {label_map['by']}",
              "added": int(len(added)), "relabel": lab_report, "duplicates_left_out": dupes,
              "class_counts_by_dataset": counts}
    return out, report
