"""``dermfusion bundle verify | seal | reference``: a bundle's integrity, and the "cannot assess" gate's reference."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

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


def check_backends_cmd(
    target: Path = typer.Argument(..., help=TARGET_HELP),
    manifest: Path = typer.Option(..., help="real lesions to compare on (≥ 500 for a record `auto` will use; the "
                                            "images only — no labels needed)"),
    lesions: int = typer.Option(500, help="lesions to compare (the manifest's first N)"),
    backends: Optional[str] = typer.Option(None, help="comma-separated approximate backends (default: those worth "
                                                      "measuring on this machine)"),
    batch_size: int = typer.Option(32),
):
    """Measure the approximate inference backends (bf16, int8, onnx-int8, onnx-qdq) against fp32 eager on real
    lesions — decisions changed (balanced diagnosis, triage action, conformal set), probability and risk
    differences, and for a multi-task network the lesions whose 7-point criteria labels changed — and record it in
    each network bundle's backend_check.json under this CPU's name. `auto` then uses a backend only when it changed at
    most 0.2 % of the decisions on ≥ 500 lesions, and its criteria only when they changed as few
    (inference.backend_policy); otherwise the criteria come from the eager heads."""
    from rich.table import Table

    from ..clinical.lesion import METADATA_FIELDS, lesions_from_manifest
    from ..data.dataset import batch_from_lesions
    from ..data.manifest import load_manifest
    from ..data.transforms import tta_views
    from ..inference import load_run
    from ..inference.backend_policy import MAX_FLIP_RATE, MIN_RECORD_LESIONS, approved, check_backends, write_record
    from ..runtime.device import cpu_name

    pred = load_run(target)
    nets = [leaf for _, leaf in (pred.mixture() or []) if hasattr(leaf, "model")]
    if not nets:
        fail(f"{target} has no network bundles: nothing to check")
    df = load_manifest(manifest).head(lesions)
    if len(df) < MIN_RECORD_LESIONS:
        console.print(f"[yellow]{len(df)} lesions: below the {MIN_RECORD_LESIONS} `auto` requires — the record is "
                      "written, but no approximate backend will be chosen from it[/]")
    cands = [b.strip() for b in backends.split(",")] if backends else None
    tta = int(((nets[0].bundle.config.get("experiment") or {}).get("train") or {}).get("tta") or 0)
    for net in nets:
        spec, extra = net.spec, [f for f in list(net.spec.numeric) + list(net.spec.categorical)
                                 if f not in METADATA_FIELDS]
        batches = [batch_from_lesions([les.images for les in chunk], [les.metadata for les in chunk], spec,
                                      net.preprocess) for chunk in lesions_from_manifest(df, spec.modalities,
                                                                                         batch_size, extra)]
        views = {m: tta_views(m, tta) for m in spec.modalities} if tta > 1 else None
        result = check_backends(net, batches, pred.calibration, pred.decisions, cands, views)
        write_record(net.bundle.path, result, len(df), f"{manifest} (first {len(df)} lesions, {max(tta, 1)} view(s))")
        t = Table(title=f"{net.bundle.path} · {cpu_name()} · {len(df)} lesions")
        for col in ("backend", "decisions changed", "diagnosis", "action", "set", "max |Δp|", "max |Δrisk|",
                    "criteria changed", "auto may use"):
            t.add_column(col)
        ok = set(approved({"agreement": result}))
        for name, r in result.items():
            if "error" in r:
                t.add_row(name, "—", "", "", "", "", "", "", f"no ({r['error'][:60]})")
                continue
            crit = f"{r['criteria_flips']} ({r['criteria_flip_rate']:.2%})" if "criteria_flips" in r else "—"
            t.add_row(name, f"{r['decision_flips']} ({r['decision_flip_rate']:.2%})", str(r["diagnosis_flips"]),
                      str(r.get("action_flips", "—")), str(r.get("set_flips", "—")), f"{r['max_prob_diff']:.4f}",
                      f"{r['max_risk_diff']:.1f}", crit, "yes" if name in ok else "no")
        console.print(t)
    console.print(f"[dim]auto uses an approximate backend when it changed ≤ {MAX_FLIP_RATE:.1%} of decisions on "
                  f"≥ {MIN_RECORD_LESIONS} lesions; recorded in backend_check.json (not hashed: per machine)[/]")
