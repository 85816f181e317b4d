"""``dermfusion export`` and ``dermfusion bench``: deployable graphs and honest speed numbers."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from ..console import console
from .common import fail

FIXTURE_IMAGES = Path(__file__).parent.parent / "fixtures" / "ham10000_sample" / "images"
MONET_CONCEPTS = ("ulceration_crust", "hair", "vessels", "erythema", "pigmented", "gel_water_drop_fluid_dermoscopy_liquid",
                  "skin_markings_pen_ink_purple_pen")


def _csv_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--{what} expects comma-separated integers like 1,8,32, got {text!r}")
    if not vals or min(vals) < 1:
        fail(f"--{what} needs positive integers, got {text!r}")
    return vals


def _model_from_target(target: str, overrides: list[str]):
    """(model, preprocess {modality: Preprocess}, label) from a bundle directory or an experiment config."""
    from ..data.transforms import Preprocess

    path = Path(target)
    if path.is_dir():  # a bundle, or a run standing for one bundle (bundle.resolve_one)
        from ..export.onnx import load_bundle_model

        model, bundle = load_bundle_model(path, "bench")
        pre = {m: Preprocess(**p) for m, p in bundle.config["preprocess"].items()}
        return model, pre, f"bundle {bundle.name}"
    from ..config import load_config
    from ..data.features import FeatureSpec
    from ..tasks import get_task
    from ..models.factory import build_model, preprocess_of

    cfg = load_config(target, overrides)
    task = get_task(cfg.task)
    mods = list(cfg.data.modalities or task.modalities)
    concepts = [f"concept_{m}_{c}" for m in mods for c in MONET_CONCEPTS] \
        if cfg.data.use_concepts and task.name == "milk10k" else []
    spec = FeatureSpec(modalities=mods, concepts=concepts)
    if not cfg.data.use_metadata:
        spec.numeric, spec.categorical = [], {}
    model = build_model(cfg, task, spec, for_inference=True).eval()
    return model, preprocess_of(model, spec, cfg.data.color_constancy), f"config {cfg.name} (random init: speed only; accuracy = numeric agreement)"


def _image_paths(images: Optional[Path], n: int) -> list[Path]:
    folder = images or FIXTURE_IMAGES
    if not folder.is_dir():
        fail(f"--images {folder}: not a directory")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        fail(f"--images {folder}: no .jpg/.png images")
    return [paths[i % len(paths)] for i in range(n)]  # cycle a small folder up to n lesions


def bench_cmd(
    target: str = typer.Argument(..., help="a network bundle (or a run of one bundle), or a config (path or "
                                                "built-in name)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="comma-separated batch sizes"),
    backends: str = typer.Option("fp32,bf16,autocast,int8,onnx,onnx-int8", help="comma-separated: fp32, bf16, "
                                 "autocast, int8, onnx, onnx-int8, onnx-qdq, compile (fp32 eager always runs: it "
                                 "is the reference)"),
    images: Optional[Path] = typer.Option(None, help="image folder for the accuracy check and preprocessing "
                                          "timing (default: the bundled 33-image HAM10000 sample, cycled)"),
    accuracy_n: int = typer.Option(64, "--accuracy-n", help="lesions for the accuracy check vs fp32 (0 = skip)"),
    calibration_images: Optional[Path] = typer.Option(None, "--calibration-images", help="image folder whose images "
                                                      "calibrate onnx-qdq's activation ranges (use training images, "
                                                      "not the --images checked against; default: the check's own "
                                                      "first batch)"),
    calibration_n: int = typer.Option(128, "--calibration-n", help="images taken from --calibration-images"),
    repeats: int = typer.Option(10, help="timed calls per batch size (fewer when --budget runs out)"),
    budget: float = typer.Option(20.0, help="seconds at most per backend and batch size"),
    threads: Optional[int] = typer.Option(None, help="torch / ONNX Runtime threads (default: all cores)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full result as JSON here"),
    markdown_out: bool = typer.Option(False, "--markdown", help="also print a markdown table"),
    set_: List[str] = typer.Option([], "--set", help="config override (CONFIG targets), e.g. model.fusion_dim=64"),
):
    """Latency p50/p95, lesions/s, peak memory, encoder/fusion/preprocessing split, the FLOP floor and
    accuracy vs fp32 per inference backend."""
    import torch

    from ..bench import bench_model, lesion_frame, markdown, print_result, real_batches, save_json
    from ..runtime.device import compute_threads

    sizes = _csv_ints(batch_sizes, "batch-sizes")
    names = [b.strip() for b in backends.split(",") if b.strip()]
    from ..inference.backends import BACKENDS

    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        fail(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible")
    with compute_threads(threads or 0):
        model, pre, label = _model_from_target(target, set_)
        console.print(f"[bold]bench[/] {label} on {device}, batch sizes {sizes}, backends {names}")
        eval_batches = None
        paths = _image_paths(images, max(accuracy_n, 16))
        if accuracy_n > 0:
            ebs = min(max(sizes), accuracy_n)
            frame = lesion_frame(paths[: (accuracy_n // ebs) * ebs], model.feature_spec.modalities)
            eval_batches = real_batches(model, frame, pre, ebs)
        options = {}
        if calibration_images is not None and "onnx-qdq" in names:
            cal_paths = _image_paths(calibration_images, calibration_n)
            cal_frame = lesion_frame(cal_paths, model.feature_spec.modalities)
            options["onnx-qdq"] = {"calibration_batches": real_batches(model, cal_frame, pre, 16)}
        result = bench_model(model, backends=names, batch_sizes=sizes, device=device, eval_batches=eval_batches,
                             repeats=repeats, budget_s=budget, image_paths=paths, preprocess=pre,
                             backend_options=options,
                             name=label, log=lambda msg: console.print(f"[dim]{msg}[/]"))
    print_result(result)
    if markdown_out:
        console.print(markdown(result), markup=False, highlight=False, soft_wrap=True)  # copy-pasteable: no wrapping
    if json_out:
        console.print(f"[green]wrote[/] {save_json(result, json_out)}")


def export_cmd(
    bundle: Path = typer.Argument(..., help="a network bundle directory"),
    format: str = typer.Option("onnx", "--format", help="onnx | triton"),
    out: Path = typer.Option(..., help="output directory"),
    model_name: Optional[str] = typer.Option(None, help="Triton model name (default: from the bundle name)"),
    max_batch_size: int = typer.Option(32, help="Triton max_batch_size"),
    opset: int = typer.Option(18, help="ONNX opset (>= 17)"),
    exporter: str = typer.Option("auto", help="auto (dynamo, then TorchScript) | dynamo | torchscript"),
    atol: float = typer.Option(1e-4, help="largest allowed |p_onnx - p_torch| in the parity check"),
):
    """Export the whole fusion network to ONNX (dynamic batch, presence masks as inputs, preprocessing +
    classes in the metadata), checked against PyTorch; or as a Triton model repository."""
    import json

    from ..export.onnx import ExportParityError, export_bundle_onnx

    if format not in {"onnx", "triton"}:
        fail(f"--format must be onnx or triton, not {format!r}")
    if opset < 17:
        fail("--opset must be >= 17")
    out.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        target = out / "model.onnx"
    else:
        import tempfile

        target = Path(tempfile.mkdtemp(prefix="dermfusion_export_")) / "model.onnx"
    try:
        res = export_bundle_onnx(bundle, target, opset=opset, exporter=exporter, atol=atol)
    except ExportParityError as e:
        fail(str(e), 1)
    console.print(f"parity vs PyTorch ({res.exporter} exporter): max |Δp| = {res.max_abs_prob_diff:.2e} "
                  f"(batch sizes {', '.join(map(str, res.parity))}; limit {atol:g})")
    if format == "onnx":
        (out / "export.json").write_text(json.dumps(res.to_dict(), indent=2))
        console.print(f"[green]wrote[/] {target}")
        return
    from ..export.triton import write_triton_repository
    from ..bundle import read_bundle

    name = model_name or re.sub(r"[^A-Za-z0-9_.-]+", "_", read_bundle(bundle).name) or "dermfusion"
    model_dir = write_triton_repository(target, out, name, max_batch_size)
    console.print(f"[green]wrote[/] Triton repository {model_dir} (config.pbtxt, 1/model.onnx)")
