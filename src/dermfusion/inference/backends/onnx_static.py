"""``onnx-qdq``: ONNX Runtime static int8 — convolutions and matmuls with int8 weights (per output channel) *and*
int8 activations, their ranges calibrated on real images; what a CNN encoder (EfficientNet-Lite, ResNet) needs,
where ``onnx-int8`` (dynamic, MatMul only) quantises nothing.

Calibration images: ``calibration_batches`` (``dermfusion bench --calibration-images``: real *training* images),
else the sample batch the backend is checked on (the service's bundled real HAM10000 sample). Kept in float32 by
default (``keep_float``): the first convolution (it sees raw pixels) and everything after the global pooling
(the classifier and fusion head: few FLOPs, most of the decision) — the usual choice for mobile CNNs; ``"none"``
quantises every node, a list of node-name parts (e.g. ``["blocks.2/"]``) keeps those nodes in float32 as well. Whether the result is close enough to fp32
is the backend selection's accuracy check, not this module's: on the fine-tuned Lite0 of the HAM10000 recipe it
is not (argmax agreement 0.89-0.95 whatever is kept in float; BENCHMARKS.md), so ``auto`` refuses it there.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from torch import nn

from ...export.onnx import batch_to_onnx_inputs, export_onnx
from .base import BackendError, BackendRunner, as_device
from .onnx_runtime import onnx_backend


EARLY_BLOCKS = ("blocks.0/", "blocks.1/", "blocks.2/")   # kept in float32 by default (see the module doc)


def _float_nodes(graph, keep_float) -> list[str]:
    if keep_float == "none":
        return []
    names = [n.name for n in graph.node]
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    pool = next((i for i, n in enumerate(graph.node) if n.op_type in {"GlobalAveragePool", "ReduceMean"}), None)
    default = set(convs[:1] + (names[pool:] if pool is not None else []))
    default |= {n for n in names if any(part in n for part in EARLY_BLOCKS)}
    extra = [] if keep_float in (None, "default") else list(keep_float)  # name parts kept too, e.g. "blocks.2/"
    return sorted(default | {n for n in names if any(part in n for part in extra)})


def onnx_qdq_backend(model: nn.Module, device="cpu", sample_batch: dict | None = None, threads: int | None = None,
                     calibration_batches: Sequence[dict] | None = None, keep_float="default",
                     calibration: str = "minmax", layer_stats: str | None = None, **_) -> BackendRunner:
    device = as_device(device)
    if device.type != "cpu":
        raise BackendError("onnx-qdq runs ONNX Runtime on CPU")
    batches = list(calibration_batches or ([sample_batch] if sample_batch is not None else []))
    if not batches:
        raise BackendError("onnx-qdq needs calibration images (a sample batch)")
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:  # pragma: no cover
        raise BackendError(f"onnxruntime quantisation is unavailable: {e}") from e
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if calibration not in methods:
        raise BackendError(f"calibration must be one of {', '.join(methods)}, not {calibration!r}")

    tmp = Path(tempfile.mkdtemp(prefix="dermfusion_onnx_qdq_"))
    try:  # the session holds the quantised graph in memory: the files go afterwards
        t0 = time.perf_counter()
        export_onnx(model, tmp / "fp32.onnx", check=False, exporter="torchscript", layer_stats=layer_stats)
        quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
        graph = onnx.load(str(tmp / "pre.onnx")).graph
        keep = _float_nodes(graph, keep_float)
        initializers = {t.name for t in graph.initializer}
        names = [i.name for i in graph.input if i.name not in initializers]
        modalities = list(getattr(model, "modalities", []))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(batches)

            def get_next(self):
                b = next(self.it, None)
                return None if b is None else batch_to_onnx_inputs(b, modalities, names)

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every node it skips
        try:
            quantize_static(str(tmp / "pre.onnx"), str(tmp / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=methods[calibration], nodes_to_exclude=keep)
        finally:
            logging.getLogger().setLevel(level)
        runner = onnx_backend(model, device, onnx_path=tmp / "model.onnx", threads=threads)
        runner.name = "onnx-qdq"
        runner.info.pop("onnx_path", None)
        runner.info.update({"export_quantize_s": round(time.perf_counter() - t0, 2), "float_nodes": len(keep),
                            "calibration_images": sum(len(b["image_present"]) for b in batches),
                            "calibration": calibration})
        return runner
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
