"""``dermfusion operating-point``: choose the triage cut-offs on a run's out-of-fold posteriors for written targets,
show what they cost (with intervals), and write them into every bundle of the run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import fail


def operating_point_cmd(
    run: Path = typer.Argument(..., help="a cross-validated run directory (oof.csv + its bundles)"),
    manifest: Path = typer.Option(..., help="the labelled manifest the run was trained on (its out-of-fold labels)"),
    melanoma_sensitivity: float = typer.Option(0.95, help="share of melanomas to refer (routine or urgent)"),
    malignant_sensitivity: float = typer.Option(0.95, help="share of all malignant lesions (BCC, AKIEC … too) to "
                                                "refer; 0 = no such target (melanoma alone: other cancers may slip)"),
    max_urgent_rate: Optional[float] = typer.Option(0.10, help="ceiling on the share of lesions referred urgently"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what the cut-offs would do and draw the plot; "
                                 "write nothing into the bundles"),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for the intervals"),
):
    """Choose the triage operating point on out-of-fold posteriors for the targets, print sensitivity, specificity,
    referral and urgent rates with 95 % bootstrap intervals — in-sample and cross-validated (cut-offs chosen on the
    other folds) — write them into the run's bundles (decisions.json, covered by each bundle's hash) and draw
    operating_point.png."""
    import json

    import numpy as np
    import pandas as pd

    from ..bundle import read_bundle, run_bundles, update_decisions
    from ..data.manifest import load_manifest, targets
    from ..evaluation.calibration import Calibration
    from ..evaluation.decision_rules import choose_operating_point, operating_point_report

    if not (run / "oof.csv").is_file():
        fail(f"{run} has no oof.csv: an operating point is chosen on out-of-fold predictions (train with "
             "--folds all, not --folds full)")
    bundles, _ = run_bundles(run)
    first = read_bundle(bundles[0])
    task, cal = first.task, Calibration.from_dict(first.calibration)
    if cal.prior is None:
        fail(f"{run}'s calibration gives no posteriors (an older run): re-fit it first with "
             f"`dermfusion calibrate {run} --manifest {manifest}`")
    if not task.malignant:
        fail(f"task {task.name} has no malignant classes: nothing to refer")
    oof = pd.read_csv(run / "oof.csv", dtype={"lesion_id": str})
    lab = load_manifest(manifest).set_index("lesion_id")
    missing = [i for i in oof["lesion_id"] if i not in lab.index]
    if missing:
        fail(f"{len(missing)} out-of-fold lesions are not in {manifest} (e.g. {missing[0]}): give the run's manifest")
    y = targets(lab.loc[oof["lesion_id"]].reset_index(), task).argmax(1)
    post = cal.posterior(oof[list(task.classes)].to_numpy())
    targets_ = {"melanoma_sensitivity": melanoma_sensitivity,
                "malignant_sensitivity": malignant_sensitivity if malignant_sensitivity > 0 else None,
                "max_urgent_rate": max_urgent_rate}
    try:
        op = choose_operating_point(task, y, post, **targets_)
    except ValueError as e:
        fail(f"no operating point meets the targets: {e}")
    op["chosen_on"] = f"{len(y)} out-of-fold posteriors of {run}"
    op["out_of_fold"] = operating_point_report(task, y, post, op, folds=oof["fold"].to_numpy(), choose=targets_,
                                               n_boot=n_boot)
    _print_report(op)
    from ..training.run_calibration import melanoma_only_warning

    warning = melanoma_only_warning(op)
    if warning:
        console.print(f"[yellow]{warning}[/]")
    _plot(run / "operating_point.png", task, y, post, op)
    console.print(f"[green]wrote[/] {run / 'operating_point.png'}")
    if dry_run:
        return
    for b in bundles:
        dec = dict(read_bundle(b).decisions or {})
        dec["triage"] = op
        update_decisions(b, dec)
    (run / "operating_point.json").write_text(json.dumps(op, indent=1, default=float))
    console.print(f"[green]wrote[/] the operating point into {len(bundles)} bundle(s) (decisions.json, re-sealed) "
                  f"and {run / 'operating_point.json'}")


def _print_report(op: dict) -> None:
    from rich.table import Table

    rep = op["out_of_fold"]
    console.print(f"routine referral: risk ≥ {op['routine_risk']:.1f} or " +
                  (", ".join(f"P({c}) ≥ {v:.3f}" for c, v in op["routine_class_probability"].items()) or "—") +
                  "; urgent referral: " + (", ".join(f"P({c}) ≥ {v:.3f}" for c, v in
                                                      op["urgent_class_probability"].items()) or "—"))
    t = Table(title="on the out-of-fold lesions (95 % bootstrap intervals)")
    t.add_column("measure")
    t.add_column("in-sample (cut-offs chosen here)", justify="right")
    t.add_column("cross-validated (chosen on the other folds)", justify="right")
    names = [("melanoma_sensitivity", "melanoma sensitivity"), ("malignant_sensitivity", "malignant sensitivity"),
             ("specificity", "specificity (benign not referred)"), ("referral_rate", "referred (all lesions)"),
             ("urgent_rate", "urgent (all lesions)"), ("melanoma_urgent_sensitivity", "melanomas referred urgently")]
    cv, cvci = rep.get("cross_validated"), rep.get("cross_validated_ci95", {})
    for key, label in names:
        if key not in rep["in_sample"]:
            continue
        lo, hi = rep["ci95"][key]
        cell = f"{rep['in_sample'][key]:.3f} [{lo:.3f}, {hi:.3f}]"
        cv_cell = f"{cv[key]:.3f} [{cvci[key][0]:.3f}, {cvci[key][1]:.3f}]" if cv else "—"
        t.add_row(label, cell, cv_cell)
    console.print(t)


def _plot(path: Path, task, y, post, op) -> None:
    """Melanoma sensitivity against the share of benign lesions referred, as the P(MEL) cut moves (risk cut
    fixed), with the chosen point; the urgent rate on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..evaluation.decision_rules import triage_levels, triage_rates

    fig, ax = plt.subplots(1, 1, figsize=(5.5, 4.2), dpi=110)
    cuts = np.unique(np.r_[np.quantile(post[:, task.classes.index("MEL")], np.linspace(0, 1, 120)), 1.01]) \
        if "MEL" in task.classes else []
    xs, ys = [], []
    for c in cuts:
        lv = triage_levels(task, post, {**op, "routine_class_probability": {"MEL": float(c)}})
        r = triage_rates(task, y, lv)
        xs.append(r["benign_referral_rate"])
        ys.append(r.get("melanoma_sensitivity", r["malignant_sensitivity"]))
    ax.plot(xs, ys, color="#2b6cb0", label="P(MEL) cut moves (risk cut fixed)")
    r = op["out_of_fold"]["in_sample"]
    ax.scatter([r["benign_referral_rate"]], [r.get("melanoma_sensitivity", r["malignant_sensitivity"])], color="#c53030",
               zorder=3, label="chosen operating point")
    ax.set_xlabel("benign lesions referred")
    ax.set_ylabel("melanomas referred" if "MEL" in task.classes else "malignant lesions referred")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Triage operating point on out-of-fold lesions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
