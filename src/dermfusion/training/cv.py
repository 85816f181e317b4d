"""Cross-validation: every fold in one command, out-of-fold probabilities for every training lesion,
per-fold bundles, calibration fitted on the out-of-fold predictions and written into each bundle.

Under torchrun: by default every fold is trained data-parallel by all ranks (DDP, see ``engine``);
with ``fold_parallel=True`` each rank trains its own folds (``folds[rank::world]``) as an ordinary
single-process run on its own device, and rank 0 gathers the out-of-fold predictions and fits the
calibration once. Either way rank 0 alone writes oof.csv / summary.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..card import write_run_cards
from ..config import ConfigError, ExperimentConfig, member_configs
from ..console import console
from ..data.manifest import ManifestError, targets, train_only_mask
from ..evaluation.calibration import Calibration
from ..evaluation.drift_reference import compute_reference_stats, write_reference_stats
from ..evaluation.embedding_reference import EmbeddingReferenceError
from ..inference import load_predictor
from ..inference.familiarity import write_familiarity_reference
from ..models.registry import check_model_settings
from ..runtime.device import compute_threads
from ..runtime.distributed import current, run_collectively
from ..tabular.train import train_tabular_cv
from ..tasks import get_task
from .engine import FoldTrainer
from .lesion_record import write_training_lesions
from .run_calibration import calibrate_run, write_calibrated_oof
from .tracking import check_tracking, log_run, tracking_uri
from .val_metrics import epoch_metrics


def parse_folds(spec: str | None, df: pd.DataFrame, cfg: ExperimentConfig) -> list[int]:
    available = sorted(int(f) for f in df.loc[~train_only_mask(df), "fold"].unique() if f >= 0)
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
             profile: bool = False, *, fold_parallel: bool = False, dist=None) -> dict:
    ctx = dist if dist is not None else current()
    out = Path(out)
    if cfg.model.kind != "tabular":  # a misspelt model setting fails before anything is written
        members = member_configs(cfg)  # an ensemble recipe's members (or the config itself), all checked up front
        for m in members:
            check_model_settings(m.model.name, m.model_kwargs())
        check_tracking(cfg)  # tracking on but mlflow missing: fail before training, not after
    task = get_task(cfg.task)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    if cfg.model.kind == "tabular":
        if ctx.distributed:
            raise ConfigError("tabular models train in one process: run `dermfusion train` without torchrun")

        parse_folds(folds, df, cfg)  # validates the manifest's folds; the tabular stage trains all of them
        write_training_lesions(out, df, task, [-1])
        summary = train_tabular_cv(cfg.model_dump(), df, task, out)
        # the same posterior / balanced rule / decisions as a network run, from the experts' out-of-fold output,
        # into the fold bundles and the refit (so every calibration key of the config is honoured)
        oof = pd.read_csv(out / "oof.csv", dtype={"lesion_id": str})
        lab = df.set_index("lesion_id").loc[oof["lesion_id"]].reset_index()
        bundles = [Path(p) for p in summary["fold_bundles"]] + ([Path(summary["bundle"])] if summary.get("bundle") else [])
        weighting = (cfg.model_dump().get("model") or {}).get("class_weight")  # the experts' class weights: their prior
        power = {"sqrt": 0.5, "balanced": 1.0}.get(weighting, 0.0)
        summary["calibration"] = calibrate_run(cfg.calibration, task, targets(lab, task), oof, bundles, power)
        write_calibrated_oof(task, oof, summary["calibration"]["fitted"], out / "oof_calibrated.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        write_run_cards(out, manifest=df, strict=False)  # the cards train_tabular_cv wrote predate this calibration
        return summary

    fold_ids = parse_folds(folds, df, cfg)
    if ctx.is_main:
        write_training_lesions(out, df, task, fold_ids)
    with compute_threads(cfg.train.threads):
        return _train_network_cv(cfg, members, task, df, out, fold_ids, profile, fold_parallel, ctx)


def _train_folds(cfg, task, df, out: Path, fold_ids: list[int], profile: bool, fold_parallel: bool, ctx) -> list:
    if fold_parallel and ctx.distributed:
        return _train_fold_parallel(cfg, task, df, fold_ids, out, profile, ctx)
    results = []
    for f in fold_ids:
        if ctx.is_main:
            console.rule(f"fold {f}" if f >= 0 else "full-data refit")
        results.append(FoldTrainer(cfg, task, df, f, _fold_dir(out, f), profile=profile, dist=ctx).run())
    return results


def _train_network_cv(cfg, members, task, df, out: Path, fold_ids: list[int], profile: bool, fold_parallel: bool,
                      ctx) -> dict:
    """Every member's folds (one member: the config itself, straight into ``out``; several: ``out/member_<i>``),
    then one summary: the bundles of all members, the members' out-of-fold probabilities averaged per lesion
    (as ``predict RUN`` averages the bundles) and one calibration fitted on them, written into every bundle."""
    per_member = []
    for i, mcfg in enumerate(members):
        if ctx.is_main and len(members) > 1:
            console.rule(f"[bold]ensemble member {i + 1}/{len(members)}[/]")
        mout = out if len(members) == 1 else out / f"member_{i}"
        per_member.append(_train_folds(mcfg, task, df, mout, fold_ids, profile, fold_parallel, ctx))
    results = [r for rs in per_member for r in rs]
    summary: dict = {"task": task.name, "folds": fold_ids,
                     "bundles": [str(r.bundle.relative_to(out)) for r in results],
                     "per_fold": {r.fold: r.metrics for r in per_member[0]}}
    if len(members) > 1:
        summary["per_member"] = [{r.fold: r.metrics for r in rs} for rs in per_member]
    if ctx.distributed:
        summary["world_size"] = ctx.world_size
        summary["mode"] = "fold_parallel" if fold_parallel else "data_parallel"
    if ctx.is_main:  # one writer for the run's files and the calibration written into the bundles
        oofs = [pd.concat([r.oof for r in rs if len(r.oof)], ignore_index=True)
                for rs in per_member if any(len(r.oof) for r in rs)]
        if oofs:
            oof = average_oof(oofs, task)
            oof.to_csv(out / "oof.csv", index=False)
            summary.update(_oof_summary(cfg, task, df, oof, out, [r.bundle for r in results]))
        else:
            console.print("[yellow]a full-data refit has no out-of-fold predictions: its posteriors follow Bayes' rule "
                          "from the training prior (temperature 1, not fitted) and it carries no operating point or "
                          "conformal differential (the service falls back to built-in cut-offs). Fit them on a "
                          "cross-validated run of the same recipe: `dermfusion calibrate "
                          f"{out} --manifest MANIFEST --evidence RUN_CV`[/]")
        write_familiarity_references(df, results)
        if profile:
            summary["profile"] = {r.fold: _profile(r.history) for r in per_member[0]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        write_run_cards(out, manifest=df, strict=False)  # model_card.{json,md,html} in each bundle (not hashed)
        run_id = log_run(cfg, task, df, out, summary)  # MLflow, when tracking.mlflow is on
        if run_id:
            console.print(f"MLflow run {run_id} → {tracking_uri(cfg, out)}")
    ctx.barrier()
    return summary


def average_oof(oofs: list[pd.DataFrame], task) -> pd.DataFrame:
    """Several members' out-of-fold frames (lesion_id, fold, classes) → one, probabilities averaged per lesion."""
    if len(oofs) == 1:
        return oofs[0]
    classes = list(task.classes)
    first = oofs[0].set_index("lesion_id")
    mean = sum(o.set_index("lesion_id").loc[first.index, classes].to_numpy() for o in oofs) / len(oofs)
    out = first.copy()
    out[classes] = mean
    return out.reset_index()


def _fold_dir(out: Path, fold: int) -> Path:
    return out / (f"fold_{fold}" if fold >= 0 else "full")


def _train_fold_parallel(cfg, task, df, fold_ids, out, profile, ctx) -> list:
    """Each rank trains folds[rank::world] on its own device, no DDP; every rank's results gathered (fold order).

    A failure on one rank is reported on every rank (rank and error) once the others reach the gather."""
    mine = fold_ids[ctx.rank::ctx.world_size]
    solo = ctx.solo()

    def work() -> list:
        res = []
        for f in mine:
            console.rule(f"fold {f} (rank {ctx.rank})" if f >= 0 else f"full-data refit (rank {ctx.rank})")
            res.append(FoldTrainer(cfg, task, df, f, _fold_dir(out, f), profile=profile, dist=solo).run())
        return res

    per_rank = run_collectively(ctx, work, what="fold-parallel training")
    by_fold = {r.fold: r for rank_results in per_rank for r in rank_results}
    return [by_fold[f] for f in fold_ids]


def _profile(history: list[dict]) -> dict:
    """Where a fold's training time went: pipeline start-up (the fold's first batch: loader built, worker
    processes forked, first images decoded — once per fold, later epochs' batches are prefetched), then
    waiting for input vs computing. ``data_wait_frac`` leaves the start-up out, ``input_bound_frac`` counts it."""
    data = sum(h["data_wait_s"] for h in history)
    comp = sum(h["compute_s"] for h in history)
    start = sum(h.get("startup_s", 0.0) for h in history)
    last = history[-1] if history else {}
    return {"startup_s": start, "data_wait_s": data, "compute_s": comp,
            "loader_workers": last.get("loader_workers"), "compute_threads": last.get("compute_threads"),
            "data_wait_frac": data / max(data + comp, 1e-9),
            "input_bound_frac": (start + data) / max(start + data + comp, 1e-9)}


def _oof_summary(cfg, task, df, oof, out, bundles) -> dict:
    lab = df.set_index("lesion_id").loc[oof["lesion_id"]].reset_index()
    y = targets(lab, task)
    p = oof[list(task.classes)].to_numpy()
    res = {"oof": {"n": len(oof), **epoch_metrics(task, y, p)}}
    console.print(f"[bold]out-of-fold[/] ({len(oof)} lesions): official {res['oof']['official']:.4f} · "
                  f"balanced accuracy {res['oof']['balanced_accuracy']:.4f} · macro-F1 {res['oof']['macro_f1']:.4f}")
    res["calibration"] = calibrate_run(cfg.calibration, task, y, oof, bundles, cfg.train.sampler_power,
                                       class_counts=training_class_counts(df, task, oof["fold"].unique()))
    write_calibrated_oof(task, oof, res["calibration"]["fitted"], out / "oof_calibrated.csv")
    write_drift_references(task, lab, oof, bundles, res["calibration"]["fitted"])
    return res


def write_familiarity_references(df: pd.DataFrame, results, max_rows: int = 1000) -> None:
    """Each network bundle gets the "cannot assess" gate's familiarity reference (``embedding_reference.npz``):
    a fold bundle from its validation lesions, a full-data refit from (a sample of) its training lesions. A model
    whose encoder has no known layers, or too few lesions, gets none — the service then says the check is off."""
    for r in results:
        rows = df[df["fold"] == r.fold] if r.fold >= 0 else df
        if len(rows) > max_rows:
            rows = rows.sample(n=max_rows, random_state=0)
        source = f"validation fold {r.fold}" if r.fold >= 0 else "training lesions (in-sample)"
        try:
            ref = write_familiarity_reference(r.bundle, rows, source)
        except (EmbeddingReferenceError, ValueError, RuntimeError) as e:
            console.print(f"[yellow]no familiarity reference for {r.bundle}:[/] {e}")
            continue
        if ref is not None:
            console.print(f"familiarity reference: {ref['n']} lesions ({source}) → {r.bundle}/embedding_reference.npz")


def write_drift_references(task, lab: pd.DataFrame, oof: pd.DataFrame, bundles, calibration: dict) -> None:
    """Each fold bundle gets the input / output statistics of its validation lesions (drift_reference.json),
    from the out-of-fold posteriors — the service compares live traffic against them."""
    calib = Calibration.from_dict(calibration)
    for b in bundles:
        fold = load_predictor(b)
        rows = (oof["fold"] == fold.bundle.config.get("fold", -2)).to_numpy()
        if not rows.any():
            continue
        probs = calib.posterior(oof.loc[rows, list(task.classes)].to_numpy())
        write_reference_stats(b, compute_reference_stats(fold, lab[rows].reset_index(drop=True), probs=probs))


def training_class_counts(df: pd.DataFrame, task, folds) -> np.ndarray:
    """Class counts of what the fold models trained on: for each fold, the labelled rows of the other folds,
    summed (all k folds of a run: proportional to the whole manifest; one fold: that fold's training rows — the
    prior its sampler drew from, which the held-out fold's own counts need not match, e.g. Derm7pt's official
    validation split)."""
    counts = np.zeros(task.num_classes)
    extra = train_only_mask(df)
    for f in folds:
        rows = df[((df["fold"] >= 0) & (df["fold"] != int(f))) | extra]
        counts += np.nan_to_num(targets(rows, task).astype(float)).sum(0)
    return counts
