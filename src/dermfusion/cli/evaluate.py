"""``dermfusion evaluate``: metrics with bootstrap CIs, fairness slices, label provenance, optional covariate
shift, and a self-contained HTML report."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..console import console
from .common import fail, manifest as load_manifest
from .shift import shift_config


def evaluate_cmd(
    predictions: Path = typer.Option(..., help="predictions CSV (lesion_id or image,<class …>)"),
    manifest: Path = typer.Option(..., help="labelled manifest"),
    out: Path = typer.Option(..., help="folder for report.html and metrics.json"),
    task: Optional[str] = typer.Option(None, help="task name (default: from the manifest's label columns)"),
    bootstrap: int = typer.Option(200, help="bootstrap resamples for 95% confidence intervals"),
    shift_reference: Optional[Path] = typer.Option(None, help="manifest to compare the evaluated images with "
                                                   "(e.g. the training set): adds a covariate-shift section"),
    bundle: Optional[Path] = typer.Option(None, help="with --shift-reference: also compare the model's embeddings"),
    shift_max_images: int = typer.Option(1500, help="with --shift-reference: at most this many images per side"),
    provenance_margin: float = typer.Option(0.25, help="warn when a class's recall differs by more than this "
                                            "between label-provenance groups"),
    subset_column: List[str] = typer.Option([], "--subset-column", help="also report the metrics per level of "
                                            "this manifest column (repeatable); Derm7pt's difficulty, and dataset "
                                            "when the lesions come from several, are reported unasked"),
):
    """Metrics with bootstrap CIs, fairness slices, recall by label provenance, metrics per subset (difficulty,
    dataset, --subset-column) and a self-contained HTML report."""
    from ..data.predictions import read_predictions_csv
    from ..evaluation.report import evaluate_predictions, print_summary
    from ..tasks import TASKS, get_task

    df = load_manifest(manifest)
    t = get_task(task) if task else _guess_task(df, TASKS)
    missing = [c for c in subset_column if c not in df.columns]
    if missing:
        fail(f"--subset-column: {manifest} has no column {', '.join(missing)}")
    shift = {}
    if shift_reference is not None:
        shift = {"shift_reference": load_manifest(shift_reference),
                 "shift_config": shift_config((shift_reference.name, manifest.name) if shift_reference.name != manifest.name
                                              else (str(shift_reference), str(manifest)), bundle=bundle,
                                              max_images=shift_max_images, modality="dermoscopic", color_constancy="none")}
    elif bundle is not None:
        fail("--bundle is used for the shift check's embeddings; pass --shift-reference MANIFEST too")
    from ..evaluation.shift import ShiftError

    try:
        metrics = evaluate_predictions(read_predictions_csv(predictions), df, t, out, n_bootstrap=bootstrap,
                                       provenance_margin=provenance_margin, subset_columns=subset_column, **shift)
    except ShiftError as e:
        fail(f"shift check: {e}")
    print_summary(metrics)
    console.print(f"[green]report[/]: {out / 'report.html'}")


def _guess_task(df, tasks):
    labels = {c.removeprefix("label_") for c in df.columns if c.startswith("label_")}
    for t in tasks.values():
        if set(t.classes) == labels:
            return t
    fail("cannot tell the task from the manifest's label columns; pass --task")
