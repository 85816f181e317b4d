"""``dermfusion shift``: can a classifier tell two manifests' images apart? (covariate shift, train vs test)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import fail

MODALITY_HELP = "which image column to compare: dermoscopic or clinical"
CONSTANCY_HELP = "white-balance both sides before measuring: none or shades_of_gray (Shades-of-Gray, p = 6)"


def shift_config(names, *, bundle, max_images, modality, color_constancy, classifier="logistic", seed=0):
    """A ShiftConfig from CLI options, with the options checked before any image is read."""
    from ..data.transforms import COLOR_CONSTANCY
    from ..evaluation.shift import CLASSIFIERS, MIN_IMAGES, ShiftConfig
    from ..inference.embeddings import bundle_embedder

    if color_constancy not in COLOR_CONSTANCY:
        fail(f"--color-constancy must be one of {', '.join(COLOR_CONSTANCY)}, got {color_constancy!r}")
    if classifier not in CLASSIFIERS:
        fail(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    if max_images < MIN_IMAGES:
        fail(f"--max-images must be at least {MIN_IMAGES}, got {max_images}")
    if bundle is not None and not Path(bundle).exists():
        fail(f"--bundle {bundle} does not exist; pass a network bundle or its training run directory")
    return ShiftConfig(modality=modality, max_images=max_images, seed=seed, color_constancy=color_constancy,
                       bundle=bundle, embed=bundle_embedder(bundle) if bundle is not None else None,
                       classifier=classifier, names=tuple(names))


def shift_cmd(
    reference: Path = typer.Argument(..., help="reference manifest (usually the training set)"),
    other: Path = typer.Argument(..., help="manifest to compare (test or deployment set)"),
    out: Path = typer.Option(..., help="folder for shift.json and shift.html"),
    bundle: Optional[Path] = typer.Option(None, help="network bundle or run: also compare the model's embeddings"),
    max_images: int = typer.Option(1500, help="at most this many images per manifest (fixed-seed random subset)"),
    modality: str = typer.Option("dermoscopic", help=MODALITY_HELP),
    color_constancy: str = typer.Option("none", help=CONSTANCY_HELP),
    classifier: str = typer.Option("logistic", help="domain classifier: logistic or gbm (gradient boosting)"),
    seed: int = typer.Option(0, help="seed of the subsample, the folds and the bootstrap"),
):
    """Covariate-shift check: domain-classifier ROC AUC (0.5 = no shift) with a bootstrap 95% CI on image
    statistics (and model embeddings with --bundle), and the statistics that differ most."""
    from ..data.manifest import load_manifest
    from ..evaluation.shift import ShiftError, check_shift
    from ..evaluation.shift_report import print_shift_summary, write_shift_report

    names = (reference.name, other.name) if reference.name != other.name else (str(reference), str(other))
    cfg = shift_config(names, bundle=bundle, max_images=max_images, modality=modality,
                       color_constancy=color_constancy, classifier=classifier, seed=seed)
    try:
        result = check_shift(load_manifest(reference), load_manifest(other), cfg)
    except ShiftError as e:
        fail(str(e))
    summary = write_shift_report(result, out)
    print_shift_summary(summary)
    console.print(f"[green]wrote[/] {out / 'shift.json'} and {out / 'shift.html'}")
