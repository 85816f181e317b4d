"""Verbs that work on finished runs: ``calibrate`` (refit a run's calibration), ``stack``, ``ensemble``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from ..console import console
from .common import fail

if TYPE_CHECKING:
    import pandas as pd


def run_oof_and_bundle(run: Path) -> tuple[pd.DataFrame, Path]:
    """A run directory's out-of-fold predictions and the bundle that stands for it."""
    import pandas as pd  # the CLI imports the data stack when a verb runs

    oof = run / "oof.csv"
    if not oof.exists():
        fail(f"{run} has no oof.csv: pass run directories written by `dermfusion train`")
    from ..bundle import resolve_run, write_average_bundle

    average = run / "bundle"
    if not (average / "config.yaml").exists() or _stale_average(average, resolve_run(run)):
        write_average_bundle(run, resolve_run(run))
    return pd.read_csv(oof, dtype={"lesion_id": str}), average


def _stale_average(average: Path, fold_bundles: list[Path]) -> bool:
    """RUN/bundle is an ``average`` of other fold bundles than the run now lists (the run was extended with more
    folds after an ensemble or stack named it)."""
    import yaml

    cfg = yaml.safe_load((average / "config.yaml").read_text()) or {}
    if cfg.get("kind") != "average":
        return False  # a tabular run's calibrated refit
    listed = [(average / m["path"]).resolve() for m in cfg.get("members") or []]
    return listed != [Path(b).resolve() for b in fold_bundles]


def _labelled(manifest: Path, task):
    from ..data.manifest import load_manifest, targets

    df = load_manifest(manifest)
    df = df[df[task.label_columns()].notna().all(axis=1)].reset_index(drop=True) if all(
        c in df.columns for c in task.label_columns()) else fail(f"{manifest} has no labels for {task.name}")
    return df, targets(df, task)


def calibrate_cmd(run: Path = typer.Argument(..., help="run directory (oof.csv + fold bundles, or a full-data refit)"),
                  manifest: Path = typer.Option(..., help="the labelled training manifest"),
                  evidence: Optional[Path] = typer.Option(
                      None, help="a cross-validated run of the same recipe whose out-of-fold predictions stand in "
                                 "for RUN's: for a full-data refit (--folds full), which has none of its own")):
    """(Re-)fit a run's posterior calibration and decision rules (operating point, conformal differential) on its
    out-of-fold predictions and write them into its bundles; refresh the drift baseline.

    A full-data refit has no out-of-fold predictions: name a cross-validated run of the same recipe on the same
    manifest with --evidence (e.g. `--folds 0` for Derm7pt's validation split) and its fold models' out-of-fold
    predictions are what the refit's calibration, operating point and conformal set are fitted on."""
    import pandas as pd  # the CLI imports the data stack when a verb runs

    import yaml

    from ..bundle import run_bundles
    from ..card import write_run_cards
    from ..config import ExperimentConfig
    from ..data.manifest import load_manifest, targets
    from ..evaluation.calibration import training_prior
    from ..tasks import get_task
    from ..training.cv import calibrate_run, training_class_counts, write_calibrated_oof, write_drift_references
    from ..training.run_calibration import recipe_differences

    cfg = ExperimentConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    task = get_task(cfg.task)
    source = evidence or run
    if not (source / "oof.csv").is_file():
        if evidence is not None:
            fail(f"{evidence} has no oof.csv: --evidence takes a cross-validated run (`dermfusion train … --folds 0` "
                 "or more folds), not a full-data refit")
        fail(f"{run} has no out-of-fold predictions (oof.csv): a full-data refit (--folds full) has no lesions it "
             f"did not train on. Train the same recipe with held-out folds and name that run: `dermfusion calibrate "
             f"{run} --manifest {manifest} --evidence RUN_CV`")
    src_cfg = cfg
    if evidence is not None:
        src_cfg = ExperimentConfig.model_validate(yaml.safe_load((evidence / "config.yaml").read_text()))
        if src_cfg.task != cfg.task:
            fail(f"{evidence} is a {src_cfg.task} run, {run} a {cfg.task} run: the evidence must be the same task")
        for d in recipe_differences(src_cfg.model_dump(), cfg.model_dump()):
            console.print(f"[yellow]the evidence run differs from {run}: {d}[/]")
    oof = pd.read_csv(source / "oof.csv", dtype={"lesion_id": str})
    full = load_manifest(manifest)
    missing = set(oof["lesion_id"]) - set(full["lesion_id"])
    if missing:
        fail(f"{len(missing)} out-of-fold lesions of {source} are not in {manifest} (e.g. {sorted(missing)[0]}): "
             "name the manifest the run trained on")
    df = full.set_index("lesion_id").loc[oof["lesion_id"]].reset_index()
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    bundles, _ = run_bundles(run)  # every bundle of the run (RUN/bundle too): each predicts with the run's calibration
    # the prior the evidence models trained under: the sampler's (networks) or the experts' class weights (tabular)
    weighting = (src_cfg.model_dump().get("model") or {}).get("class_weight")
    power = src_cfg.train.sampler_power if src_cfg.model.kind != "tabular" else \
        {"sqrt": 0.5, "balanced": 1.0}.get(weighting, 0.0)
    res = calibrate_run(cfg.calibration, task, targets(df, task), oof, bundles, power,
                        class_counts=training_class_counts(full, task, oof["fold"].unique()),
                        evidence=None if evidence is None else str(evidence),
                        bundle_sampling_prior=None if evidence is None or cfg.model.kind == "tabular" else
                        training_prior(training_class_counts(full, task, [-1]), cfg.train.sampler_power))
    summary["calibration"] = res
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if evidence is not None:  # the refit's record of what it was fitted on; its cards have no out-of-fold section
        console.print(f"fitted on the {len(oof)} out-of-fold predictions of {evidence} (its fold models, not {run}'s "
                      "model: the refit trained on more lesions, so its posteriors may be a little sharper than "
                      "those the calibration was fitted on)")
        write_run_cards(run, manifest=manifest, strict=False)  # the cards' calibration section follows the refit
        return
    write_calibrated_oof(task, oof, res["fitted"], run / "oof_calibrated.csv")
    if cfg.model.kind != "tabular":  # the drift baseline describes the posteriors the bundles now give
        write_drift_references(task, df, oof, [b for b in bundles if (b / "model.safetensors").is_file()],
                               res["fitted"])
    write_run_cards(run, manifest=manifest, strict=False)  # the cards' calibration section follows the refit


def _members(runs: list[Path], task_name: Optional[str]):
    from ..tasks import get_task
    from ..bundle import read_bundle

    frames, bundles = zip(*[run_oof_and_bundle(r) for r in runs])
    task = get_task(task_name) if task_name else read_bundle(bundles[0]).task
    return list(frames), list(bundles), task


def stack_cmd(runs: List[Path] = typer.Argument(..., help="run directories with oof.csv"),
              manifest: Path = typer.Option(..., help="the labelled training manifest (with folds)"),
              out: Path = typer.Option(..., help="stack bundle directory"),
              use_concepts: bool = typer.Option(False, help="also feed concept scores to the meta-model"),
              use_metadata: bool = typer.Option(False, help="also feed age to the meta-model"),
              task: Optional[str] = typer.Option(None)):
    """Fold-aware stacking: a meta-model on the runs' out-of-fold probabilities (never on a row's own fold)."""
    from ..tabular.ensemble import compare_table
    from ..tabular.stacking import fit_stack, write_stack_bundle

    frames, bundles, t = _members(runs, task)
    df, y = _labelled(manifest, t)
    ids = set.intersection(*[set(f["lesion_id"]) for f in frames])
    df = df[df["lesion_id"].isin(ids)].reset_index(drop=True)
    y = y[df.index] if len(y) == len(df) else _labelled_targets(df, t)
    names = [r.name for r in runs]
    res = fit_stack(frames, df, t, names=names, use_concepts=use_concepts, use_metadata=use_metadata)
    from ..tabular.stacking import align_oof
    oofs = {n: align_oof(f, df["lesion_id"], t, n) for n, f in zip(names, frames)}
    oofs["stack"] = res.oof[list(t.classes)].to_numpy()
    compare_table(oofs, y, df["fold"].to_numpy(), t, title="out-of-fold: members vs stack")
    write_stack_bundle(out, res, bundles, t)
    _write_oof(out, res.oof, runs)
    _decisions(out, runs, t, y, res.oof[list(t.classes)].to_numpy(), df["fold"].to_numpy())
    console.print(f"[green]wrote[/] stack bundle {out}")


def _labelled_targets(df, task):
    from ..data.manifest import targets
    return targets(df, task)


def ensemble_cmd(runs: List[Path] = typer.Argument(..., help="run directories with oof.csv"),
                 manifest: Path = typer.Option(..., help="the labelled training manifest (with folds)"),
                 out: Path = typer.Option(..., help="ensemble bundle directory"),
                 objective: str = typer.Option("auto", help="weights maximise: logloss | official, or equal "
                                               "weights: equal (auto: logloss when cuts are tuned afterwards, "
                                               "i.e. MILK10k, or when the members are network runs)"),
                 eval_size: Optional[int] = typer.Option(None, help="size of the set the submission is scored on "
                                                         "(MILK10k: a class too rare to appear there is left unpredicted)"),
                 task: Optional[str] = typer.Option(None)):
    """Weights on the simplex searched on out-of-fold predictions, then calibration fitted on the blend.

    Network runs (their raw output is under their samplers' class prior) get a run's calibration on the blend: the
    posteriors, the balanced rule and the decision rules, with the first run's `calibration` settings."""
    import numpy as np
    import pandas as pd  # the CLI imports the data stack when a verb runs

    from ..evaluation.calibration import calibrate_oof
    from ..evaluation.metrics import log_loss, official_score
    from ..tabular.ensemble import blend, compare_table, search_weights, write_ensemble_bundle
    from ..tabular.stacking import align_oof

    frames, bundles, t = _members(runs, task)
    labelled, _ = _labelled(manifest, t)
    ids = set.intersection(*[set(f["lesion_id"]) for f in frames])
    df = labelled[labelled["lesion_id"].isin(ids)].reset_index(drop=True)
    y = _labelled_targets(df, t)
    folds = df["fold"].to_numpy()
    names = [r.name for r in runs]
    probs = [align_oof(f, df["lesion_id"], t, n) for n, f in zip(names, frames)]
    networks = all(_is_network_run(r) for r in runs)
    if objective == "auto":
        objective = "logloss" if t.metric == "milk10k_dice" or networks else "official"
    if objective not in ("logloss", "official", "equal"):
        fail(f"--objective {objective!r}: use logloss, official or equal")
    metric = (lambda yt, p: -log_loss(yt, p)) if objective == "logloss" else (lambda yt, p: official_score(t, yt, p))
    w = np.full(len(probs), 1 / len(probs)) if objective == "equal" else search_weights(probs, y, metric)[0]
    ens = blend(probs, w)
    frame = pd.DataFrame(ens, columns=list(t.classes))  # the blend's out-of-fold output, as a run's oof.csv
    frame.insert(0, "fold", folds)
    frame.insert(0, "lesion_id", df["lesion_id"].to_numpy())
    if networks:
        _calibrate_network_blend(out, runs, bundles, w, names, t, labelled, y, frame, objective, probs)
        return
    calib, report = calibrate_oof(t, y, ens, folds, eval_size=eval_size)
    compare_table({**dict(zip(names, probs)), "ensemble": ens}, y, folds, t,
                  title="out-of-fold: members vs ensemble", eval_size=eval_size)
    console.print("weights: " + ", ".join(f"{n} {wi:.3f}" for n, wi in zip(names, w)))
    if "nested_cut_score" in report:
        console.print(f"ensemble nested cut-tuned official score (OOF): {report['nested_cut_score']:.4f}")
    write_ensemble_bundle(out, bundles, w, t, names=names, calibration=calib.to_dict(),
                          metrics={"objective": objective, **{k: v for k, v in report.items() if k != "nested_per_class"}})
    _write_oof(out, frame, runs)
    _decisions(out, runs, t, y, ens, folds)
    console.print(f"[green]wrote[/] ensemble bundle {out}")


def _is_network_run(run: Path) -> bool:
    """A run written by `dermfusion train` for a network (not a tabular expert, not a combined bundle)."""
    import yaml

    cfg = run / "config.yaml"
    model = ((yaml.safe_load(cfg.read_text()) or {}).get("model") or {}) if cfg.exists() else {}
    return bool(model) and model.get("kind", "network") != "tabular" and (run / "summary.json").exists()


def _calibrate_network_blend(out: Path, runs: list[Path], bundles, w, names, task, labelled, y, frame,
                             objective: str, probs) -> None:
    """The blend of network runs calibrated as one run is (``training.run_calibration.calibrate_run``): posteriors
    fitted on the blend's out-of-fold output, the balanced rule, the operating point and the conformal differential,
    written into the ensemble bundle; ``oof.csv`` / ``oof_calibrated.csv`` / ``oof_balanced.csv`` and the report
    (``metrics.json``) in it, none of them hashed."""
    import numpy as np
    import yaml

    from ..bundle import read_bundle
    from ..config import ExperimentConfig
    from ..evaluation.calibration import Calibration
    from ..evaluation.metrics import balanced_accuracy, log_loss
    from ..tabular.ensemble import write_ensemble_bundle
    from ..training.cv import training_class_counts
    from ..training.run_calibration import calibrate_run, write_calibrated_oof

    cfgs = [ExperimentConfig.model_validate(yaml.safe_load((r / "config.yaml").read_text())) for r in runs]
    powers = {c.train.sampler_power for c in cfgs}
    if len(powers) > 1 and cfgs[0].calibration.posterior != "bias_temperature":
        fail(f"the runs sampled under different class priors (sampler_power {sorted(powers)}): their blend has no one "
             "sampling prior, so its posterior needs `calibration.posterior: bias_temperature` (fitted) in the first "
             f"run's config, not {cfgs[0].calibration.posterior!r}")
    write_ensemble_bundle(out, bundles, w, task, names=names, calibration={}, metrics={"objective": objective})
    _write_oof(out, frame, runs)
    counts = training_class_counts(labelled, task, np.unique(frame["fold"]))
    res = calibrate_run(cfgs[0].calibration, task, y, frame, [out], cfgs[0].train.sampler_power,
                        class_counts=counts)
    write_calibrated_oof(task, frame, res["fitted"], out / "oof_calibrated.csv")
    calibrations = [Calibration.from_dict(read_bundle(b).calibration) for b in bundles]
    calibrations.append(Calibration.from_dict(res["fitted"]))
    ens = frame[list(task.classes)].to_numpy()
    rows = [(n, c.balanced(p), c.posterior(p)) for n, p, c in zip([*names, "ensemble"], [*probs, ens], calibrations)]
    yi = y.argmax(1)
    console.print("out-of-fold, each member under its own run's calibration:")
    for n, bal, post in rows:
        console.print(f"  {n}: balanced accuracy (balanced rule) {balanced_accuracy(yi, bal):.4f} · "
                      f"log loss (posterior) {log_loss(yi, post):.4f}")
    console.print(f"weights ({objective}): " + ", ".join(f"{n} {wi:.3f}" for n, wi in zip(names, w)))
    # the calibration report beside the bundle's figures (metrics.json is not hashed: it changes no prediction)
    (out / "metrics.json").write_text(json.dumps({"objective": objective, "weights": dict(zip(names, map(float, w))),
                                                  "calibration": res}, indent=2, default=float))
    console.print(f"[green]wrote[/] ensemble bundle {out}")


def _write_oof(out: Path, frame, runs: list[Path]) -> None:
    """A blend's out-of-fold predictions beside its bundle, and the lesions its members trained on (their records'
    union: what `operating-point --local` refuses)."""
    from ..training.lesion_record import combine_training_lesions

    frame.to_csv(out / "oof.csv", index=False)
    combine_training_lesions(out, runs)


def _decisions(bundle: Path, runs: list[Path], task, y, raw, folds) -> None:
    """The combined bundle's decision rules (operating point, conformal differential), fitted on its own
    out-of-fold posteriors with the first member run's calibration settings (its targets and levels)."""
    import yaml

    from ..bundle import read_bundle
    from ..evaluation.calibration import Calibration
    from ..training.run_calibration import write_decisions

    cfg = yaml.safe_load((runs[0] / "config.yaml").read_text()) if (runs[0] / "config.yaml").exists() else {}
    posterior = Calibration.from_dict(read_bundle(bundle).calibration).posterior(raw)
    write_decisions(bundle, (cfg or {}).get("calibration") or {}, task, y.argmax(1), posterior, folds)
