"""Data verbs: ``import milk10k | isic | derm7pt | pad-ufes-20``, ``folds``, ``data check``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import console, err_console


def _save(df, out: Path, what: str) -> None:
    from ..data.manifest import save_manifest

    save_manifest(df, out)
    n_lab = int(df[[c for c in df.columns if c.startswith("label_")]].notna().all(axis=1).sum()) \
        if any(c.startswith("label_") for c in df.columns) else 0
    console.print(f"[green]wrote[/] {out}: {len(df)} lesions ({n_lab} labelled) from {what}")


def import_milk10k_cmd(
    metadata: Path = typer.Option(..., help="MILK10k_*_Metadata.csv (two rows per lesion)"),
    out: Path = typer.Option(..., help="manifest to write (.parquet or .csv)"),
    groundtruth: Optional[Path] = typer.Option(None, help="MILK10k_Training_GroundTruth.csv"),
    supplement: Optional[Path] = typer.Option(None, help="MILK10k_Training_Supplement.csv (fine diagnosis, kept for analysis)"),
    images: Optional[Path] = typer.Option(None, help="image folder (<dir>/<lesion_id>/<isic_id>.jpg); "
                                          "without it the image columns stay empty"),
    k: int = typer.Option(0, help="also assign k lesion-level folds (0 = no folds)"),
    seed: int = typer.Option(0),
):
    """Import MILK10k: pairs each lesion's clinical and dermoscopic rows, keeps both images' MONET scores."""
    from ..data.importers import import_milk10k

    df = import_milk10k(metadata, groundtruth, supplement, images)
    if k:
        from ..data.folds import assign_folds
        from ..tasks import MILK10K
        df = assign_folds(df, MILK10K, k=k, seed=seed)
    if images is None:
        console.print("[yellow]note:[/] no --images: image columns are empty (ISIC ids kept in isic_id_*); "
                      "this manifest serves tabular/concept models only")
    _save(df, out, str(metadata))


def import_isic_cmd(
    csv: Path = typer.Argument(..., help="HAM10000 / ISIC 2018 / ISIC 2019 CSV, one image per row"),
    out: Path = typer.Option(...),
    images: Optional[Path] = typer.Option(None, help="image folder (default: paths relative to the CSV)"),
    task: Optional[str] = typer.Option(None, help="isic2018 (HAM10000 classes) or isic2019; default: guessed"),
    dataset: str = typer.Option("isic", help="dataset name stored in the manifest"),
    k: int = typer.Option(0, help="also assign k folds (0 = no folds)"),
    seed: int = typer.Option(0),
):
    """Import an ISIC-style CSV (HAM10000, ISIC 2018 / 2019)."""
    from ..data.importers import import_isic

    df = import_isic(csv, images, task, dataset=dataset)
    if k and any(c.startswith("label_") for c in df.columns):
        from ..data.folds import assign_folds
        df = assign_folds(df, None, k=k, seed=seed)
    _save(df, out, str(csv))


def import_derm7pt_cmd(
    meta: Path = typer.Argument(..., help="Derm7pt meta.csv"),
    out: Path = typer.Option(...),
    images: Optional[Path] = typer.Option(None, help="image folder (default: paths relative to the CSV)"),
    k: int = typer.Option(0, help="assign k stratified folds over the labelled cases instead of the official "
                                  "split's (fold 0 = valid, 1 = train)"),
    seed: int = typer.Option(0),
    split: Optional[str] = typer.Option(None, help="keep only these official splits, e.g. train,valid or test"),
):
    """Import Derm7pt (five diagnosis groups, fine label, 7-point criteria as auxiliary targets, official split)."""
    from ..data.importers import import_derm7pt

    df = import_derm7pt(meta, images, splits=split.split(",") if split else None)
    if k:
        from ..data.folds import assign_folds
        from ..tasks import DERM7PT
        df = assign_folds(df, DERM7PT, k=k, seed=seed)
    _save(df, out, str(meta))


def import_pad_ufes_cmd(
    metadata: Path = typer.Argument(..., help="PAD-UFES-20 metadata.csv (one row per image)"),
    out: Path = typer.Option(...),
    images: Optional[Path] = typer.Option(None, help="image folder holding <img_id> (default: next to the CSV)"),
    dataset: str = typer.Option("pad_ufes_20", help="dataset name stored in the manifest"),
    k: int = typer.Option(0, help="also assign k patient-grouped folds (0 = no folds)"),
    seed: int = typer.Option(0),
):
    """Import PAD-UFES-20 (six classes, clinical photos; patient-grouped; biopsy → label provenance)."""
    from ..data.importers import import_pad_ufes

    df = import_pad_ufes(metadata, images, dataset=dataset)
    if k:
        from ..data.folds import assign_folds
        from ..tasks import PAD_UFES_20
        df = assign_folds(df, PAD_UFES_20, k=k, seed=seed)
    _save(df, out, str(metadata))


def folds_cmd(
    manifest: Path = typer.Argument(...),
    k: int = typer.Option(5, help="number of folds"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="write here instead of updating the manifest in place"),
):
    """Assign lesion- and patient-grouped, class-stratified folds (deterministic for a seed)."""
    from rich.table import Table

    from ..data.folds import assign_folds, fold_table
    from ..data.manifest import load_manifest, save_manifest

    df = load_manifest(manifest, resolve_paths=False)
    df = assign_folds(df, None, k=k, seed=seed)
    save_manifest(df, out or manifest)
    t = Table(title=f"class counts per fold (k={k}, seed={seed})")
    counts = fold_table(df)
    t.add_column("fold")
    for c in counts.columns:
        t.add_column(c, justify="right")
    for f, row in counts.iterrows():
        t.add_row(str(f), *[str(v) for v in row])
    console.print(t)
    console.print(f"[green]wrote[/] {out or manifest}")


def data_check_cmd(
    manifest: Path = typer.Argument(...),
    no_decode: bool = typer.Option(False, "--no-decode", help="only check that image files exist"),
):
    """Find missing/unreadable images, duplicate ids, fold leakage, bad labels and metadata; exit 1 on errors."""
    from rich.table import Table

    from ..console import track
    from ..data.check import check_manifest
    from ..data.manifest import load_manifest

    df = load_manifest(manifest)
    rep = check_manifest(df, decode_images=not no_decode, progress=track)
    t = Table(title=f"data check: {manifest} — {rep.n_lesions} lesions, {rep.images_checked} images read")
    t.add_column("severity")
    t.add_column("check")
    t.add_column("details", overflow="fold")
    colour = {"error": "red", "warning": "yellow", "info": "cyan"}
    for f in sorted(rep.findings, key=lambda f: ["error", "warning", "info"].index(f.severity)):
        t.add_row(f"[{colour[f.severity]}]{f.severity}[/]", f.check, f.message)
    if not rep.findings:
        t.add_row("[green]ok[/]", "all checks", "no findings")
    console.print(t)
    if rep.class_counts is not None:
        ct = Table(title="class counts" + (" per fold" if rep.class_counts.index.name == "fold" else ""))
        ct.add_column("fold" if rep.class_counts.index.name == "fold" else "")
        for c in rep.class_counts.columns:
            ct.add_column(c, justify="right")
        for f, row in rep.class_counts.iterrows():
            ct.add_row(str(f), *[str(v) for v in row])
        console.print(ct)
    if rep.errors:
        err_console.print(f"[bold red]{len(rep.errors)} error(s)[/]")
        raise typer.Exit(1)
    console.print("[green]no errors[/]")


def data_combine_cmd(
    manifest: Path = typer.Argument(..., help="the main manifest (its folds and task stay as they are)"),
    add: Path = typer.Option(..., help="the manifest of another dataset to train on as well"),
    label_map: str = typer.Option(..., help="how its diagnoses map onto the main task's classes: a built-in name "
                                            "(derm7pt_to_isic2018, ham10000_to_derm7pt) or a YAML file"),
    out: Path = typer.Option(..., help="the combined manifest to write"),
    task: Optional[str] = typer.Option(None, help="the main manifest's task (default: the label map's target)"),
):
    """Add another dataset's lesions for training only: relabelled through an explicit label map, de-duplicated
    against the main manifest's images, marked `train_only` (they train every fold, are never validated)."""
    from ..data.combine import combine, read_label_map
    from ..data.manifest import load_manifest
    from ..tasks import get_task

    lm = read_label_map(label_map)
    t = get_task(task or lm["target_task"])
    df, report = combine(load_manifest(manifest), load_manifest(add), lm, t)
    rel = report["relabel"]
    console.print(f"{report['label_map']}: {rel['kept']} lesions relabelled, left out by the map: "
                  f"{rel['left_out'] or 'none'}; duplicates of the main manifest's images left out: "
                  f"{len(report['duplicates_left_out'])}")
    for lesion, why in report["duplicates_left_out"][:20]:
        console.print(f"  [dim]{lesion}: {why}[/]")
    for ds, counts in report["class_counts_by_dataset"].items():
        console.print(f"  {ds}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    _save(df, out, f"{manifest} + {report['added']} train-only lesions of {add}")
