"""``dermfusion gate``: the release gate — a bundle (or run) against written criteria on a held-out manifest, and,
with ``--compare``, the release rule of a model change against the version it would replace.

Exit codes: 0 every criterion passed (or was skipped with a note), 1 at least one failed, 2 a usage error (a
misspelt criterion, a missing file). The judging lives in ``evaluation.release_gate`` (and
``evaluation.paired_comparison``); this verb predicts the held-out lesions through the clinical engine — the same
posteriors, decisions and operating point the service answers with — and times single-lesion assessments.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import fail, manifest as load_manifest


def gate_cmd(
    bundle: Path = typer.Argument(..., help="the bundle or training run directory to release"),
    manifest: Path = typer.Option(..., help="held-out labelled manifest (never trained or calibrated on)"),
    criteria: Path = typer.Option(..., help="gate.yaml: the release criteria (docs/gate_example.yaml)"),
    out: Optional[Path] = typer.Option(None, help="folder for gate.json, report.html and metrics.json "
                                                  "(default: BUNDLE/gate)"),
    service_config: Optional[Path] = typer.Option(None, help="service.yaml whose clinical settings are judged (an "
                                                             "operating-point override, a deployment prior); default: "
                                                             "the bundle's own operating point"),
    compare: Optional[Path] = typer.Option(None, help="the bundle / run the candidate would replace: judge the change "
                                                      "rule (non-inferiority overall, superiority on --subset) on "
                                                      "paired cases"),
    subset: Optional[str] = typer.Option(None, help="COLUMN=VALUE of the manifest naming the subset the change must "
                                                    "improve, e.g. difficulty=high (Derm7pt's atypical lesions)"),
    fold: Optional[int] = typer.Option(None, help="gate only the manifest's lesions of this fold (a fold model on its "
                                                  "own validation fold: labelled lesions it was not trained on)"),
    device: str = typer.Option("cpu"),
    batch_size: int = typer.Option(32),
    backend: str = typer.Option("auto", help="inference backend, as `dermfusion predict` chooses it (the one policy)"),
):
    """Release gate: balanced accuracy, melanoma sensitivity and specificity at the bundle's operating point,
    skin-tone sensitivity spread, calibration error and latency against gate.yaml; a criterion passes only when its
    bootstrap interval clears the threshold. With --compare, also the change rule on paired cases. Writes gate.json
    and the evaluation report; exits 1 when any criterion fails."""
    import numpy as np
    import pandas as pd

    from ..bundle import resolve_run, verify_tree
    from ..clinical import Engine
    from ..data.manifest import targets
    from ..evaluation.decision_rules import triage_levels
    from ..evaluation.release_gate import load_criteria, print_gate, run_gate
    from ..inference import load_run
    from ..inference.backends import list_backends
    from ..clinical.settings import PriorConfig, TriageConfig, load_clinical_settings

    if backend not in {"auto", "trained", *list_backends()}:
        raise typer.BadParameter(f"unknown backend {backend!r}: use auto, trained or one of "
                                 f"{', '.join(list_backends())}", param_hint="--backend")
    crit = load_criteria(criteria)
    settings = load_clinical_settings(service_config)
    settings = settings.model_copy(update={"backend": backend})
    df = load_manifest(manifest)
    if fold is not None:
        if "fold" not in df.columns:
            fail(f"--fold {fold}: {manifest} has no fold column (`dermfusion folds` adds one)")
        df = df[df["fold"] == fold].reset_index(drop=True)
        if df.empty:
            fail(f"{manifest} has no lesions in fold {fold}")
    # what is released: every bundle behind the target, its content hash verified now
    members = [{"path": str(i.path), "hash": i.hash, "legacy_format": i.legacy}
               for b in resolve_run(bundle) for i in verify_tree(b)]
    engine = Engine(load_run(bundle, device=device, batch_size=batch_size), settings)
    task = engine.task
    labelled = df[np.isfinite(targets(df, task).astype(float)).all(1)].reset_index(drop=True)
    if labelled.empty:
        fail(f"{manifest} has no labelled lesions for task {task.name}; the gate needs ground truth (gate a held-out "
             "*labelled* manifest — e.g. a validation fold — never a test set whose labels are held back)")
    subset_mask = _subset(labelled, subset) if subset else None
    if compare is not None and crit.noninferiority_margin is None:
        fail("--compare needs noninferiority_margin (and, for a subset, subset_min_difference) in the criteria file")
    if subset is not None and compare is None:
        fail("--subset names where a model change must be superior: give the version it replaces with --compare")
    console.print(f"gate: {bundle} on {len(labelled)} held-out lesions ({task.name})")
    if engine.model_pass.networks:
        engine.choose_backends(labelled.head(32))
    raw, post, bal = _predict(engine, labelled, batch_size)
    latencies = _latencies(engine, labelled, crit.latency_lesions) if crit.latency_ms_max is not None else []
    rules = engine.rules
    op = {"rule": "referred = the engine's triage action is urgent or routine referral (evaluation.decision_rules."
                  "triage_levels on the posteriors under the training prior); the 'cannot assess' image gate is not "
                  "applied", "source": rules.operating_point_source, **rules.operating_point}
    out_dir = out or Path(bundle) / "gate"
    predictions = pd.DataFrame(post, columns=list(task.classes))
    predictions.insert(0, "lesion_id", labelled["lesion_id"].astype(str).to_numpy())
    comparison = None
    if compare is not None:
        # only the old model's balanced diagnosis is compared: none of the candidate's triage override or deployment
        # prior applies to it (an older bundle without a stated training prior could not take the latter)
        other = Engine(load_run(compare, device=device, batch_size=batch_size), settings.model_copy(
            update={"triage": TriageConfig(), "prior": PriorConfig()}))
        if other.task.classes != task.classes:
            fail(f"{compare} predicts {other.task.name}, not {task.name}: the two cannot be compared")
        if other.model_pass.networks:
            other.choose_backends(labelled.head(32))
        _, _, bal_old = _predict(other, labelled, batch_size)
        comparison = {"compare": str(compare), "subset": subset, "balanced_old": bal_old,
                      "subset_mask": subset_mask if subset_mask is not None else np.ones(len(labelled), bool)}
    record = run_gate(predictions, labelled, task, crit, out_dir,
                      refer=lambda p: triage_levels(task, p, rules.operating_point) >= 1,
                      decision_probs=bal, latencies_ms=latencies, operating_point=op, manifest=str(manifest),
                      model={"target": str(bundle), "backends": engine.backends, "device": device, "bundles": members,
                             "tta": engine.tta}, comparison=comparison)
    print_gate(record, console)
    console.print(f"[green]record[/]: {out_dir / 'gate.json'} · [green]report[/]: {out_dir / 'report.html'}")
    if {"melanoma_sensitivity_min", "specificity_min"} & set(record["failed"]):
        # the operating point did not hold on these lesions: where they are the clinic's own, choose it there
        override = rules.operating_point_source.startswith("service config")
        console.print(f"[yellow]the operating point in force (from the {rules.operating_point_source}) did not hold "
                      f"on these lesions; if they are like the ones it will serve, choose it on a labelled local sample — "
                      f"`dermfusion operating-point RUN --manifest LOCAL --local` — and gate the new version on "
                      f"other lesions (docs/CLINICAL.md, \"Where the model will be used\")"
                      + (": and remove the service config's triage override, which would still take precedence over "
                         "the bundle's cut-offs" if override else "") + "[/]")
    if not record["passed"]:
        raise typer.Exit(1)


def _subset(df, spec: str):
    import numpy as np

    if "=" not in spec:
        fail(f"--subset must be COLUMN=VALUE, got {spec!r}")
    col, value = (x.strip() for x in spec.split("=", 1))
    if col not in df.columns:
        fail(f"--subset: the manifest has no column {col!r} (columns: {', '.join(map(str, df.columns[:30]))} …)")
    mask = (df[col].astype(str).str.strip().str.lower() == value.lower()).to_numpy()
    if not mask.any():
        fail(f"--subset {spec}: no held-out lesion has {col} = {value}")
    return np.asarray(mask, dtype=bool)


def _predict(engine, df, batch_size: int):
    """(raw, posteriors, balanced scores) of every lesion, through the engine in chunks."""
    import numpy as np

    raw, post, bal = [], [], []
    for lesions in engine.lesions_from_manifest(df, batch_size):
        for a in engine.assess(lesions, quality_gate=False, criteria=False):
            raw.append(a.raw)
            post.append(a.posterior)
            bal.append(a.balanced)
    return np.array(raw), np.array(post), np.array(bal)


def _latencies(engine, df, n: int) -> list[float]:
    """Milliseconds of ``n`` single-lesion assessments (decoding the file and the quality gate included; the
    manifest's first lesions, cycled), after one untimed warm-up."""
    rows = [df.iloc[i % len(df)].to_dict() for i in range(n + 1)]
    engine.assess([engine.lesion_from_row(rows[0])])
    out = []
    for row in rows[1:]:
        t = time.perf_counter()
        engine.assess([engine.lesion_from_row(row)])
        out.append((time.perf_counter() - t) * 1000)
    return out
