"""``dermfusion gate``: the release gate — a bundle (or run) against written criteria on a held-out manifest.

Exit codes: 0 every criterion passed (or was skipped with a note), 1 at least one failed, 2 a usage error (a
misspelt criterion, a missing file). The judging lives in ``evaluation.release_gate``; this verb loads the model,
predicts, times single-lesion predictions and supplies the service's triage rule as the operating point.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import fail, manifest as load_manifest

REFERRALS = ("urgent_referral", "routine_referral")


def gate_cmd(
    bundle: Path = typer.Argument(..., help="the bundle or training run directory to release"),
    manifest: Path = typer.Option(..., help="held-out labelled manifest (never trained or calibrated on)"),
    criteria: Path = typer.Option(..., help="gate.yaml: the release criteria (docs/gate_example.yaml)"),
    out: Optional[Path] = typer.Option(None, help="folder for gate.json, report.html and metrics.json "
                                                  "(default: BUNDLE/gate)"),
    service_config: Optional[Path] = typer.Option(None, help="service.yaml whose triage cut-offs are the operating "
                                                             "point (default: the service's defaults)"),
    device: str = typer.Option("cpu"),
    batch_size: int = typer.Option(32),
    backend: str = typer.Option("trained", help="inference backend for the predictions and the latency: trained "
                                                "(as validated in training) | fp32 | bf16 | autocast | int8 | onnx | "
                                                "onnx-int8 | compile"),
):
    """Release gate: balanced accuracy, melanoma sensitivity at the triage operating point, skin-tone sensitivity
    spread, calibration error and latency against gate.yaml; a criterion passes only when its bootstrap interval
    clears the threshold. Writes gate.json and the evaluation report; exits 1 when any criterion fails."""
    import numpy as np
    import pandas as pd

    from ..bundle import resolve_run, verify_tree
    from ..data.manifest import targets
    from ..evaluation.release_gate import load_criteria, print_gate, run_gate
    from ..inference import load_run
    from ..inference.backends import list_backends
    from ..service.config import load_service_config

    if backend not in {"trained", *list_backends()}:
        raise typer.BadParameter(f"unknown backend {backend!r}: use trained or one of {', '.join(list_backends())}",
                                 param_hint="--backend")
    crit = load_criteria(criteria)
    service = load_service_config(service_config, env={})
    df = load_manifest(manifest)
    # what is released: every bundle behind the target, its content hash verified now
    members = [{"path": str(i.path), "hash": i.hash, "legacy_format": i.legacy}
               for b in resolve_run(bundle) for i in verify_tree(b)]
    pred = load_run(bundle, device=device, batch_size=batch_size, backend=backend)
    task = pred.task
    labelled = df[np.isfinite(targets(df, task).astype(float)).all(1)].reset_index(drop=True)
    if labelled.empty:
        fail(f"{manifest} has no labelled lesions for task {task.name}; the gate needs ground truth")
    console.print(f"gate: {bundle} on {len(labelled)} held-out lesions ({task.name})")
    probs = pred.predict_proba(labelled, progress=False)
    latencies = _latencies(pred, labelled, crit.latency_lesions) if crit.latency_ms_max is not None else []

    op = {"rule": "referred = the service's triage action is urgent or routine referral (service/triage.decide); "
                  "the 'cannot assess' image gate is not applied",
          "service_config": str(service_config) if service_config else "service defaults",
          "triage": service.triage.model_dump()}
    out_dir = out or Path(bundle) / "gate"
    predictions = pd.DataFrame(np.asarray(probs, dtype=float), columns=list(task.classes))
    predictions.insert(0, "lesion_id", labelled["lesion_id"].astype(str).to_numpy())
    record = run_gate(predictions, labelled, task, crit, out_dir, refer=referral_rule(task, service),
                      latencies_ms=latencies, operating_point=op, manifest=str(manifest),
                      model={"target": str(bundle), "backend": backend, "device": device, "bundles": members})
    print_gate(record, console)
    console.print(f"[green]record[/]: {out_dir / 'gate.json'} · [green]report[/]: {out_dir / 'report.html'}")
    if not record["passed"]:
        raise typer.Exit(1)


def referral_rule(task, service):
    """probabilities N×C → referred (bool N): the service's triage action (``service.triage.decide`` with the
    service config's cut-offs) is an urgent or routine referral — the deployed operating point."""
    import numpy as np

    from ..service.triage import decide

    def refer(probs):
        return np.array([decide(task, p, service.triage, service.uncertainty).action in REFERRALS for p in probs],
                        dtype=bool)
    return refer


def _latencies(pred, df, n: int) -> list[float]:
    """Milliseconds of ``n`` single-lesion ``predict_proba`` calls (image decoding included; the manifest's first
    lesions, cycled), after one untimed warm-up."""
    rows = [df.iloc[[i % len(df)]] for i in range(n + 1)]
    pred.predict_proba(rows[0], progress=False)
    out = []
    for row in rows[1:]:
        t = time.perf_counter()
        pred.predict_proba(row, progress=False)
        out.append((time.perf_counter() - t) * 1000)
    return out
