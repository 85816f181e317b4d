"""The descriptive sections of a model card: model details, intended use, training data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..data.manifest import concept_columns, IMAGE_COLUMNS, load_manifest, train_only_mask
from .sources import now_utc, source_ref, utc_date

INTENDED_USES = [
    "Decision support for clinicians assessing a skin lesion: a calibrated differential over the task's classes, "
    "a malignancy risk score and a triage suggestion, to be interpreted with the history and examination.",
    "Prioritising review (e.g. which referrals to look at first) and research on retrospective data.",
]
INTENDED_USERS = ["Clinicians (dermatologists, primary-care physicians) under local clinical governance",
                  "Clinical ML / quality teams validating the model on their own population"]
OUT_OF_SCOPE = [
    "Not a medical device and not a diagnosis: no regulatory clearance; never the sole basis to rule out "
    "malignancy, to delay a referral or to skip a biopsy.",
    "Use by patients or the public without a clinician.",
    "Images unlike the training data: other image types than those listed under inputs, non-skin images, "
    "nails, mucosa, scalp under hair, ulcerated or bleeding lesions photographed without a dermatoscope, "
    "poor focus or lighting, images with ink, rulers or bandages over the lesion.",
    "Diagnoses outside the task's classes (they will be forced into one of the classes), inflammatory rashes "
    "and multiple lesions in one image.",
    "Populations unlike the training data (different skin tones, ages or referral settings) before a local "
    "validation.",
]


def model_details_section(b, run_dir: Path | None, ensemble: dict | None) -> dict:
    cfg, task = b.config, b.task
    model = cfg.get("model") or {}
    exp = cfg.get("experiment") or {}
    enc = model.get("encoder")
    enc_name = enc.get("name") if isinstance(enc, dict) else enc
    pre = model.get("pretrained_path") or (enc.get("pretrained_path") if isinstance(enc, dict) else None)
    if not pre and isinstance(enc, dict) and enc.get("pretrained"):
        pre = f"hub weights of {enc_name} (pretrained={enc.get('pretrained')})"
    if b.kind == "network":
        arch = model.get("name", "network")
        weights = str(pre) if pre else "none: encoder randomly initialised, all weights learnt from the training data"
    elif b.kind == "tabular":
        arch = f"gradient-boosted trees ({cfg.get('backend') or (model.get('backend') if isinstance(model, dict) else '')})"
        weights = "not applicable (trees fitted on the training data)"
    else:
        arch = f"{b.kind} of {len(cfg.get('members') or [])} member bundle(s)" if cfg.get("members") else b.kind
        weights = "see the member bundles' cards"
    spec = cfg.get("feature_spec")
    if spec:
        inputs = {"image_types": list(spec.get("modalities") or []),
                  "metadata": list(spec.get("numeric") or []) + list((spec.get("categorical") or {}).keys()),
                  "concept_scores": len(spec.get("concepts") or [])}
    elif isinstance(cfg.get("features"), dict):  # tabular: concept scores of each image type + metadata
        f = cfg["features"]
        inputs = {"image_types": [], "concept_scores_of": list(f.get("modalities") or []) if f.get("concepts") else [],
                  "concept_scores": len(f.get("concepts") or []) * len(f.get("modalities") or []),
                  "metadata": (["age"] + list((f.get("categorical") or {}).keys())) if f.get("use_metadata") else [],
                  "tabular_features": len(f.get("columns") or []) or None}
    else:
        inputs = {}
    hash_file = b.path / "HASH"
    return {
        "name": b.name, "kind": b.kind, "architecture": arch, "encoder": enc_name,
        "encoder_settings": {k: v for k, v in enc.items() if k != "name"} if isinstance(enc, dict) else {},
        "pretrained_weights": weights, "inputs": inputs,
        "preprocessing": {"color_constancy": (exp.get("data") or {}).get("color_constancy", "none")} if exp else {},
        "training": {k: v for k, v in {
            "epochs": (exp.get("train") or {}).get("epochs"), "loss": (exp.get("loss") or {}).get("name"),
            "sampler_power": (exp.get("train") or {}).get("sampler_power"), "config": exp.get("name")}.items()
            if v is not None} if exp else {},
        "fold": cfg.get("fold"),
        "bundle_path": str(b.path), "bundle_hash": b.content_hash, "version": b.version or f"dermfusion {__version__}",
        "date": utc_date(hash_file.stat().st_mtime) if hash_file.exists() else None,
        "task": task.name, "task_description": task.description, "official_metric": task.metric,
        "classes": [{"code": c, "description": task.class_descriptions.get(c, ""), "malignant": c in task.malignant}
                    for c in task.classes],
        "run_dir": str(run_dir) if run_dir else None,
        "ensemble": ensemble,
        "source": [source_ref(b.path / "config.yaml", what="architecture, inputs, task"),
                   source_ref(hash_file, what="content hash; its date is the bundle's date")],
    }


def intended_use_section(b, details: dict) -> dict:
    kinds = details["inputs"].get("image_types") or []
    imgs = " and ".join(kinds) + " images" if kinds else "the tabular inputs listed under model details"
    return {"primary_uses": INTENDED_USES, "users": INTENDED_USERS,
            "inputs_expected": f"{imgs} of a single skin lesion, acquired like the training data"
                               + (f" ({', '.join(details['inputs']['metadata'])} optional)"
                                  if details["inputs"].get("metadata") else ""),
            "out_of_scope": OUT_OF_SCOPE,
            "regulatory_status": "Research software; not a medical device. Decision support only — not a diagnosis."}


def load_manifest_source(manifest) -> tuple[pd.DataFrame, dict]:
    if isinstance(manifest, pd.DataFrame):
        return manifest, {"file": "training manifest (in memory, at the end of `dermfusion train`)", "date": now_utc()}

    return load_manifest(manifest, resolve_paths=False), source_ref(manifest)


def training_data_section(b, manifest) -> dict:

    df, source = load_manifest_source(manifest)
    task = b.task
    cols = task.label_columns()
    if not all(c in df.columns for c in cols):
        return {"available": False, "source": [source],
                "note": f"the manifest has no labels for task {task.name}; training data not summarised"}
    lab = df[df[cols].notna().all(axis=1)].reset_index(drop=True)
    y = lab[cols].to_numpy(float).argmax(1) if len(lab) else np.zeros(0, int)
    cls = pd.Series([task.classes[i] for i in y], dtype=object)
    out: dict = {"available": True, "source": [source],
                 "datasets": sorted({str(d) for d in lab.get("dataset", pd.Series(dtype=str)) if str(d)}),
                 "n_lesions": int(len(lab)),
                 "class_counts": {c: int((cls == c).sum()) for c in task.classes}}
    if "patient_id" in lab.columns:
        pids = lab["patient_id"].astype(str)
        if (pids != "").any():
            out["n_patients"] = int(pids[pids != ""].nunique())
    fold = b.config.get("fold")
    extra = train_only_mask(lab)  # rows of another dataset added for training only: every fold trains on them
    if "fold" in lab.columns and fold is not None:
        f = pd.to_numeric(lab["fold"], errors="coerce").fillna(-1).astype(int)
        if int(fold) >= 0:
            out["this_bundle"] = {"fold": int(fold), "n_train": int((((f >= 0) & (f != int(fold))) | extra).sum()),
                                  "n_validation": int(((f == int(fold)) & ~extra).sum())}
        else:
            out["this_bundle"] = {"fold": "full-data refit", "n_train": int(len(lab))}
    out["provenance"] = _provenance(lab, cls, task)
    datasets = lab["dataset"].fillna("").astype(str) if "dataset" in lab.columns else None
    if datasets is not None and datasets[datasets != ""].nunique() > 1:
        # several datasets trained together (`dermfusion data combine`): their class mix and how their labels were
        # confirmed differ, and a difference between datasets is a shortcut a model can learn like any other
        out["by_dataset"] = {}
        for ds in sorted(datasets[datasets != ""].unique()):
            keep = (datasets == ds).to_numpy()
            sub, sub_cls = lab[keep].reset_index(drop=True), cls[keep].reset_index(drop=True)
            out["by_dataset"][ds] = {"n_lesions": int(keep.sum()), "train_only": bool(extra[keep].all()),
                                     "class_counts": {c: int((sub_cls == c).sum()) for c in task.classes},
                                     "provenance": _provenance(sub, sub_cls, task)}
    avail = {}
    if "age" in lab.columns:
        avail["age"] = float(pd.to_numeric(lab["age"], errors="coerce").notna().mean()) if len(lab) else 0.0
    for c in ("sex", "skin_tone", "site"):
        if c in lab.columns:
            avail[c] = float((lab[c].fillna("").astype(str).replace({"nan": ""}) != "").mean()) if len(lab) else 0.0
    for m, c in IMAGE_COLUMNS.items():
        if c in lab.columns:
            avail[f"{m} image"] = float((lab[c].fillna("").astype(str) != "").mean()) if len(lab) else 0.0
    cc = concept_columns(lab)
    if cc:
        avail["concept scores"] = float(lab[cc].notna().any(axis=1).mean()) if len(lab) else 0.0
    out["availability"] = avail
    return out


def _provenance(lab: pd.DataFrame, cls: pd.Series, task) -> dict:
    """How the labels were confirmed (``dx_confirmation``): counts overall and per class."""
    prov = lab["dx_confirmation"].fillna("").astype(str).str.strip().replace("", "unknown") \
        if "dx_confirmation" in lab.columns else None
    if prov is None or not len(prov) or (prov == "unknown").all():
        return {"column": "dx_confirmation", "available": False,
                "note": "the manifest records no label provenance (dx_confirmation)"}
    return {"column": "dx_confirmation", "available": True,
            "counts": {k: int(v) for k, v in prov.value_counts().items()},
            "by_class": {c: {k: int(v) for k, v in prov[cls == c].value_counts().items()}
                         for c in task.classes if (cls == c).any()}}
