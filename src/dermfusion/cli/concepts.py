"""``dermfusion concepts``: fill a manifest's missing concept columns with scores computed from its images."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import manifest as load_manifest


def concepts_cmd(
    model: str = typer.Argument(..., help="scorer model: monet:<MONET weights file> (OpenAI-CLIP ViT-L/14 layout), "
                                          "open_clip:<dir with open_clip_config.json + weights> (e.g. DermLIP), "
                                          "open_clip:<arch> with --weights FILE, or open_clip:hf-hub:<id> (network)"),
    manifest: Path = typer.Option(..., help="manifest whose empty concept_<modality>_<name> cells are filled"),
    out: Path = typer.Option(..., help="the filled manifest (.parquet or .csv)"),
    weights: Optional[Path] = typer.Option(None, help="local weights file for open_clip:<arch>"),
    concept_set: str = typer.Option("milk10k", help="milk10k (MILK10k's 7 MONET concepts) | seven_point | a YAML file"),
    mapping: Optional[Path] = typer.Option(None, help="apply this monotone mapping (JSON) onto MILK10k's scale"),
    fit_mapping: Optional[Path] = typer.Option(None, help="fit the mapping on images that have supplied scores, "
                                                          "apply it, and save it here (JSON)"),
    cache_dir: Optional[Path] = typer.Option(None, help="score cache (default: $XDG_CACHE_HOME/dermfusion/concepts)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="score every image, read and write no cache"),
    overwrite: bool = typer.Option(False, help="recompute supplied scores too"),
    device: str = typer.Option("cpu"),
    batch_size: int = typer.Option(16),
):
    """Compute MONET-style concept scores for images whose manifest row has none (supplied scores are kept)."""
    from ..concepts import fill_concepts, load_scorer
    from ..data.manifest import save_manifest

    if mapping and fit_mapping:
        raise typer.BadParameter("give --mapping or --fit-mapping, not both", param_hint="--mapping")
    df = load_manifest(manifest)
    scorer = load_scorer(model, weights=weights, concept_set=concept_set, cache_dir=cache_dir, use_cache=not no_cache,
                         mapping=mapping, device=device, batch_size=batch_size)
    filled, report = fill_concepts(df, scorer, overwrite=overwrite, fit_mapping=fit_mapping is not None)
    if fit_mapping is not None:
        report.mapping.save(fit_mapping)
        console.print(f"mapping ({report.mapping.method}, {len(report.mapping.knots)} concepts) → {fit_mapping}")
    save_manifest(filled, out)
    console.print(f"concepts ({', '.join(scorer.names)}): {report.supplied} supplied, {report.computed} computed "
                  f"({report.images_scored} images scored, {report.cache_hits} from the cache), "
                  f"{report.no_image} left empty (no image) → {out}")
