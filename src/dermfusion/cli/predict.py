"""``dermfusion predict``: class probabilities for every lesion of a manifest, from bundles or run directories."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..console import console
from .common import manifest as load_manifest


def predict_cmd(
    bundles: List[Path] = typer.Argument(..., help="bundle(s) or training run directory(ies); several bundles "
                                        "are averaged (raw probabilities, then one calibration)"),
    manifest: Path = typer.Option(...),
    out: Path = typer.Option(..., help="predictions CSV: lesion_id,<class …> (MILK10k submission format; "
                                       "headed image for ISIC 2018 / 2019, as their official format)"),
    tta: int = typer.Option(0, help="test-time augmentation views (dermoscopy: dihedral 8)"),
    output: str = typer.Option("auto", help="auto | probabilities | submission (cuts rescaled to 0.5; "
                                            "auto = submission for milk10k)"),
    device: str = typer.Option("cpu"),
    batch_size: int = typer.Option(32),
    backend: str = typer.Option("auto", help="network bundles: auto (the fastest backend whose probabilities on the "
                                             "manifest's first 32 lesions match fp32 eager; fp32 if none) | trained "
                                             "(as validated in training) | fp32 | bf16 | autocast | int8 | onnx | "
                                             "onnx-int8 | compile"),
    concept_model: Optional[str] = typer.Option(None, help="compute the concept scores the manifest lacks with this "
                                                           "scorer (as `dermfusion concepts` takes it), on the scale "
                                                           "of the concept mapping the bundle carries"),
    concept_weights: Optional[Path] = typer.Option(None, help="local weights for --concept-model open_clip:<arch> / "
                                                              "dermlip:…"),
):
    """Predict class probabilities for every lesion of a manifest.

    Under torchrun (`torchrun --nproc-per-node N --no-python dermfusion predict …`) every process predicts a
    contiguous shard of the manifest on its own device and rank 0 writes one merged file in manifest order."""
    from ..data.predictions import write_predictions
    from ..inference import load_run
    from ..inference.backends import list_backends
    from ..inference.predict_loop import predict_frame_sharded
    from ..runtime.distributed import distributed_session, record_errors, run_collectively

    if backend not in {"auto", "trained", *list_backends()}:
        raise typer.BadParameter(f"unknown backend {backend!r}: use auto, trained or one of "
                                 f"{', '.join(list_backends())}", param_hint="--backend")

    def run() -> None:
        with distributed_session(device) as ctx:
            df = load_manifest(manifest)
            dev = str(ctx.device(device)) if ctx.launched else device
            if concept_model:  # every process scores the same manifest (the content-hash cache shares the work)
                df = _fill_concepts(df, concept_model, concept_weights, bundles, dev, ctx.is_main)
            # bundles, run directories (network: fold bundles; tabular: the calibrated refit) or both, averaged
            pred = run_collectively(ctx, lambda: load_run(bundles, device=dev, batch_size=batch_size, backend=backend),
                                    what="loading the bundle(s)", gather=False)
            networks = [leaf for _, leaf in pred.mixture() or [] if hasattr(leaf, "choose_backend")]
            if backend == "auto" and networks and hasattr(pred, "choose_backend"):
                # every rank checks the same lesions; rank 0's choice is used everywhere, so the shards agree
                sample = df.head(32)
                chosen = run_collectively(ctx, lambda: pred.choose_backend(sample), what="choosing the backend")[0]
                if ctx.distributed:
                    pred.use_backend(chosen, sample)
                if ctx.is_main:
                    console.print(f"backend: {_backend_text(chosen)} (fastest that matches fp32 eager on "
                                  f"{min(32, len(df))} lesions)")
                    _print_backend_checks(pred)
            task = pred.task
            mode = ("submission" if task.metric == "milk10k_dice" else "probabilities") if output == "auto" else output
            fn = pred.predict_submission if mode == "submission" else pred.predict_proba
            probs = predict_frame_sharded(lambda part: fn(part, tta=tta, progress=ctx.progress), df, ctx)
            extra = _criteria_columns(pred, df, tta, ctx)
            if ctx.is_main:
                write_predictions(out, df["lesion_id"], probs, task, extra=extra)
                console.print(f"[green]wrote[/] {out}: {len(df)} lesions × {task.num_classes} classes ({mode})"
                              + (f" from {ctx.world_size} processes" if ctx.distributed else ""))
            ctx.barrier()

    record_errors(run)()


def _criteria_columns(pred, df, tta: int, ctx):
    """A multi-task network's criteria (label per criterion, the 7-point score, probabilities) or None."""
    import numpy as np

    from ..inference.criteria import criteria_frame, criteria_networks, predict_criteria
    from ..inference.predict_loop import predict_frame_sharded

    nets = criteria_networks(pred)
    if not nets:
        return None
    criteria = nets[0][1].model.criteria_heads.criteria
    sizes = [len(c.labels) for c in criteria]

    def part_probs(part):
        probs = predict_criteria(pred, part, tta=tta, progress=ctx.progress)[1]
        return np.concatenate([probs[c.name] for c in criteria], 1)

    flat = predict_frame_sharded(part_probs, df, ctx, what="criteria prediction")
    bounds = np.cumsum([0, *sizes])
    return criteria_frame(criteria, {c.name: flat[:, bounds[j]:bounds[j + 1]] for j, c in enumerate(criteria)})


def _fill_concepts(df, model, weights, bundles, device, verbose):
    from .concepts import fill_for_bundles

    filled, report, mapping = fill_for_bundles(df, model, weights, bundles, device=device)
    if verbose:
        console.print(f"concepts: {report.supplied} supplied, {report.computed} computed "
                      f"({report.images_scored} images scored, {report.cache_hits} from the cache); mapping: "
                      f"{mapping if mapping else 'none in the bundle (raw scores)'}")
    return filled


def _print_backend_checks(pred) -> None:
    """Per network, what each candidate backend measured or why it was passed over."""
    from rich.markup import escape

    from ..inference.backends import selection_text

    members = getattr(pred, "members", [pred])
    for i, p in enumerate(members):
        if getattr(p, "selection", None):
            label = f"  network {i + 1}: " if len(members) > 1 else "  "
            console.print(f"[dim]{label}{escape(selection_text(p.selection, p.backend))}[/]", highlight=False)


def _backend_text(chosen) -> str:
    if isinstance(chosen, str):
        return chosen
    names = sorted(set(chosen))
    return names[0] if len(names) == 1 else ", ".join(chosen)
