"""``dermfusion card``: (re)write the model cards of a bundle or of every bundle of a training run."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import fail


def card_cmd(
    target: Path = typer.Argument(..., help="bundle directory, or a training run directory (all its bundles)"),
    manifest: Optional[Path] = typer.Option(None, help="the training manifest: training data, label provenance mix, "
                                            "out-of-fold metrics with bootstrap CIs"),
    evaluation: Optional[Path] = typer.Option(None, help="a `dermfusion evaluate` output directory (metrics.json): "
                                              "held-out metrics, subgroups, provenance; the card is copied there "
                                              "and its report.html links it"),
    shift: Optional[Path] = typer.Option(None, help="shift.json written by `dermfusion shift`"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore the bundle's previous card (by default its training-data, "
                               "evaluation and shift sections are kept when no new source is given)"),
):
    """Write a model card (model_card.json / .md / .html) into a bundle: model details, intended use, training
    data, metrics with 95% CIs, subgroups, label provenance, covariate shift, calibration, failure modes."""
    from ..card import link_report, write_run_cards
    from ..bundle import run_bundles

    if not target.exists():
        fail(f"{target} not found")
    if evaluation is not None and not (evaluation / "metrics.json").exists():
        fail(f"{evaluation} has no metrics.json: pass the --out directory of `dermfusion evaluate`")
    if shift is not None and not shift.is_file():
        fail(f"{shift} not found: pass the shift.json written by `dermfusion shift`")
    bundles, _ = run_bundles(target)  # a bundle, or every bundle of a run (bundle.resolve)
    if not bundles:
        fail(f"{target} lists no bundles")
    written = write_run_cards(target, manifest=manifest, evaluation_dir=evaluation, shift_json=shift,
                              keep_previous=not fresh)
    for b in written:
        console.print(f"[green]wrote[/] {b}/model_card.json, model_card.md, model_card.html")
    if evaluation is not None:
        shutil.copyfile(written[0] / "model_card.html", evaluation / "model_card.html")
        linked = link_report(evaluation)
        console.print(f"[green]wrote[/] {evaluation / 'model_card.html'}"
                      + (f" (linked from {evaluation / 'report.html'})" if linked else ""))
