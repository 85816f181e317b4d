"""Model cards (Mitchell et al., "Model Cards for Model Reporting", 2019) for clinicians and regulators.

A card is built from files only — the bundle (config.yaml, calibration.json, metrics.json, VERSION, HASH),
the training run around it (summary.json, oof.csv), optionally the training manifest, an evaluation directory
written by ``dermfusion evaluate`` (metrics.json: CIs, fairness slices, provenance) and a ``shift.json``
written by ``dermfusion shift`` — and every section names the file (and date) its figures came from. Where
a source is missing the card says so; it never fills a gap with a number from elsewhere.

``write_model_card(bundle)`` writes model_card.json / .md / .html into the bundle (documentation, excluded
from the bundle's content hash). ``dermfusion train`` writes a minimal card for every bundle of a run
(``write_run_cards``); ``dermfusion card`` rewrites them with evaluation and shift results; the service
serves the card at ``GET /v1/model-card``.
"""
from __future__ import annotations

import html
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__

CARD_SCHEMA = "dermfusion.model_card/1"
CARD_FILES = ("model_card.json", "model_card.md", "model_card.html")
REPORT_LINK_ID = "model-card-link"
N_BOOTSTRAP = 200

# thresholds behind the derived failure modes (screening rules, stated on the card)
LOW_RECALL = 0.5
WIDE_CI = 0.3
FEW_CASES = 30
LOW_SENSITIVITY = 0.8
HIGH_ECE = 0.1
SHIFT_AUC = 0.6

METRIC_LABELS = {
    "official": "Official score", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro F1",
    "accuracy": "Accuracy", "top2_accuracy": "Top-2 accuracy", "top3_accuracy": "Top-3 accuracy",
    "milk10k_score": "MILK10k score (Dice, p > 0.5)", "macro_auroc": "Macro AUROC",
    "melanoma_sensitivity": "Melanoma sensitivity", "melanoma_specificity": "Melanoma specificity",
    "malignant_sensitivity": "Malignant sensitivity", "malignant_specificity": "Malignant specificity",
    "ece": "Expected calibration error", "brier": "Brier score", "log_loss": "Log loss",
    "official_raw": "Official score (raw probabilities)", "nested_cut_score": "Official score (nested cut-tuned)",
}
CARD_METRICS = ("official", "balanced_accuracy", "macro_f1", "accuracy", "macro_auroc", "melanoma_sensitivity",
                "melanoma_specificity", "malignant_sensitivity", "malignant_specificity", "ece", "brier", "log_loss")

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
GENERAL_CAVEATS = [
    "Dark skin (Fitzpatrick V–VI) is under-represented in public dermoscopy datasets; performance on darker "
    "skin is largely unmeasured.",
    "Public dermoscopy datasets come from specialist referral centres: the case mix and the prevalence of "
    "malignancy differ from primary care, so predictive values will differ there.",
    "Acquisition artefacts (ink markings, rulers, hair, gel bubbles, vignetting, colour cast of a device) can "
    "act as shortcuts that do not transfer to other clinics.",
    "Labels not confirmed by histopathology (follow-up, expert consensus, confocal microscopy) are noisier, and "
    "how a label was confirmed can itself be learnt as a shortcut.",
    "Retrospective evaluation only; no prospective or reader study is behind these figures.",
]


# ---------------------------------------------------------------------------------------------- helpers
def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _src(path, date: str | None = None, what: str = "") -> dict:
    p = Path(path)
    d = date or (_utc(p.stat().st_mtime) if p.exists() else None)
    return {"file": str(p), "date": d, **({"what": what} if what else {})}


def _read_json(path) -> dict | None:
    try:
        d = json.loads(Path(path).read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _num(v):
    """A finite float or None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _ci(v):
    if isinstance(v, (list, tuple)) and len(v) == 2 and _num(v[0]) is not None and _num(v[1]) is not None:
        return [float(v[0]), float(v[1])]
    return None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _find_run_dir(bundle: Path) -> Path | None:
    """The training run a bundle belongs to: RUN/fold_k/bundle, RUN/full/bundle, RUN/bundle (tabular refit /
    run bundle) or RUN/folds/foldk (tabular folds)."""
    for d in (bundle.parent, bundle.parent.parent, bundle.parent.parent.parent):
        if (d / "summary.json").exists():
            return d
    return None


# ---------------------------------------------------------------------------------------------- sections
def _model_details(b, run_dir: Path | None, ensemble: dict | None) -> dict:
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
        "date": _utc(hash_file.stat().st_mtime) if hash_file.exists() else None,
        "task": task.name, "task_description": task.description, "official_metric": task.metric,
        "classes": [{"code": c, "description": task.class_descriptions.get(c, ""), "malignant": c in task.malignant}
                    for c in task.classes],
        "run_dir": str(run_dir) if run_dir else None,
        "ensemble": ensemble,
        "source": [_src(b.path / "config.yaml", what="architecture, inputs, task"),
                   _src(hash_file, what="content hash; its date is the bundle's date")],
    }


def _intended_use(b, details: dict) -> dict:
    kinds = details["inputs"].get("image_types") or []
    imgs = " and ".join(kinds) + " images" if kinds else "the tabular inputs listed under model details"
    return {"primary_uses": INTENDED_USES, "users": INTENDED_USERS,
            "inputs_expected": f"{imgs} of a single skin lesion, acquired like the training data"
                               + (f" ({', '.join(details['inputs']['metadata'])} optional)"
                                  if details["inputs"].get("metadata") else ""),
            "out_of_scope": OUT_OF_SCOPE,
            "regulatory_status": "Research software; not a medical device. Decision support only — not a diagnosis."}


def _load_manifest(manifest) -> tuple[pd.DataFrame, dict]:
    if isinstance(manifest, pd.DataFrame):
        return manifest, {"file": "training manifest (in memory, at the end of `dermfusion train`)", "date": _now()}
    from ..data.manifest import load_manifest

    return load_manifest(manifest, resolve_paths=False), _src(manifest)


def _training_data(b, manifest) -> dict:
    from ..data.manifest import IMAGE_COLUMNS, concept_columns

    df, source = _load_manifest(manifest)
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
    if "fold" in lab.columns and fold is not None:
        f = pd.to_numeric(lab["fold"], errors="coerce").fillna(-1).astype(int)
        if int(fold) >= 0:
            out["this_bundle"] = {"fold": int(fold), "n_train": int(((f >= 0) & (f != int(fold))).sum()),
                                  "n_validation": int((f == int(fold)).sum())}
        else:
            out["this_bundle"] = {"fold": "full-data refit", "n_train": int(len(lab))}
    if "dx_confirmation" in lab.columns:
        prov = lab["dx_confirmation"].fillna("").astype(str).str.strip().replace("", "unknown")
        out["provenance"] = {"column": "dx_confirmation", "available": True,
                             "counts": {k: int(v) for k, v in prov.value_counts().items()},
                             "by_class": {c: {k: int(v) for k, v in prov[cls == c].value_counts().items()}
                                          for c in task.classes if (cls == c).any()}}
    else:
        out["provenance"] = {"column": "dx_confirmation", "available": False,
                             "note": "the manifest records no label provenance (dx_confirmation)"}
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


def _metric_block(kind: str, source: list, n, headline: dict, ci: dict, per_class: dict | None,
                  ci_method: str | None, note: str = "") -> dict:
    rows = []
    for k in CARD_METRICS + ("official_raw", "nested_cut_score"):
        v = _num(headline.get(k))
        if v is None:
            continue
        rows.append({"key": k, "label": METRIC_LABELS.get(k, k), "value": v, "ci": _ci((ci or {}).get(k))})
    pcs = []
    for c, pc in (per_class or {}).items():
        if not isinstance(pc, dict):
            continue
        pci = pc.get("ci") or {}
        pcs.append({"class": c, "support": pc.get("support"), "precision": _num(pc.get("precision")),
                    "recall": _num(pc.get("recall")), "recall_ci": _ci(pci.get("recall")),
                    "f1": _num(pc.get("f1")), "f1_ci": _ci(pci.get("f1")),
                    "auroc": _num(pc.get("auroc")), "auroc_ci": _ci(pci.get("auroc"))})
    return {"kind": kind, "source": source, "n": n, "headline": rows, "per_class": pcs,
            "ci_method": ci_method, "note": note}


def _evaluation_block(eval_dir: Path) -> tuple[dict | None, dict]:
    path = eval_dir / "metrics.json"
    m = _read_json(path)
    if m is None:
        return None, {}
    src = [_src(path, m.get("generated"), "written by `dermfusion evaluate`")]
    nb = m.get("n_bootstrap")
    block = _metric_block(
        "held-out evaluation", src, m.get("n"), m.get("metrics") or {}, m.get("ci") or {}, m.get("per_class"),
        f"percentile bootstrap over lesions ({nb} resamples)" if nb else None,
        "The card cannot verify that the evaluated predictions came from this bundle: check the evaluation "
        "directory belongs to it.")
    block["task"] = m.get("task")
    return block, m


def oof_metrics(run_dir: Path, task, manifest, calibration: dict | None, n_bootstrap: int = N_BOOTSTRAP) -> dict | None:
    """Metrics with bootstrap CIs of a run's calibrated out-of-fold predictions (oof.csv) against the labelled
    manifest; None when either is missing."""
    from ..data.manifest import targets
    from .calibration import Calibration
    from .metrics import bootstrap_metrics, compute_metrics

    oof_path = Path(run_dir) / "oof.csv"
    if manifest is None or not oof_path.exists():
        return None
    df, msrc = _load_manifest(manifest)
    oof = pd.read_csv(oof_path, dtype={"lesion_id": str})
    if oof.empty or not all(c in oof.columns for c in task.classes):
        return None
    man = df.assign(lesion_id=df["lesion_id"].astype(str)).drop_duplicates("lesion_id").set_index("lesion_id")
    oof = oof[oof["lesion_id"].isin(man.index)].reset_index(drop=True)
    if oof.empty:
        return None
    y = targets(man.loc[oof["lesion_id"]], task).astype(float)
    keep = np.isfinite(y).all(1)
    y, p = y[keep], oof.loc[keep, list(task.classes)].to_numpy(float)
    if not len(y):
        return None
    p = Calibration.from_dict(calibration).apply(p)
    m = compute_metrics(task, y, p)
    ci = bootstrap_metrics(task, y, p, n=n_bootstrap) if n_bootstrap > 0 else {"headline": {}, "per_class": {}}
    pcs = {c: {**m["per_class"][c], "ci": ci["per_class"].get(c, {})} for c in task.classes}
    return _jsonable(_metric_block(
        "out-of-fold (cross-validation on the training data)", [_src(oof_path, what="out-of-fold predictions"), msrc],
        int(len(y)), m, ci["headline"], pcs,
        f"percentile bootstrap over lesions ({n_bootstrap} resamples)" if n_bootstrap > 0 else None,
        "Out-of-fold predictions of the run's fold models, with this bundle's calibration applied (fitted on the "
        "same predictions, so calibration figures are slightly optimistic). Same population as the training "
        "data: not evidence of performance elsewhere."))


def _summary_block(run_dir: Path) -> dict | None:
    """Point estimates from a run's summary.json (no CIs)."""
    path = run_dir / "summary.json"
    s = _read_json(path)
    if not s:
        return None
    m = s.get("oof") if isinstance(s.get("oof"), dict) else s.get("metrics") if isinstance(s.get("metrics"), dict) else None
    if not m:
        return None
    head = {k: v for k, v in m.items() if _num(v) is not None and k != "n"}
    after = ((s.get("calibration") or {}).get("oof_after_calibration") or {}) if isinstance(s.get("calibration"), dict) else {}
    block = _metric_block("out-of-fold (cross-validation on the training data), point estimates",
                          [_src(path, what="written by `dermfusion train`")], m.get("n"), head, {}, None, None,
                          "Point estimates only (no confidence intervals): rewrite the card with "
                          "`dermfusion card RUN --manifest TRAINING_MANIFEST` for bootstrap CIs.")
    if after:
        block["after_calibration"] = {k: v for k, v in after.items() if _num(v) is not None}
    return block


def _subgroups(m: dict, src: list) -> dict:
    rows = [r for r in (m.get("fairness") or []) if isinstance(r, dict)]
    if not rows:
        return {"available": False, "source": src, "note": "the evaluation's metrics.json has no subgroup table"}
    keep = ("attribute", "group", "n", "n_malignant", "balanced_accuracy", "malignant_sensitivity",
            "melanoma_sensitivity", "malignant_auroc", "status", "reason")
    attrs = sorted({str(r.get("attribute")) for r in rows} - {"all"})
    return {"available": True, "source": src, "attributes": attrs,
            "rows": [{k: r.get(k) for k in keep} for r in rows],
            "rule": "flagged: malignant or melanoma sensitivity more than 0.10 below the whole set; "
                    "slices under 10 lesions are too small to judge"}


def _tables_in(d, prefix: str = "") -> list[dict]:
    """Tables in a dict of unknown shape: {group: {col: value}} or lists of records (flattened one level)."""
    out = []
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            out.append({"name": name, "rows": [_flat(r) for r in v]})
        elif isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values()):
            out.append({"name": name, "rows": [{"group": g, **_flat(r)} for g, r in v.items()]})
    return out


def _flat(r: dict, prefix: str = "", depth: int = 0) -> dict:
    o = {}
    for k, v in r.items():
        if isinstance(v, dict) and depth < 1:
            o.update(_flat(v, f"{prefix}{k}.", depth + 1))
        elif not isinstance(v, (dict, list)) or (isinstance(v, list) and len(v) <= 2):
            o[f"{prefix}{k}"] = v
    return o


def _provenance_results(m: dict, src: list) -> dict:
    """metrics.json "provenance" (evaluation.provenance.provenance_recall): per provenance group the per-class
    recall (n, Wilson CI) and warnings where recall differs between groups. Unknown shapes shown generically."""
    prov = m.get("provenance")
    if not isinstance(prov, dict) or not prov:
        return {"available": False, "source": src,
                "note": "the evaluation's metrics.json has no provenance results (evaluated by a version "
                        "without them)"}
    if prov.get("available") is False:
        return {"available": False, "source": src, "column": prov.get("column"),
                "note": f"the evaluated manifest records no label provenance ({prov.get('column') or 'dx_confirmation'})"}
    warnings = [str(w.get("message") or w) if isinstance(w, dict) else str(w) for w in prov.get("warnings") or [] if w]
    groups = prov.get("groups")
    out = {"available": True, "source": src, "warnings": warnings, "column": prov.get("column"), "tables": []}
    if isinstance(groups, list) and groups and all(isinstance(g, dict) and isinstance(g.get("per_class"), dict)
                                                   for g in groups):
        classes = list(dict.fromkeys(c for g in groups for c in g["per_class"]))
        rows = []
        for g in groups:
            row = {"group": g.get("label") or g.get("group"), "n": g.get("n"), "accuracy": _num(g.get("accuracy"))}
            for c in classes:
                cell = g["per_class"].get(c) or {}
                rec = _num(cell.get("recall")) if isinstance(cell, dict) else _num(cell)
                row[c] = "–" if rec is None else f"{rec:.2f} (n={cell.get('n')})" if isinstance(cell, dict) else f"{rec:.2f}"
            rows.append(row)
        out["tables"].append({"name": "recall by label provenance (argmax; n = lesions of the class)", "rows": rows})
        if prov.get("too_small"):
            out["too_small"] = [f"{t.get('group')} (n={t.get('n')})" for t in prov["too_small"] if isinstance(t, dict)]
    else:
        out["tables"] = _tables_in({k: v for k, v in prov.items() if k != "warnings"})
    return out


def _difference_text(t) -> str:
    if isinstance(t, str):
        return t
    if not isinstance(t, dict):
        return str(t)
    if "smd" in t and ("statistic" in t or "description" in t):
        means = (f" (reference {_fmtv(t['reference_mean'])} vs {_fmtv(t['other_mean'])})"
                 if "reference_mean" in t and "other_mean" in t else "")
        smd = _num(t.get("smd"))
        return f"{t.get('description') or t.get('statistic')}: standardised difference " \
               f"{'–' if smd is None else f'{smd:+.2f}'}{means}"
    return ", ".join(f"{k}={_fmtv(v)}" for k, v in t.items() if not isinstance(v, (dict, list)))


def _covariate_shift(shift_json: Path | None, evaluation: dict | None = None, eval_src: list | None = None) -> dict:
    """shift.json (`dermfusion shift`: feature_sets {image_statistics, embeddings}: auc, ci, level;
    top_differences) — or the "shift" an evaluation ran (`evaluate --shift-reference`)."""
    if shift_json is not None:
        s = _read_json(shift_json)
        if s is None:
            return {"available": False, "source": [_src(shift_json)], "note": f"{shift_json} is missing or not JSON"}
        src = [_src(shift_json, s.get("generated"), "written by `dermfusion shift`")]
    elif isinstance((evaluation or {}).get("shift"), dict):
        s, src = evaluation["shift"], list(eval_src or [])
    else:
        return {"available": False, "source": [],
                "note": "no covariate-shift check attached (run `dermfusion shift` and `dermfusion card --shift`)"}
    sets = dict(s.get("feature_sets") or {}) if isinstance(s.get("feature_sets"), dict) else {}
    for name in ("image_stats", "embeddings"):  # older / flat layout
        if isinstance(s.get(name), dict) and name not in sets:
            sets[name] = s[name]
    checks = {}
    for name, c in sets.items():
        if not isinstance(c, dict):
            continue
        ci = _ci(c.get("ci")) or _ci([c.get("ci_low"), c.get("ci_high")])
        checks[name] = {"auc": _num(c.get("auc")), "ci": ci,
                        **{k: v for k, v in c.items() if k in ("level", "n_reference", "n_other", "n_features",
                                                                "classifier", "bundle", "dim")}}
        if c.get("top_differences"):
            checks[name]["top_differences"] = [_difference_text(t) for t in c["top_differences"]][:10]
    sides = {k: s[k].get("name") for k in ("reference", "other") if isinstance(s.get(k), dict) and s[k].get("name")}
    return {"available": bool(checks), "source": src, "checks": checks, "sides": sides,
            "top_differences": [_difference_text(t) for t in (s.get("top_differences") or [])][:10],
            "details": {k: s[k] for k in ("modality", "color_constancy", "classifier") if k in s and
                        not isinstance(s[k], (dict, list))},
            "reading": "AUC of a classifier trained to tell the reference (training) images from the other (target) "
                       "images: 0.5 = indistinguishable; well above 0.5 = the target images differ, so out-of-fold "
                       "figures may not transfer to them.",
            **({} if checks else {"note": "the shift result has no AUC (feature_sets / image_stats / embeddings)"})}


def _fmtv(v) -> str:
    f = _num(v)
    return f"{f:.3g}" if f is not None and not isinstance(v, (bool, int)) else str(v)


def _calibration(b, perf: dict) -> dict:
    c = b.calibration or {}
    src = [_src(b.path / "calibration.json", what="fitted on out-of-fold predictions by `dermfusion train` / `calibrate`")]
    adj = c.get("prior_adjustment")
    out = {"source": src, "calibrated": bool(c) and not (
        (c.get("temperature") in (None, 1, 1.0)) and adj is None and c.get("cuts") is None),
           "temperature": _num(c.get("temperature")) if c else None,
           "prior_adjustment": dict(zip(b.task.classes, adj)) if isinstance(adj, list) and len(adj) == b.task.num_classes else adj,
           "cuts": dict(zip(b.task.classes, c["cuts"])) if isinstance(c.get("cuts"), list) and len(c["cuts"]) == b.task.num_classes else c.get("cuts")}
    for key in ("evaluation", "out_of_fold"):
        blk = perf.get(key)
        row = next((r for r in (blk or {}).get("headline", []) if r["key"] == "ece"), None)
        if row:
            out["ece"] = {"value": row["value"], "ci": row["ci"], "from": blk["kind"], "source": blk["source"][:1]}
            break
    else:
        out["ece_note"] = "no expected calibration error available (needs an evaluation or the training manifest)"
    return out


def _failure_modes(card: dict, b) -> dict:
    task = b.task
    derived: list[dict] = []

    def add(kind, text, source=None):
        derived.append({"kind": kind, "text": text, **({"source": source} if source else {})})

    perf = card["performance"]
    blk = perf.get("evaluation") or perf.get("out_of_fold")
    if blk and blk.get("per_class"):
        where = blk["kind"]
        for r in blk["per_class"]:
            rec, ci, n = r.get("recall"), r.get("recall_ci") or r.get("f1_ci"), r.get("support")
            if rec is not None and rec < LOW_RECALL and (n or 0) > 0:
                desc = task.class_descriptions.get(r["class"], "")
                add("low recall", f"{r['class']}" + (f" ({desc})" if desc else "") + f": recall {rec:.2f}"
                    + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f", n={n} ({where})")
            elif ci and ci[1] - ci[0] > WIDE_CI:
                add("uncertain", f"{r['class']}: wide 95% CI ({ci[0]:.2f}–{ci[1]:.2f}, n={n}) — too few cases to "
                    f"judge this class ({where})")
        for r in blk.get("headline", []):
            if r["key"] in ("melanoma_sensitivity", "malignant_sensitivity") and r["value"] < LOW_SENSITIVITY:
                add("missed cancers", f"{r['label']} {r['value']:.2f}" + (
                    f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else "") + f" ({where}): about "
                    f"{round(100 * (1 - r['value']))} in 100 "
                    + ("melanomas" if r["key"].startswith("melanoma") else "malignant lesions") + " are missed")
            if r["key"] == "ece" and r["value"] > HIGH_ECE:
                add("calibration", f"expected calibration error {r['value']:.3f} ({where}): stated probabilities "
                    "are off by more than 0.1 on average")
    elif not blk:
        add("no evidence", "no performance figures are attached to this card (no evaluation, no out-of-fold "
            "predictions): the model's accuracy is unknown")
    if not perf.get("evaluation"):
        add("no held-out evaluation", "no held-out evaluation attached: figures (if any) are cross-validated on the "
            "training data, which overstates performance on other clinics' images")
    td = card["training_data"]
    if td.get("available"):
        n = max(td.get("n_lesions", 0), 1)
        for c, k in td.get("class_counts", {}).items():
            if k < FEW_CASES:
                add("rare class", f"{c}: only {k} training lesions ({100 * k / n:.1f}%)")
        prov = td.get("provenance") or {}
        if prov.get("available") and len(prov.get("counts", {})) > 1:
            dom = {c: max(v, key=v.get) for c, v in prov.get("by_class", {}).items() if v}
            if len(set(dom.values())) > 1:
                parts = ", ".join(f"{c}: mostly {d} ({100 * prov['by_class'][c][d] / sum(prov['by_class'][c].values()):.0f}%)"
                                  for c, d in dom.items())
                add("label provenance shortcut", "how labels were confirmed differs by class (" + parts + "); "
                    "a model can learn the acquisition of, e.g., follow-up nevi rather than the lesion — check "
                    "recall by provenance")
        av = td.get("availability", {})
        if "skin_tone" in av and av["skin_tone"] < 0.5:
            add("skin tone", f"skin tone recorded for {100 * av['skin_tone']:.0f}% of training lesions: "
                "performance by skin tone cannot be assessed from the training data")
    meta = card["model_details"]["inputs"].get("metadata") or []
    if meta:
        av = td.get("availability", {}) if td.get("available") else {}
        known = ", ".join(f"{k} {100 * av[k]:.0f}%" for k in meta if k in av)
        add("missing metadata", f"the model uses {', '.join(meta)}; missing values are masked at test time, but "
            "accuracy without them may be lower than the figures above" + (f" (known in training: {known})" if known else ""))
    sg = card["subgroups"]
    for r in sg.get("rows", []) if sg.get("available") else []:
        if r.get("status") == "flagged":
            add("subgroup", f"{r['attribute']}={r['group']} (n={r['n']}): {r.get('reason')}")
    if sg.get("available") and "skin_tone" not in sg.get("attributes", []):
        add("skin tone", "the evaluation data record no skin tone: fairness by skin tone is unmeasured")
    for w in card["provenance_results"].get("warnings", []):
        add("provenance", w)
    for name, c in (card["covariate_shift"].get("checks") or {}).items():
        if c.get("auc") is not None and c["auc"] > SHIFT_AUC and not (c.get("ci") and c["ci"][0] <= 0.5):
            add("covariate shift", f"{name.replace('_', ' ')}: training and target images are separable with AUC "
                f"{c['auc']:.2f}" + (f" [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" if c.get("ci") else "")
                + " — the target images differ; out-of-fold figures may not hold there")
    caveats = list(GENERAL_CAVEATS)
    kinds = card["model_details"]["inputs"].get("image_types")
    if kinds == ["dermoscopic"]:
        caveats.insert(1, "Trained on dermoscopic images only: clinical (non-dermoscopic) and smartphone photos are "
                          "outside its training distribution.")
    elif kinds == ["clinical"]:
        caveats.insert(1, "Trained on clinical close-up photos only: dermoscopic images are outside its training data.")
    return {"derived": derived, "general": caveats,
            "rules": f"low recall < {LOW_RECALL}; wide CI > {WIDE_CI}; rare class < {FEW_CASES} lesions; "
                     f"cancer sensitivity < {LOW_SENSITIVITY}; ECE > {HIGH_ECE}; shift AUC > {SHIFT_AUC}"}


# ---------------------------------------------------------------------------------------------- build
def build_model_card(bundle_dir, *, manifest=None, evaluation_dir=None, shift_json=None,
                     oof: dict | None = None, ensemble: dict | None = None, previous: dict | None = None,
                     n_bootstrap: int = N_BOOTSTRAP) -> dict:
    """The model card of a bundle as a dict (JSON-able).

    manifest: the training manifest (path or DataFrame) → training data, provenance mix, OOF CIs.
    evaluation_dir: a `dermfusion evaluate` output (metrics.json) → held-out metrics, subgroups, provenance.
    shift_json: a `dermfusion shift` result. oof: precomputed out-of-fold block (several bundles of one run).
    previous: an earlier card of the same bundle (same hash) whose sections are kept where no new source is given.
    """
    from ..inference.bundle import read_bundle

    b = read_bundle(bundle_dir)
    run_dir = _find_run_dir(b.path)
    if previous and previous.get("model_details", {}).get("bundle_hash") != b.content_hash:
        previous = None
    prev = previous or {}
    card: dict = {"schema": CARD_SCHEMA, "generated": _now(), "generator": f"dermfusion {__version__}"}
    card["model_details"] = _model_details(b, run_dir, ensemble)
    card["intended_use"] = _intended_use(b, card["model_details"])
    if manifest is not None:
        card["training_data"] = _training_data(b, manifest)
    elif (prev.get("training_data") or {}).get("available"):
        card["training_data"] = prev["training_data"]
    else:
        card["training_data"] = {"available": False, "source": [],
                                 "note": "the training manifest is not stored in the bundle: no training-data "
                                         "summary (rewrite with `dermfusion card BUNDLE --manifest TRAINING_MANIFEST`)"}
    perf: dict = {"evaluation": None, "out_of_fold": None, "bundle_validation": None}
    ev: dict = {}
    if evaluation_dir is not None:
        perf["evaluation"], ev = _evaluation_block(Path(evaluation_dir))
        if perf["evaluation"] is None:
            perf["evaluation_note"] = f"{Path(evaluation_dir) / 'metrics.json'} is missing or not JSON"
    elif (prev.get("performance") or {}).get("evaluation"):
        perf["evaluation"] = prev["performance"]["evaluation"]
    if oof is None and run_dir is not None and manifest is not None:
        oof = oof_metrics(run_dir, b.task, manifest, b.calibration, n_bootstrap)
    if oof is None and (prev.get("performance") or {}).get("out_of_fold", {}) and \
            any(r.get("ci") for r in prev["performance"]["out_of_fold"].get("headline", [])):
        oof = prev["performance"]["out_of_fold"]
    if oof is None and run_dir is not None:
        oof = _summary_block(run_dir)
    perf["out_of_fold"] = oof
    bm = {k: v for k, v in (b.metrics or {}).items() if _num(v) is not None}
    if bm:
        perf["bundle_validation"] = {"metrics": bm, "source": [_src(b.path / "metrics.json",
                                                                    what="validation metrics at save time")]}
    if not perf["evaluation"] and not perf["out_of_fold"]:
        perf["note"] = ("No performance figures available: no evaluation directory was given and the bundle's run "
                        "has no out-of-fold predictions. Evaluate on held-out data (`dermfusion evaluate`) and "
                        "rewrite the card with `dermfusion card BUNDLE --evaluation DIR`.")
    card["performance"] = perf
    if ev:
        src = perf["evaluation"]["source"]
        card["subgroups"], card["provenance_results"] = _subgroups(ev, src), _provenance_results(ev, src)
    elif perf["evaluation"] and prev.get("subgroups"):
        card["subgroups"], card["provenance_results"] = prev["subgroups"], prev.get("provenance_results") or {}
    else:
        none = {"available": False, "source": [], "note": "no evaluation attached (`dermfusion card --evaluation DIR`)"}
        card["subgroups"], card["provenance_results"] = dict(none), dict(none)
    if shift_json is None and not isinstance(ev.get("shift"), dict) and (prev.get("covariate_shift") or {}).get("available"):
        card["covariate_shift"] = prev["covariate_shift"]
    else:
        card["covariate_shift"] = _covariate_shift(Path(shift_json) if shift_json is not None else None, ev,
                                                   (perf["evaluation"] or {}).get("source"))
    card["calibration"] = _calibration(b, perf)
    card["failure_modes"] = _failure_modes(card, b)
    return _jsonable(card)


def write_model_card(bundle_dir, *, manifest=None, evaluation_dir=None, shift_json=None, oof: dict | None = None,
                     ensemble: dict | None = None, keep_previous: bool = True) -> dict:
    """Build the card and write model_card.json / .md / .html into the bundle; returns the card."""
    bundle_dir = Path(bundle_dir)
    previous = _read_json(bundle_dir / "model_card.json") if keep_previous else None
    card = build_model_card(bundle_dir, manifest=manifest, evaluation_dir=evaluation_dir, shift_json=shift_json,
                            oof=oof, ensemble=ensemble, previous=previous)
    (bundle_dir / "model_card.json").write_text(json.dumps(card, indent=2))
    (bundle_dir / "model_card.md").write_text(render_markdown(card), encoding="utf-8")
    (bundle_dir / "model_card.html").write_text(render_html(card), encoding="utf-8")
    return card


def run_bundles(path) -> tuple[list[Path], Path | None]:
    """(bundles, run directory or None) for a bundle directory or a training run directory: a network run's
    fold / full bundles (summary.json "bundles"), a tabular run's fold bundles and refit, and RUN/bundle."""
    p = Path(path)
    s = _read_json(p / "summary.json")
    if s is None:
        if (p / "config.yaml").exists():
            return [p], _find_run_dir(p)
        if (p / "bundle" / "config.yaml").exists():
            return [p / "bundle"], p
        from ..inference.bundle import BundleError

        raise BundleError(f"{p} is neither a bundle nor a training run directory (no config.yaml or summary.json)")
    found: list[Path] = []
    for q in [p / n for n in s.get("bundles") or []] + sorted(p.glob("folds/fold*")) + [p / "bundle"]:
        if (q / "config.yaml").exists() and q.resolve() not in {f.resolve() for f in found}:
            found.append(q)
    return found, p


def write_run_cards(path, *, manifest=None, evaluation_dir=None, shift_json=None, strict: bool = True,
                    keep_previous: bool = True) -> list[Path]:
    """Write the card of every bundle of a run (or of one bundle). With ``strict=False`` (end of training) a
    failure is reported as a warning and never fails the run. Returns the bundles written."""
    try:
        from ..inference.bundle import read_bundle

        bundles, run_dir = run_bundles(path)
        if not bundles:
            return []
        first = read_bundle(bundles[0])
        oof = oof_metrics(run_dir, first.task, manifest, first.calibration) \
            if run_dir is not None and manifest is not None else None
        fold_bundles = (_read_json(run_dir / "summary.json") or {}).get("bundles") or [] if run_dir else []
        ens = {"n_members": len(fold_bundles), "run": str(run_dir),
               "note": f"one of the {len(fold_bundles)} bundles of this run; serving the run directory averages them"} \
            if len(fold_bundles) > 1 else None
        for q in bundles:
            qb = read_bundle(q)
            same = qb.calibration == first.calibration  # the precomputed OOF block used that calibration
            write_model_card(q, manifest=manifest, evaluation_dir=evaluation_dir, shift_json=shift_json,
                             oof=oof if same else None, ensemble=ens if qb.kind != "average" else None,
                             keep_previous=keep_previous)
        return bundles
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        from ..console import err_console

        err_console.print(f"[yellow]warning:[/] model card not written ({type(e).__name__}: {e}); "
                          "write it later with `dermfusion card RUN --manifest M`")
        return []


def card_for_service(served: Path | None, members: list[Path] | None = None) -> dict:
    """The card of the model a service serves: the served bundle's stored card, else its first member's
    (a fold ensemble), else one built on the fly from the bundle alone. An ensemble of N members says so."""
    members = [Path(m) for m in (members or [])]
    candidates = ([Path(served)] if served else []) + members[:1]
    if not candidates:
        raise ValueError("no bundle to describe")
    for p in candidates:
        c = _read_json(p / "model_card.json")
        if c and "model_details" in c:
            card, origin = dict(c), _src(p / "model_card.json", c.get("generated"), "stored in the bundle")
            break
    else:
        target = members[0] if members else candidates[0]
        card = build_model_card(target)
        origin = {"file": None, "date": card["generated"], "what": f"built on the fly from the bundle {target} alone"}
    card["served"] = {"origin": origin, "n_bundles": max(len(members), 1)}
    if len(members) > 1:
        card["model_details"] = {**card["model_details"], "ensemble": {
            "n_members": len(members),
            "note": f"the service averages {len(members)} bundles; this card describes the first of them"}}
    return card


# ---------------------------------------------------------------------------------------------- render
def _f(v, d: int = 3) -> str:
    v = _num(v)
    return "–" if v is None else f"{v:.{d}f}"


def _fci(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _pct(v) -> str:
    v = _num(v)
    return "–" if v is None else f"{100 * v:.0f}%"


def _source_line(src) -> str:
    if not src:
        return "Source: none."
    items = []
    for s in src if isinstance(src, list) else [src]:
        if not isinstance(s, dict):
            continue
        items.append(f"{s.get('file') or '—'}" + (f" ({s['date']})" if s.get("date") else "")
                     + (f" — {s['what']}" if s.get("what") else ""))
    return "Source: " + "; ".join(items) + "."


def _sections(card: dict) -> list[tuple[str, list]]:
    """The card as (title, blocks); a block is ("p", text) | ("ul", [text]) | ("table", head, rows) | ("src", src)."""
    md, iu, td = card["model_details"], card["intended_use"], card["training_data"]
    perf, cal, fm = card["performance"], card["calibration"], card["failure_modes"]
    S: list[tuple[str, list]] = []
    ens = md.get("ensemble")
    details = [
        ("Name", md["name"]), ("Kind / architecture", f"{md['kind']} — {md['architecture']}"),
        ("Encoder", md.get("encoder") or "—"), ("Pretrained weights", md["pretrained_weights"]),
        ("Inputs", "; ".join(f"{k.replace('_', ' ')}: {', '.join(v) if isinstance(v, list) else v}"
                             for k, v in md.get("inputs", {}).items() if v not in (None, [], 0)) or "—"),
        ("Task", f"{md['task']} — {md['task_description']} (official metric: {md['official_metric']})"),
        ("Classes", ", ".join(c["code"] + (" (malignant)" if c["malignant"] else "") for c in md["classes"])),
        ("Bundle", md["bundle_path"]), ("Bundle hash", md["bundle_hash"] or "—"), ("Version", md["version"]),
        ("Date", md.get("date") or "—"),
    ]
    if md.get("fold") is not None:
        details.append(("Fold", "full-data refit" if md["fold"] == -1 else str(md["fold"])))
    if md.get("training"):
        details.append(("Training", ", ".join(f"{k} {v}" for k, v in md["training"].items())))
    if md.get("preprocessing", {}).get("color_constancy") not in (None, "none"):
        details.append(("Colour normalisation", md["preprocessing"]["color_constancy"]))
    if ens:
        details.append(("Ensemble", f"{ens.get('n_members')} bundles — {ens.get('note', '')}"))
    S.append(("Model details", [("kv", details), ("src", md.get("source"))]))
    S.append(("Intended use", [("p", "<b>" + iu["regulatory_status"] + "</b>"), ("ul", iu["primary_uses"]),
                               ("p", "Users: " + "; ".join(iu["users"]) + "."),
                               ("p", "Expected input: " + iu["inputs_expected"] + "."),
                               ("h3", "Out of scope"), ("ul", iu["out_of_scope"])]))
    blocks: list = []
    if td.get("available"):
        n = max(td["n_lesions"], 1)
        blocks.append(("p", f"{td['n_lesions']} labelled lesions" + (f" from {', '.join(td['datasets'])}" if td.get("datasets") else "")
                       + (f", {td['n_patients']} patients" if td.get("n_patients") else "") + "."))
        tb = td.get("this_bundle")
        if tb:
            blocks.append(("p", f"This bundle: fold {tb['fold']}, trained on {tb['n_train']} lesions"
                           + (f", validated on {tb['n_validation']}" if "n_validation" in tb else "") + "."))
        blocks.append(("table", ["Class", "Lesions", "Share"],
                       [[c, str(k), f"{100 * k / n:.1f}%"] for c, k in td["class_counts"].items()]))
        prov = td.get("provenance") or {}
        if prov.get("available"):
            kinds = list(prov["counts"])
            blocks.append(("h3", "How labels were confirmed (dx_confirmation)"))
            blocks.append(("table", ["Class"] + kinds + ["All"],
                           [[c] + [str(v.get(k, 0)) for k in kinds] + [str(sum(v.values()))]
                            for c, v in prov.get("by_class", {}).items()]
                           + [["All"] + [str(prov["counts"][k]) for k in kinds] + [str(sum(prov["counts"].values()))]]))
        else:
            blocks.append(("p", "Label provenance: " + prov.get("note", "not recorded") + "."))
        if td.get("availability"):
            blocks.append(("h3", "Availability of inputs"))
            blocks.append(("table", ["Input", "Known for"], [[k, _pct(v)] for k, v in td["availability"].items()]))
    else:
        blocks.append(("p", td.get("note", "not available")))
    blocks.append(("src", td.get("source")))
    S.append(("Training data", blocks))
    blocks = []
    for key in ("evaluation", "out_of_fold"):
        blk = perf.get(key)
        if not blk:
            continue
        blocks.append(("h3", blk["kind"][:1].upper() + blk["kind"][1:] + (f" — {blk['n']} lesions" if blk.get("n") else "")))
        blocks.append(("table", ["Metric", "Value [95% CI]"],
                       [[r["label"], _f(r["value"]) + _fci(r["ci"])] for r in blk["headline"]]))
        if blk.get("per_class"):
            blocks.append(("table", ["Class", "n", "Recall [95% CI]", "F1 [95% CI]", "AUROC [95% CI]"],
                           [[r["class"], str(r.get("support", "–")), _f(r["recall"]) + _fci(r.get("recall_ci")),
                             _f(r["f1"]) + _fci(r.get("f1_ci")), _f(r["auroc"]) + _fci(r.get("auroc_ci"))]
                            for r in blk["per_class"]]))
        if blk.get("after_calibration"):
            blocks.append(("p", "After calibration: " + ", ".join(
                f"{METRIC_LABELS.get(k, k)} {_f(v)}" for k, v in blk["after_calibration"].items()) + "."))
        if blk.get("ci_method"):
            blocks.append(("p", "Intervals: " + blk["ci_method"] + "."))
        if blk.get("note"):
            blocks.append(("p", blk["note"]))
        blocks.append(("src", blk["source"]))
    if perf.get("evaluation_note"):
        blocks.append(("p", perf["evaluation_note"]))
    if perf.get("note"):
        blocks.append(("p", "<b>" + perf["note"] + "</b>"))
    bv = perf.get("bundle_validation")
    if bv:
        blocks.append(("p", "This bundle's own validation at save time: " + ", ".join(
            f"{METRIC_LABELS.get(k, k)} {_f(v)}" for k, v in bv["metrics"].items()) + "."))
        blocks.append(("src", bv["source"]))
    S.append(("Performance", blocks))
    sg = card["subgroups"]
    blocks = []
    if sg.get("available"):
        blocks.append(("table", ["Attribute", "Group", "n", "Malignant n", "Balanced acc.", "Malignant sens.",
                                 "Melanoma sens.", "Status"],
                       [[str(r["attribute"]), str(r["group"]), str(r["n"]), str(r.get("n_malignant", "–")),
                         _f(r.get("balanced_accuracy")), _f(r.get("malignant_sensitivity")),
                         _f(r.get("melanoma_sensitivity")),
                         str(r.get("status")) + (f": {r['reason']}" if r.get("status") == "flagged" else "")]
                        for r in sg["rows"]]))
        blocks.append(("p", "Rule: " + sg["rule"] + "."))
    else:
        blocks.append(("p", sg.get("note", "not available")))
    blocks.append(("src", sg.get("source")))
    S.append(("Subgroups (fairness)", blocks))
    pr = card["provenance_results"]
    blocks = []
    if pr.get("available"):
        if pr.get("warnings"):
            blocks.append(("ul", pr["warnings"]))
        else:
            blocks.append(("p", "No provenance warnings."))
        for t in pr.get("tables", []):
            cols = list(dict.fromkeys(k for r in t["rows"] for k in r))
            blocks.append(("h3", t["name"].replace("_", " ")))
            blocks.append(("table", cols, [[_fmtv(r.get(k, "")) if r.get(k, "") != "" else "" for k in cols]
                                           for r in t["rows"]]))
        if pr.get("too_small"):
            blocks.append(("p", "Groups too small to judge: " + ", ".join(pr["too_small"]) + "."))
    else:
        blocks.append(("p", pr.get("note", "not available")))
    blocks.append(("src", pr.get("source")))
    S.append(("Results by label provenance", blocks))
    cs = card["covariate_shift"]
    blocks = []
    if cs.get("available"):
        blocks.append(("p", cs["reading"]))
        if cs.get("sides"):
            blocks.append(("p", " vs ".join(f"{k}: {v}" for k, v in cs["sides"].items())))
        for name, c in cs["checks"].items():
            blocks.append(("p", f"<b>{name.replace('_', ' ')}</b>: AUC {_f(c.get('auc'))}{_fci(c.get('ci'))}"
                           + "".join(f", {k.replace('_', ' ')} {v}" for k, v in c.items()
                                     if k not in ("auc", "ci", "top_differences"))))
            if c.get("top_differences"):
                blocks.append(("ul", c["top_differences"]))
        if cs.get("top_differences"):
            blocks.append(("h3", "Largest differences"))
            blocks.append(("ul", cs["top_differences"]))
        if cs.get("details"):
            blocks.append(("p", ", ".join(f"{k}: {v}" for k, v in cs["details"].items())))
    else:
        blocks.append(("p", cs.get("note", "not available")))
    blocks.append(("src", cs.get("source")))
    S.append(("Covariate shift", blocks))
    blocks = [("kv", [("Calibrated", "yes" if cal.get("calibrated") else "no (identity)"),
                      ("Temperature", _f(cal.get("temperature"))),
                      ("Prior adjustment", ", ".join(f"{k} {_f(v, 2)}" for k, v in cal["prior_adjustment"].items())
                       if isinstance(cal.get("prior_adjustment"), dict) else "none"),
                      ("Per-class cuts (submission only)", ", ".join(f"{k} {_f(v, 2)}" for k, v in cal["cuts"].items())
                       if isinstance(cal.get("cuts"), dict) else "none")]
               + ([("Expected calibration error", _f(cal["ece"]["value"]) + _fci(cal["ece"]["ci"])
                    + f" ({cal['ece']['from']})")] if cal.get("ece") else []))]
    if cal.get("ece_note"):
        blocks.append(("p", cal["ece_note"] + "."))
    blocks.append(("src", cal.get("source")))
    S.append(("Calibration", blocks))
    blocks = [("h3", "Found in this model's data and results")]
    blocks.append(("ul", [f"<b>{d['kind']}</b>: {d['text']}" for d in fm["derived"]] or ["none found by the rules below"]))
    blocks.append(("p", "Rules: " + fm["rules"] + "."))
    blocks.append(("h3", "General caveats for dermoscopy models"))
    blocks.append(("ul", fm["general"]))
    S.append(("Known failure modes and caveats", blocks))
    return S


def render_markdown(card: dict) -> str:
    md = card["model_details"]
    out = [f"# Model card — {md['name']}", "",
           f"_Generated {card['generated']} by {card['generator']}. {card['intended_use']['regulatory_status']}_", ""]

    def clean(t: str) -> str:
        return str(t).replace("<b>", "**").replace("</b>", "**").replace("|", "\\|").replace("\n", " ")

    for title, blocks in _sections(card):
        out += [f"## {title}", ""]
        for blk in blocks:
            kind = blk[0]
            if kind == "p":
                out += [clean(blk[1]), ""]
            elif kind == "h3":
                out += [f"### {blk[1]}", ""]
            elif kind == "ul":
                out += [f"- {clean(x)}" for x in blk[1]] + [""]
            elif kind == "kv":
                out += ["| | |", "|---|---|"] + [f"| {clean(k)} | {clean(v)} |" for k, v in blk[1]] + [""]
            elif kind == "table":
                head, rows = blk[1], blk[2]
                out += ["| " + " | ".join(clean(h) for h in head) + " |", "|" + "---|" * len(head)]
                out += ["| " + " | ".join(clean(c) for c in r) + " |" for r in rows] + [""]
            elif kind == "src":
                out += [f"_{clean(_source_line(blk[1]))}_", ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--accent:#2f6fbf;--warn:#fff4e5}
*{box-sizing:border-box}
body{font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--ink);
     margin:0;background:#fafbfc}
header{background:#fff;border-bottom:1px solid var(--line);padding:20px 32px}
header h1{margin:0 0 4px;font-size:22px}
.meta{color:var(--muted)}
.disclaimer{background:var(--warn);border:1px solid #f5c26b;border-radius:6px;padding:8px 12px;margin-top:10px}
main{max-width:1100px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:20px 0}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:14.5px;margin:14px 0 6px}
p.src{color:var(--muted);font-size:12.5px;margin:8px 0 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;margin:6px 0}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f5f7fa;font-weight:600}
table.kv th{width:220px}
.scroll{overflow-x:auto}
li{margin:2px 0}
code{font-size:12.5px;background:#f5f7fa;padding:0 3px;border-radius:3px}
"""


def render_html(card: dict) -> str:
    """One self-contained HTML page (inline CSS, no external resources)."""
    md = card["model_details"]
    e = html.escape

    def text(t) -> str:  # escape, then allow the <b> and `code` markup the card itself inserts
        t = e(str(t)).replace("&lt;b&gt;", "<b>").replace("&lt;/b&gt;", "</b>")
        return re.sub(r"`([^`<>]+)`", r"<code>\1</code>", t)

    parts = []
    for title, blocks in _sections(card):
        body = []
        for blk in blocks:
            kind = blk[0]
            if kind == "p":
                body.append(f"<p>{text(blk[1])}</p>")
            elif kind == "h3":
                body.append(f"<h3>{e(blk[1])}</h3>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{text(x)}</li>" for x in blk[1]) + "</ul>")
            elif kind == "kv":
                body.append("<table class='kv'>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>"
                                                           for k, v in blk[1]) + "</table>")
            elif kind == "table":
                body.append("<div class='scroll'><table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in blk[1]) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
                            + "</table></div>")
            elif kind == "src":
                body.append(f"<p class='src'>{text(_source_line(blk[1]))}</p>")
        anchor = title.lower().split(" ")[0]
        parts.append(f"<section id='{e(anchor)}'><h2>{e(title)}</h2>{''.join(body)}</section>")
    served = card.get("served")
    served_line = f"<br>Served: {e(_source_line(served['origin']))}" if served else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Model card — {e(md['name'])}</title><style>{CSS}</style></head>
<body>
<header><h1>Model card — {e(md['name'])}</h1>
<div class="meta">{e(md['task'])} · {e(md['architecture'])} · hash {e((md.get('bundle_hash') or '—')[:16])} ·
{e(md['version'])} · generated {e(card['generated'])} by {e(card['generator'])}{served_line}</div>
<div class="disclaimer"><b>{e(card['intended_use']['regulatory_status'])}</b></div></header>
<main>{''.join(parts)}</main></body></html>
"""


def report_link_html(out_dir) -> str:
    """The report's link line when out_dir/model_card.html exists (for evaluation.report.render_html)."""
    if out_dir is None or not (Path(out_dir) / "model_card.html").exists():
        return ""
    return (f"<p id='{REPORT_LINK_ID}' style='margin:12px 0 0'>Model card: "
            "<a href='model_card.html'>model_card.html</a></p>")


def link_report(evaluation_dir) -> bool:
    """Add the model-card link to an existing report.html (rendered before the card existed); idempotent.
    True when the report links the card."""
    rep = Path(evaluation_dir) / "report.html"
    if not rep.exists():
        return False
    s = rep.read_text(encoding="utf-8")
    if REPORT_LINK_ID in s:
        return True
    link = report_link_html(evaluation_dir)
    if not link or "<main>" not in s:
        return False
    rep.write_text(s.replace("<main>", "<main>" + link, 1), encoding="utf-8")
    return True


__all__ = ["build_model_card", "render_markdown", "render_html", "write_model_card", "write_run_cards",
           "run_bundles", "card_for_service", "link_report", "report_link_html", "oof_metrics", "CARD_FILES"]
