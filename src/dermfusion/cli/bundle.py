"""``dermfusion bundle verify | seal | reference``: a bundle's integrity, and the "cannot assess" gate's reference."""
from __future__ import annotations

from pathlib import Path

import typer

from ..console import console
from .common import fail
from .common import manifest as load_manifest

TARGET_HELP = "a bundle, or a training run (every bundle in it)"


def _bundles(target: Path) -> list[Path]:
    from ..bundle import run_bundles

    bundles, _ = run_bundles(target)
    return bundles


def verify_cmd(target: Path = typer.Argument(..., help=TARGET_HELP)):
    """Recompute each bundle's hash from its files (and its members'); exit 1 naming the file that differs."""
    from ..bundle import BundleIntegrityError, verify_tree

    bad = 0
    for b in _bundles(target):
        try:
            for integ in verify_tree(b):
                note = " (format 1: calibration.json not covered — `dermfusion bundle seal` upgrades it)" \
                    if integ.legacy else ""
                console.print(f"[green]ok[/] {integ.path} {integ.hash[:16]}…{note}")
        except BundleIntegrityError as e:
            bad += 1
            console.print(f"[bold red]FAILED[/] {e}", soft_wrap=True)
    if bad:
        raise typer.Exit(1)


def seal_cmd(target: Path = typer.Argument(..., help=TARGET_HELP)):
    """Upgrade bundles of format 1 to per-file SHA256SUMS covering calibration.json — only after their old hash is
    verified, so the new seal blesses exactly what was written. Format-2 bundles are only verified."""
    from ..bundle import upgrade_seal

    for b in _bundles(target):
        digest, upgraded = upgrade_seal(b)
        console.print(f"{'[green]sealed[/]' if upgraded else 'already sealed:'} {b} {digest[:16]}…")


def reference_cmd(
    target: Path = typer.Argument(..., help=TARGET_HELP),
    manifest: Path = typer.Option(..., help="the lesions to compare new images with: the training manifest (a fold "
                                            "bundle uses its validation fold, a full-data bundle every lesion)"),
    all_rows: bool = typer.Option(False, "--all-rows", help="use every lesion of the manifest, also for fold "
                                                            "bundles"),
):
    """Fit the "cannot assess" gate's familiarity reference (intermediate-layer statistics of real lesions;
    embedding_reference.npz) for each network bundle and re-seal it — for bundles trained before it existed."""
    from ..bundle import read_bundle
    from ..inference.familiarity import write_familiarity_reference

    df = load_manifest(manifest)
    for b in _bundles(target):
        bundle = read_bundle(b)
        if bundle.kind != "network":
            console.print(f"[dim]skipped {b}: a {bundle.kind} bundle has no image encoder[/]")
            continue
        fold = int(bundle.config.get("fold", -1))
        rows = df if all_rows or fold < 0 or "fold" not in df.columns else df[df["fold"] == fold]
        source = (f"{manifest.name}: " + ("all lesions" if rows is df else f"validation fold {fold}") +
                  (" (the bundle's own training lesions: in-sample)" if rows is df and fold < 0 else ""))
        ref = write_familiarity_reference(b, rows, source)
        if ref is None:
            fail(f"{b}: no familiarity reference (no encoder with known layers, or fewer than 40 readable lesions)")
        q = dict(zip(ref["levels"], ref["quantiles"]))
        console.print(f"[green]wrote[/] {b}/embedding_reference.npz: {ref['n']} lesions ({ref['source']}), layers "
                      f"{', '.join(ref['layer_names'])}; cross-fitted score median {q[0.5]:.2f}, 99 % {q[0.99]:.2f}, "
                      f"max {q[1.0]:.2f}")
