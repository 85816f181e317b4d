"""Cross-validated training of the tabular expert -> out-of-fold probabilities + bundles.

    summary = train_tabular_cv(cfg, manifest_df, "milk10k", "runs/tab")

writes
    runs/tab/oof.csv                 lesion_id, fold, <class…> raw out-of-fold probabilities
    runs/tab/folds/fold<k>/          one bundle per fold (model trained on the other folds)
    runs/tab/bundle/                 full-data refit; calibration.json fitted on the OOF rows
                                     (temperature + per-class cuts for MILK10k), metrics.json with the
                                     OOF scores and the *nested* cut-tuned estimate
    runs/tab/summary.json            the returned summary
Config (see configs/milk10k_tabular.yaml; it also validates as a `config.ExperimentConfig`): task, name,
model {kind: tabular, backend, params, class_weight, early_stopping_rounds, validation_fraction, seed,
features {derived, use_metadata}, n_jobs}, cv {k, seed}, calibration {eval_size: expected test-set size or null — see _cal.tune_cut}.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..bundle import write_bundle
from ..card import write_run_cards
from ..data.folds import assign_folds
from ..data.manifest import ManifestError, has_labels, targets
from ..errors import DermfusionError
from ..evaluation import calibration as _cal, metrics as _met
from ..tasks import TaskSpec, get_task
from .expert import TabularExpert
from .features import TabularFeatureSpec

MODEL_KEYS = {"backend", "params", "class_weight", "early_stopping_rounds", "validation_fraction", "seed",
              "refit_full", "kind", "name", "features", "n_jobs"}


class TabularConfigError(DermfusionError, ValueError):
    pass


def validate_config(cfg: dict) -> dict:
    """Fill defaults and reject unknown keys (a typo must not silently train a different model)."""
    cfg = dict(cfg or {})
    model = dict(cfg.get("model") or {})
    if model.get("kind", "tabular") != "tabular":
        raise TabularConfigError(f"model.kind is {model.get('kind')!r}; train_tabular_cv only trains 'tabular'")
    unknown = set(model) - MODEL_KEYS
    if unknown:
        raise TabularConfigError(f"unknown model key(s) {sorted(unknown)}; allowed: {sorted(MODEL_KEYS)}")
    model.setdefault("kind", "tabular")
    model.setdefault("backend", "lightgbm")
    model.setdefault("params", {})
    model.setdefault("class_weight", None)  # unweighted + tuned cuts scored best OOF on MILK10k
    model.setdefault("early_stopping_rounds", 100)
    model.setdefault("validation_fraction", 0.15)
    model.setdefault("seed", 0)
    if model.get("name") == "trimodal_fusion":  # the experiment schema's network default, meaningless here
        model.pop("name")
    # `features` / `n_jobs` live under `model:` (the experiment schema allows extra model keys only);
    # top-level ones are accepted too. data.use_metadata (experiment schema) switches metadata off.
    data = cfg.get("data") or {}
    feats = {"derived": True, "use_metadata": bool(data.get("use_metadata", True)),
             **(cfg.get("features") or {}), **(model.pop("features", None) or {})}
    unknown = set(feats) - {"derived", "use_metadata"}
    if unknown:
        raise TabularConfigError(f"unknown features key(s) {sorted(unknown)}; allowed: derived, use_metadata")
    cv = {"k": 5, "seed": 0, **(cfg.get("cv") or {})}
    n_jobs = model.pop("n_jobs", None)
    cfg.update(model=model, features=feats, cv=cv)
    cfg["n_jobs"] = int(n_jobs or cfg.get("n_jobs") or 2)
    if not cfg.get("name") or cfg.get("name") == "experiment":
        cfg["name"] = f"{cfg.get('task', 'task')}_tabular_{model['backend']}"
    return cfg


def make_expert(model_cfg: dict, task: TaskSpec, n_jobs: int = 2, seed: int | None = None) -> TabularExpert:
    return TabularExpert(backend=model_cfg["backend"], params=model_cfg.get("params") or {},
                         num_classes=task.num_classes, class_weight=model_cfg.get("class_weight"),
                         early_stopping_rounds=model_cfg.get("early_stopping_rounds"),
                         validation_fraction=model_cfg.get("validation_fraction", 0.15),
                         refit_full=model_cfg.get("refit_full", True),
                         random_state=model_cfg.get("seed", 0) if seed is None else seed, n_jobs=n_jobs)


def _resolve_folds(df: pd.DataFrame, task: TaskSpec, folds, cv: dict) -> np.ndarray:
    if folds is None:
        f = pd.to_numeric(df.get("fold", pd.Series(-1, index=df.index)), errors="coerce").fillna(-1)
        f = f.astype(int).to_numpy()
        if (f < 0).all():
            f = assign_folds(df, task, k=cv["k"], seed=cv["seed"])["fold"].to_numpy()
    else:
        f = np.asarray(folds, dtype=int)
        if f.shape != (len(df),):
            raise ManifestError(f"folds must have one entry per manifest row ({len(df)}), got shape {f.shape}")
    if (f < 0).any():
        raise ManifestError(f"{int((f < 0).sum())} labelled lesion(s) have no fold (-1); run `dermfusion folds` "
                            "or pass folds=")
    if len(np.unique(f)) < 2:
        raise ManifestError("cross-validation needs at least 2 folds")
    return f


def evaluate_oof(probs: np.ndarray, y_true: np.ndarray, folds: np.ndarray, task: TaskSpec,
                 eval_size: int | None = None) -> dict:
    """OOF metrics: official score as is, nested cut-tuned estimate, balanced accuracy, macro-F1, log loss."""
    y_idx = y_true.argmax(1)
    per = _met.per_class_dice(y_true, probs)
    official = float(per.mean())
    out = {"official_raw": official, "balanced_accuracy": _met.balanced_accuracy(y_idx, probs),
           "macro_f1": _met.macro_f1(y_idx, probs), "log_loss": _met.log_loss(y_idx, probs),
           "n": int(len(probs))}
    if task.metric == "milk10k_dice":
        nested = _cal.nested_cut_estimate(probs, y_true, folds, eval_size=eval_size)
        out["nested_cut_score"] = nested["score"]
        out["nested_per_class"] = dict(zip(task.classes, nested["per_class"]))
    return out


def oof_frame(lesion_ids, folds, probs, task: TaskSpec) -> pd.DataFrame:
    df = pd.DataFrame(probs, columns=list(task.classes))
    df.insert(0, "fold", np.asarray(folds, int))
    df.insert(0, "lesion_id", list(lesion_ids))
    return df


def _bundle_config(cfg: dict, task: TaskSpec, spec: TabularFeatureSpec, **extra) -> dict:
    return {"kind": "tabular", "task": task.name, "name": cfg["name"], "backend": cfg["model"]["backend"],
            "features": spec.to_dict(), "model": cfg["model"], **extra}


def train_tabular_cv(cfg: dict, manifest_df: pd.DataFrame, task: str | TaskSpec, out_dir: str | Path,
                     folds=None, refit: bool = True, verbose: bool = True) -> dict:
    """Per-fold models + OOF probabilities + calibrated full-data refit bundle. Returns a summary dict."""
    cfg = validate_config(cfg)
    task = get_task(task) if isinstance(task, str) else task
    cfg["task"] = task.name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not has_labels(manifest_df, task):
        raise ManifestError(f"train_tabular_cv needs a labelled manifest with {', '.join(task.label_columns())}")
    df = manifest_df.reset_index(drop=True)
    f = _resolve_folds(df, task, folds, cfg["cv"])
    y_true = targets(df, task)
    y = y_true.argmax(1)
    spec = TabularFeatureSpec.from_manifest(df, modalities=task.modalities, **cfg["features"])
    X = spec.transform(df)
    t0 = time.time()
    oof = np.zeros((len(df), task.num_classes))
    fold_paths, fold_metrics, rounds = [], {}, []
    for k in sorted(np.unique(f)):
        tr, te = f != k, f == k
        expert = make_expert(cfg["model"], task, cfg["n_jobs"]).fit(X[tr], y[tr])
        oof[te] = expert.predict_proba(X[te])
        rounds.append(expert.best_iteration_)
        m = {"fold": int(k), "n_train": int(tr.sum()), "n_valid": int(te.sum()), "rounds": expert.best_iteration_,
             "official_raw": _met.milk10k_score(y_true[te], oof[te]),
             "balanced_accuracy": _met.balanced_accuracy(y[te], oof[te])}
        fold_metrics[int(k)] = m
        path = out / "folds" / f"fold{k}"
        write_bundle(path, config=_bundle_config(cfg, task, spec, fold=int(k)), write_model=expert.save,
                     calibration={}, metrics=m)
        fold_paths.append(str(path))
        if verbose:
            print(f"[tabular] fold {k}: rounds={expert.best_iteration_} official_raw={m['official_raw']:.4f} "
                  f"bacc={m['balanced_accuracy']:.4f}", flush=True)
    oof_df = oof_frame(df["lesion_id"], f, oof, task)
    oof_df.to_csv(out / "oof.csv", index=False)
    eval_size = (cfg.get("calibration") or {}).get("eval_size")
    metrics = evaluate_oof(oof, y_true, f, task, eval_size)
    calib = _cal.fit_calibration(oof, y_true, task.metric, eval_size=eval_size)
    metrics["calibrated_official_on_oof"] = _met.milk10k_score(y_true, calib.apply(oof, rescale_cuts=True)) \
        if calib.cuts is not None else None  # optimistic: cuts tuned on these rows; see nested_cut_score
    metrics["folds"] = fold_metrics
    summary = {"name": cfg["name"], "task": task.name, "out_dir": str(out), "oof": str(out / "oof.csv"),
               "fold_bundles": fold_paths, "metrics": metrics, "calibration": calib.to_dict(),
               "n_features": len(spec.columns), "seconds_cv": time.time() - t0}
    if refit:
        model_cfg = dict(cfg["model"])
        expert = make_expert(model_cfg, task, cfg["n_jobs"]).fit(X, y)
        write_bundle(out / "bundle", config=_bundle_config(cfg, task, spec, fold=-1), write_model=expert.save,
                     calibration=calib.to_dict(), metrics={k: v for k, v in metrics.items() if k != "folds"})
        summary["bundle"] = str(out / "bundle")
    summary["seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    write_run_cards(out, manifest=df, strict=False)  # model_card.{json,md,html} in each bundle (not hashed)
    if verbose and "nested_cut_score" in metrics:
        print(f"[tabular] OOF nested cut-tuned score {metrics['nested_cut_score']:.4f} "
              f"(raw {metrics['official_raw']:.4f}, bacc {metrics['balanced_accuracy']:.4f})", flush=True)
    return summary
