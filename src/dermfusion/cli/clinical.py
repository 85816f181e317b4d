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
    manifest: Path = typer.Option(..., help="the labelled manifest the run was trained on (its out-of-fold labels); "
                                  "with --local, the labelled local sample (lesions the run never trained on)"),
    melanoma_sensitivity: float = typer.Option(0.95, help="share of melanomas to refer (routine or urgent)"),
    malignant_sensitivity: float = typer.Option(0.95, help="share of all malignant lesions (BCC, AKIEC … too) to "
                                                "refer; 0 = no such target (melanoma alone: other cancers may slip)"),
    max_urgent_rate: Optional[float] = typer.Option(0.10, help="ceiling on the share of lesions referred urgently"),
    local: bool = typer.Option(False, "--local", help="choose on MANIFEST's own labelled lesions, predicted now by "
                               "the run's bundles (a clinic's local sample), not on the run's out-of-fold predictions"),
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

    from ..bundle import read_bundle, run_bundles, update_files
    from ..data.manifest import load_manifest, targets
    from ..evaluation.calibration import Calibration
    from ..evaluation.decision_rules import (EVIDENCE_FILE, choose_operating_point, operating_point_report,
                                             read_evidence, write_evidence)

    bundles, _ = run_bundles(run)
    first = read_bundle(bundles[0])
    task, cal = first.task, Calibration.from_dict(first.calibration)
    if cal.prior is None:
        fail(f"{run}'s calibration gives no posteriors (an older run): re-fit it first with "
             f"`dermfusion calibrate {run} --manifest {manifest}`")
    if not task.malignant:
        fail(f"task {task.name} has no malignant classes: nothing to refer")
    kind = "local_sample" if local else "out_of_fold"  # where the cut-offs are chosen (the clinician page says it)
    if local:  # the population it will serve: predicted by these bundles, its own labels, its own folds if any
        post, y, folds, source = _local_posteriors(run, manifest, task, melanoma_sensitivity, malignant_sensitivity)
    elif (run / "oof.csv").is_file():
        oof = pd.read_csv(run / "oof.csv", dtype={"lesion_id": str})
        lab = load_manifest(manifest).set_index("lesion_id")
        missing = [i for i in oof["lesion_id"] if i not in lab.index]
        if missing:
            fail(f"{len(missing)} out-of-fold lesions are not in {manifest} (e.g. {missing[0]}): give the run's "
                 "manifest")
        y = targets(lab.loc[oof["lesion_id"]].reset_index(), task).argmax(1)
        post, folds = cal.posterior(oof[list(task.classes)].to_numpy()), oof["fold"].to_numpy()
        source = f"{len(y)} out-of-fold posteriors of {run}"
    else:  # a full-data refit keeps the posteriors its operating point was chosen on (another run's, or local)
        ev = read_evidence(bundles[0] / EVIDENCE_FILE, with_folds=True)
        if ev is None:
            fail(f"{run} has no oof.csv: an operating point is chosen on out-of-fold predictions. For a full-data "
                 f"refit (--folds full), fit its decisions on a cross-validated run of the same recipe first: "
                 f"`dermfusion calibrate {run} --manifest {manifest} --evidence RUN_CV`")
        post, y, folds = ev
        kept = (first.decisions or {}).get("triage") or {}
        source, kind = kept.get("chosen_on") or f"{len(y)} posteriors kept in the bundle", kept.get("evidence", kind)
        console.print(f"evidence kept in the bundle: {source}")
    _check_enough(task, y, melanoma_sensitivity, malignant_sensitivity, source)
    targets_ = {"melanoma_sensitivity": melanoma_sensitivity,
                "malignant_sensitivity": malignant_sensitivity if malignant_sensitivity > 0 else None,
                "max_urgent_rate": max_urgent_rate}
    try:
        op = choose_operating_point(task, y, post, **targets_)
    except ValueError as e:
        fail(f"no operating point meets the targets: {e}")
    op["chosen_on"] = source
    op["evidence"] = kind
    op["out_of_fold"] = operating_point_report(task, y, post, op, folds=folds, choose=targets_,
                                               n_boot=n_boot)
    _print_report(op, "the local sample" if local else "the out-of-fold lesions")
    current = (first.decisions or {}).get("triage")
    if local and current:  # what the cut-offs in force now do here: the case for (or against) changing them
        r = operating_point_report(task, y, post, current, n_boot=n_boot)
        ci = r["ci95"]
        mel = f"melanoma sensitivity {r['in_sample']['melanoma_sensitivity']:.3f} " \
              f"[{ci['melanoma_sensitivity'][0]:.3f}, {ci['melanoma_sensitivity'][1]:.3f}], " \
            if "melanoma_sensitivity" in r["in_sample"] else ""
        console.print(f"the bundle's operating point in force, on the same local lesions: {mel}malignant sensitivity "
                      f"{r['in_sample']['malignant_sensitivity']:.3f}, benign referred "
                      f"{r['in_sample']['benign_referral_rate']:.3f} [{ci['benign_referral_rate'][0]:.3f}, "
                      f"{ci['benign_referral_rate'][1]:.3f}]")
    from ..training.run_calibration import melanoma_only_warning

    warning = melanoma_only_warning(op)
    if warning:
        console.print(f"[yellow]{warning}[/]")
    _plot(run / "operating_point.png", task, y, post, op, "the local sample" if local else "out-of-fold lesions")
    console.print(f"[green]wrote[/] {run / 'operating_point.png'}")
    if dry_run:
        return
    for b in bundles:  # the evidence the service's expected rates are read from follows the operating point
        dec = {**(read_bundle(b).decisions or {}), "triage": op}
        update_files(b, {"decisions.json": lambda f, d=dec: f.write_text(json.dumps(d, indent=1, default=float)),
                         EVIDENCE_FILE: lambda f: write_evidence(f, post, y, folds)})
    (run / "operating_point.json").write_text(json.dumps(op, indent=1, default=float))
    console.print(f"[green]wrote[/] the operating point into {len(bundles)} bundle(s) (decisions.json, re-sealed) "
                  f"and {run / 'operating_point.json'}")


def _local_posteriors(run: Path, manifest: Path, task, melanoma_sensitivity: float, malignant_sensitivity: float):
    """(posteriors, labels, folds, source) of a labelled local sample predicted through the clinical engine: the
    posteriors under the training prior the operating point applies to; lesions the engine cannot assess left out
    (they go to a clinician whatever the cut-offs); folds from the manifest when it has two or more, else none (the
    report then draws 5 random ones)."""
    import numpy as np

    from ..bundle import run_bundles
    from ..clinical import Engine
    from ..console import track
    from ..data.manifest import load_manifest, targets
    from ..inference import load_run
    from ..training.lesion_record import check_local_sample

    df = load_manifest(manifest)
    labelled = df[task.label_columns()].notna().all(axis=1) if all(c in df for c in task.label_columns()) else None
    if labelled is None or not labelled.any():
        fail(f"{manifest} has no {task.name} labels: a local operating point needs labelled lesions")
    df = df[labelled].reset_index(drop=True)
    _check_enough(task, targets(df, task).argmax(1), melanoma_sensitivity, malignant_sensitivity,
                  f"{len(df)} labelled lesions of {manifest}")   # before minutes of predicting
    bundles, run_dir = run_bundles(run)   # a bundle path given: its run keeps the record
    shared, caveat = check_local_sample(run_dir or run, bundles[0], df["lesion_id"],
                                        df["dataset"] if "dataset" in df else ())
    if shared:
        fail(f"{len(shared)} of the {len(df)} lesions of {manifest} trained this run's models (e.g. "
             f"{shared[0]}): their posteriors are in-sample — surer than on new lesions — so cut-offs chosen on "
             "them would be too lax. A local sample must be lesions the model never saw: leave these out")
    if caveat:
        console.print(f"[yellow]{caveat}[/]")
    engine = Engine(load_run(run), None)
    engine.choose_backends(df.head(32))
    post, keep = [], []
    for lesions in track(engine.lesions_from_manifest(df, 32), "predicting the local sample",
                         total=(len(df) + 31) // 32):
        for a in engine.assess(lesions, quality_gate=True):
            post.append(a.posterior)
            keep.append(a.action != "cannot_assess")
    keep = np.asarray(keep)
    folds = df["fold"].to_numpy()[keep] if "fold" in df and df["fold"][keep].nunique() >= 2 else np.zeros(keep.sum())
    console.print(f"local sample: {int(keep.sum())} lesions of {manifest} ({int((~keep).sum())} 'cannot assess' left out)")
    return (np.asarray(post)[keep], targets(df, task).argmax(1)[keep], folds.astype(int),
            f"{int(keep.sum())} lesions of the local sample {manifest}")


def _check_enough(task, y, melanoma_sensitivity: float, malignant_sensitivity: float, source: str) -> None:
    """No melanoma (or no malignant lesion) among the lesions: a sensitivity target cannot be chosen on them — the
    cut would come out at infinity and the clause would silently vanish. Fewer than 1 / (1 − target) of them: the
    target means referring every one, so the cut is the least suspicious one's — said, not refused."""
    import numpy as np

    y = np.asarray(y)
    counts = []
    if "MEL" in task.classes and melanoma_sensitivity > 0:
        counts.append(("melanomas", int((y == task.classes.index("MEL")).sum()), melanoma_sensitivity))
    if malignant_sensitivity > 0 or "MEL" not in task.classes:
        target = malignant_sensitivity if malignant_sensitivity > 0 else melanoma_sensitivity
        counts.append(("malignant lesions", int(np.isin(y, list(task.malignant_indices)).sum()), target))
    for what, n, target in counts:
        if n == 0:
            fail(f"no {what} among the {source}: a {target:.0%} sensitivity target cannot be chosen on them")
        if target < 1 and n < int(np.ceil(1 / (1 - target) - 1e-9)):
            console.print(f"[yellow]only {n} {what} among the {source}: a {target:.0%} target then means referring "
                          f"every one of them, so the cut-off is set by the least suspicious one — read the "
                          f"intervals below[/]")


def _print_report(op: dict, where: str) -> None:
    from rich.table import Table

    rep = op["out_of_fold"]
    console.print(f"routine referral: risk ≥ {op['routine_risk']:.1f} or " +
                  (", ".join(f"P({c}) ≥ {v:.3f}" for c, v in op["routine_class_probability"].items()) or "—") +
                  "; urgent referral: " + (", ".join(f"P({c}) ≥ {v:.3f}" for c, v in
                                                      op["urgent_class_probability"].items()) or "—"))
    t = Table(title=f"on {where} (95 % bootstrap intervals)")
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


def _plot(path: Path, task, y, post, op, where: str = "out-of-fold lesions") -> None:
    """Melanoma sensitivity against the share of benign lesions referred as the operating point's own routine clause
    moves — the P(MEL) cut (risk cut fixed) or, for a point without one, the risk cut — with the chosen point; the
    urgent rate on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..evaluation.decision_rules import risk_scores, triage_levels, triage_rates

    fig, ax = plt.subplots(1, 1, figsize=(5.5, 4.2), dpi=110)
    by_mel = "MEL" in task.classes and "MEL" in (op.get("routine_class_probability") or {})
    if by_mel:
        cuts = np.unique(np.r_[np.quantile(post[:, task.classes.index("MEL")], np.linspace(0, 1, 120)), 1.01])
        moved = [{**op, "routine_class_probability": {"MEL": float(c)}} for c in cuts]
    else:
        cuts = np.unique(np.r_[np.quantile(risk_scores(task, post), np.linspace(0, 1, 120)), 101.0])
        moved = [{**op, "routine_risk": float(c)} for c in cuts]
    xs, ys = [], []
    for m in moved:
        r = triage_rates(task, y, triage_levels(task, post, m))
        xs.append(r["benign_referral_rate"])
        ys.append(r.get("melanoma_sensitivity", r["malignant_sensitivity"]))
    ax.plot(xs, ys, color="#2b6cb0", label="P(MEL) cut moves (risk cut fixed)" if by_mel else "risk cut moves")
    r = op["out_of_fold"]["in_sample"]
    ax.scatter([r["benign_referral_rate"]], [r.get("melanoma_sensitivity", r["malignant_sensitivity"])], color="#c53030",
               zorder=3, label="chosen operating point")
    ax.set_xlabel("benign lesions referred")
    ax.set_ylabel("melanomas referred" if "MEL" in task.classes else "malignant lesions referred")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Triage operating point on {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
