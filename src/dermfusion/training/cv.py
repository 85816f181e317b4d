"""Cross-validation: every fold in one command, out-of-fold probabilities for every training lesion,
per-fold bundles, calibration fitted on the out-of-fold predictions and written into each bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..config import ExperimentConfig
from ..console import console
from ..data.manifest import ManifestError, targets
from ..tasks import get_task


def parse_folds(spec: str | None, df: pd.DataFrame, cfg: ExperimentConfig) -> list[int]:
    available = sorted(int(f) for f in df["fold"].unique() if f >= 0)
    if not available:
        raise ManifestError("the manifest has no folds: run `dermfusion folds MANIFEST --k 5` first")
    if spec in (None, "", "all"):
        return cfg.cv.folds if cfg.cv.folds is not None and spec is None else available
    if spec == "full":
        return [-1]
    folds = [int(x) for x in spec.split(",")]
    bad = [f for f in folds if f not in available and f != -1]
    if bad:
        raise ManifestError(f"fold(s) {bad} not in the manifest (it has {available})")
    return folds


def train_cv(cfg: ExperimentConfig, df: pd.DataFrame, out: str | Path, folds: str | None = None,
             profile: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    task = get_task(cfg.task)
    if cfg.model.kind == "tabular":
        from ..tabular.train import train_tabular_cv

        return train_tabular_cv(cfg.model_dump(), df, task, out, folds=parse_folds(folds, df, cfg))
    from .engine import FoldTrainer

    fold_ids = parse_folds(folds, df, cfg)
    results = []
    for f in fold_ids:
        console.rule(f"fold {f}" if f >= 0 else "full-data refit")
        results.append(FoldTrainer(cfg, task, df, f, out / (f"fold_{f}" if f >= 0 else "full"), profile=profile).run())
    summary: dict = {"task": task.name, "folds": fold_ids,
                     "bundles": [str(r.bundle.relative_to(out)) for r in results],
                     "per_fold": {r.fold: r.metrics for r in results}}
    oofs = [r.oof for r in results if len(r.oof)]
    if oofs:
        oof = pd.concat(oofs, ignore_index=True)
        oof.to_csv(out / "oof.csv", index=False)
        summary.update(_oof_summary(cfg, task, df, oof, out, [r.bundle for r in results]))
    if profile:
        summary["profile"] = {r.fold: _profile(r.history) for r in results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _profile(history: list[dict]) -> dict:
    data = sum(h["data_wait_s"] for h in history)
    comp = sum(h["compute_s"] for h in history)
    return {"data_wait_s": data, "compute_s": comp, "data_wait_frac": data / max(data + comp, 1e-9)}


def _oof_summary(cfg, task, df, oof, out, bundles) -> dict:
    from ..evaluation.calibration import fit_calibration
    from ..evaluation.metrics import balanced_accuracy, macro_f1, official_score
    from ..inference.bundle import update_calibration

    lab = df.set_index("lesion_id").loc[oof["lesion_id"]].reset_index()
    y = targets(lab, task)
    p = oof[list(task.classes)].to_numpy()
    res = {"oof": {"n": len(oof), "official": float(official_score(task, y, p)),
                   "balanced_accuracy": float(balanced_accuracy(y, p)), "macro_f1": float(macro_f1(y, p))}}
    cc = cfg.calibration
    cuts = cc.get("cuts", "auto")
    cuts = (task.metric == "milk10k_dice") if cuts == "auto" else bool(cuts)
    kw = {"temperature": bool(cc.get("temperature", True)), "cuts": cuts,
          "logit_adjust": cfg.train.logit_adjustment_tau > 0}
    calib, report = fit_calibration(task, y, p, oof["fold"].to_numpy(), **kw)
    calib_d = calib.to_dict()
    for b in bundles:
        update_calibration(b, calib_d)
    res["calibration"] = {"fitted": calib_d, "report": report}
    console.print(f"[bold]out-of-fold[/] ({len(oof)} lesions): official {res['oof']['official']:.4f} · "
                  f"balanced accuracy {res['oof']['balanced_accuracy']:.4f} · macro-F1 {res['oof']['macro_f1']:.4f}")
    return res
