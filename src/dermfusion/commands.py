"""The verbs that need the heavier stages (training, prediction, evaluation, serving), registered on the CLI."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .cli import app, fail
from .console import console


def _manifest(path: Path):
    from .data.manifest import load_manifest

    return load_manifest(path)


@app.command("train")
def train_cmd(
    config: str = typer.Argument(..., help="YAML config path or a built-in name (e.g. tiny_cpu, ham10000_cpu)"),
    manifest: Path = typer.Option(..., help="training manifest with folds"),
    out: Path = typer.Option(..., help="run directory (re-running resumes from its checkpoints)"),
    folds: Optional[str] = typer.Option(None, help="'all' (default), a list like 0,1, or 'full' for one model on all data"),
    set_: List[str] = typer.Option([], "--set", help="override a config value, e.g. --set train.epochs=3"),
    profile: bool = typer.Option(False, "--profile", help="print the data-wait vs compute breakdown per fold"),
    fold_parallel: bool = typer.Option(False, "--fold-parallel",
                                       help="under torchrun: each process trains its own folds (folds[rank::world], "
                                            "no DDP); rank 0 gathers the out-of-fold predictions and calibrates"),
):
    """Train (cross-validated) models: per-fold bundles, out-of-fold probabilities, calibration.

    Multi-GPU / multi-node: run the same command under torchrun, e.g.
    `torchrun --nproc-per-node 4 --no-python dermfusion train …` (train.batch_size stays the global batch)."""
    from .config import load_config
    from .training.cv import train_cv
    from .training.distributed import distributed_session, record_errors

    cfg = load_config(config, set_)

    def run() -> None:
        # fold-parallel ranks only exchange results (gloo), and may wait for the slowest fold: no short timeout
        session = (distributed_session(cfg.train.device, backend="gloo", timeout_s=_FOLD_PARALLEL_TIMEOUT_S)
                   if fold_parallel else distributed_session(cfg.train.device))
        with session as ctx:
            summary = train_cv(cfg, _manifest(manifest), out, folds=folds, profile=profile,
                               fold_parallel=fold_parallel, dist=ctx)
            if not ctx.is_main:
                return
            if profile and "profile" in summary:
                from rich.table import Table
                t = Table(title="training-step breakdown",
                          caption="start-up: the fold's first batch (loader built, workers forked, first images "
                                  "decoded; later epochs' batches are prefetched); workers: loader processes "
                                  "(data.num_workers); threads: torch compute threads (train.threads); input-bound "
                                  "share: data wait / (data wait + compute), without and with the start-up")
                for c in ("fold", "workers", "threads", "start-up (s)", "data wait (s)", "compute (s)",
                          "input-bound share", "incl. start-up"):
                    t.add_column(c, justify="right")
                for f, p in summary["profile"].items():
                    t.add_row(str(f), str(p.get("loader_workers", "?")), str(p.get("compute_threads", "?")),
                              f"{p.get('startup_s', 0.0):.2f}", f"{p['data_wait_s']:.2f}",
                              f"{p['compute_s']:.2f}", f"{p['data_wait_frac']:.1%}", f"{p['input_bound_frac']:.1%}")
                console.print(t)
            console.print(f"[green]done[/]: bundles and out-of-fold predictions in {out}")

    record_errors(run)()


_FOLD_PARALLEL_TIMEOUT_S = 7 * 24 * 3600


def expand_bundles(paths: list[Path]) -> list[Path]:
    """A run directory stands for its fold bundles; a bundle stands for itself."""
    out = []
    for p in paths:
        if (p / "config.yaml").exists() and (p / "HASH").exists():
            out.append(p)
        elif (p / "summary.json").exists():
            s = json.loads((p / "summary.json").read_text())
            out += [p / b for b in s.get("bundles", [])]
        elif (p / "bundle" / "config.yaml").exists():
            out.append(p / "bundle")
        else:
            fail(f"{p} is neither a bundle nor a run directory")
    return out


def load_any(paths: list[Path], **kw):
    from .inference.bundle import load_predictor
    from .inference.loaders import AveragePredictor

    preds = [load_predictor(b, **kw) for b in expand_bundles(paths)]
    return preds[0] if len(preds) == 1 else AveragePredictor(preds)


@app.command("predict")
def predict_cmd(
    bundles: List[Path] = typer.Argument(..., help="one bundle, several fold bundles, or a run directory (averaged)"),
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
):
    """Predict class probabilities for every lesion of a manifest.

    Under torchrun (`torchrun --nproc-per-node N --no-python dermfusion predict …`) every process predicts a
    contiguous shard of the manifest on its own device and rank 0 writes one merged file in manifest order."""
    from .inference.predict_loop import predict_frame_sharded
    from .inference.submission import write_predictions
    from .training.distributed import distributed_session, record_errors, run_collectively

    from .inference.backends import list_backends

    if backend not in {"auto", "trained", *list_backends()}:
        raise typer.BadParameter(f"unknown backend {backend!r}: use auto, trained or one of "
                                 f"{', '.join(list_backends())}", param_hint="--backend")

    def run() -> None:
        with distributed_session(device) as ctx:
            df = _manifest(manifest)
            dev = str(ctx.device(device)) if ctx.launched else device

            def load():
                if _is_network(bundles):
                    return load_any(bundles, device=dev, batch_size=batch_size, backend=backend)
                return load_any(bundles)

            pred = run_collectively(ctx, load, what="loading the bundle(s)", gather=False)
            if backend == "auto" and hasattr(pred, "choose_backend"):
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
            if ctx.is_main:
                write_predictions(out, df["lesion_id"], probs, task)
                console.print(f"[green]wrote[/] {out}: {len(df)} lesions × {task.num_classes} classes ({mode})"
                              + (f" from {ctx.world_size} processes" if ctx.distributed else ""))
            ctx.barrier()

    record_errors(run)()


def _print_backend_checks(pred) -> None:
    """Per network, what each candidate backend measured or why it was passed over."""
    from rich.markup import escape

    from .inference.backends import selection_text

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


def _is_network(paths: list[Path]) -> bool:
    import yaml
    for b in expand_bundles(paths):
        if yaml.safe_load((b / "config.yaml").read_text()).get("kind") != "network":
            return False
    return True


@app.command("evaluate")
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
):
    """Metrics with bootstrap CIs, fairness slices, recall by label provenance and a self-contained HTML report."""
    from .evaluation.report import evaluate_predictions, print_summary
    from .inference.submission import read_predictions_csv
    from .tasks import TASKS, get_task

    df = _manifest(manifest)
    t = get_task(task) if task else _guess_task(df, TASKS)
    shift = {}
    if shift_reference is not None:
        from .commands_shift import shift_config

        shift = {"shift_reference": _manifest(shift_reference),
                 "shift_config": shift_config((shift_reference.name, manifest.name) if shift_reference.name != manifest.name
                                              else (str(shift_reference), str(manifest)), bundle=bundle,
                                              max_images=shift_max_images, modality="dermoscopic", color_constancy="none")}
    elif bundle is not None:
        fail("--bundle is used for the shift check's embeddings; pass --shift-reference MANIFEST too")
    from .evaluation.shift import ShiftError

    try:
        metrics = evaluate_predictions(read_predictions_csv(predictions), df, t, out, n_bootstrap=bootstrap,
                                       provenance_margin=provenance_margin, **shift)
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


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("dermfusion_demo"), help="where to write the demo's outputs"),
    epochs: Optional[int] = typer.Option(None, help="training epochs per fold (default: the demo config's, 10)"),
):
    """Run the whole pipeline on the bundled sample: import → check → fine-tune the ImageNet EfficientNet-Lite0
    (2 folds) → predict → evaluate, printing the out-of-fold balanced accuracy beside chance."""
    from .demo import run_demo

    run_demo(out, epochs=epochs)
