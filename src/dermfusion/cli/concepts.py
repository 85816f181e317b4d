"""``dermfusion concepts``: fill a manifest's missing concept columns with scores computed from its images;
``dermfusion bundle concept-mapping``: store the mapping onto the training scale in the bundles that need it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import fail
from .common import manifest as load_manifest

SCORER_HELP = ("scorer model: monet:<MONET weights file> (OpenAI-CLIP ViT-L/14 layout), open_clip:<dir with "
               "open_clip_config.json + weights> (e.g. DermLIP ViT-B/16), open_clip:<arch> with --weights FILE, "
               "dermlip:PanDerm-base-w-PubMed-256 with --weights DIR, or open_clip:hf-hub:<id> (network)")


def concepts_cmd(
    model: str = typer.Argument(..., help=SCORER_HELP),
    manifest: Path = typer.Option(..., help="manifest whose empty concept_<modality>_<name> cells are filled"),
    out: Path = typer.Option(..., help="the filled manifest (.parquet or .csv)"),
    weights: Optional[Path] = typer.Option(None, help="local weights for open_clip:<arch> (file) or dermlip:… (dir)"),
    concept_set: str = typer.Option("milk10k", help="milk10k (MILK10k's 7 MONET concepts) | seven_point | a YAML file"),
    mapping: Optional[Path] = typer.Option(None, help="apply this monotone mapping (JSON) onto MILK10k's scale"),
    bundle: Optional[Path] = typer.Option(None, help="apply the concept mapping this bundle (or run) carries — the "
                                                     "scale its model was trained on"),
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

    if sum(x is not None for x in (mapping, fit_mapping, bundle)) > 1:
        raise typer.BadParameter("give one of --mapping, --fit-mapping, --bundle", param_hint="--mapping")
    if bundle is not None:
        mapping = bundle_mapping([bundle])
        console.print(f"mapping: {mapping if mapping else f'none in {bundle} (raw scores)'}")
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


def bundle_mapping(targets) -> Path | None:
    """The concept_mapping.json the bundles (or runs) carry, or None."""
    from ..bundle import resolve_run
    from ..bundle.concept_mapping import find_concept_mapping

    return find_concept_mapping([b for t in targets for b in resolve_run(t)])


def fill_for_bundles(df, model: str, weights, targets, *, device: str = "cpu", batch_size: int = 16):
    """(manifest with its empty concept cells computed on the bundles' scale, fill report, mapping file or None)."""
    from ..concepts import fill_concepts, load_scorer

    mapping = bundle_mapping(targets)
    scorer = load_scorer(model, weights=weights, mapping=mapping, device=device, batch_size=batch_size)
    filled, report = fill_concepts(df, scorer)
    return filled, report, mapping


def bundle_mapping_cmd(
    target: Path = typer.Argument(..., help="a bundle, or a training run (every bundle in it)"),
    mapping: Path = typer.Argument(..., help="the mapping JSON (`dermfusion concepts --fit-mapping`)"),
):
    """Store a concept mapping (computed scores → the training scale) in each bundle and re-seal it: the service
    and `predict --concept-model` then put computed scores on the scale the model was trained on."""
    from ..bundle import run_bundles
    from ..bundle.concept_mapping import CONCEPT_MAPPING_FILE, write_concept_mapping
    from ..concepts import ConceptMapping

    text = mapping.read_text(encoding="utf-8") if mapping.is_file() else fail(f"{mapping}: no such file")
    m = ConceptMapping.from_json(text, str(mapping))  # refuses a malformed or non-monotone map before any write
    bundles, _ = run_bundles(target)
    for b in bundles:
        digest = write_concept_mapping(b, m.to_json())
        console.print(f"[green]wrote[/] {b}/{CONCEPT_MAPPING_FILE} ({len(m.knots)} concepts, {m.method}); "
                      f"re-sealed {digest[:16]}…")
