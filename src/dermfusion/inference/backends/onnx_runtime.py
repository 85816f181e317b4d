"""ONNX Runtime backends: onnx (float32) and onnx-int8 (the encoders' MatMul weights int8, per channel).

``onnxruntime`` and ``onnx`` are optional (the ``export`` extra): they are imported when a backend is built.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ...export.graph_io import CRITERIA_OUTPUT, criteria_from_onnx
from ...export.onnx import batch_to_onnx_inputs, cpu_session, export_onnx
from ...runtime.device import cpu_int8_dot_product
from .base import BackendError, BackendRunner, as_device


def onnx_backend(model: nn.Module, device="cpu", sample_batch: dict | None = None, onnx_path=None,
          threads: int | None = None, exporter: str = "auto", layer_stats: str | None = None, **_) -> BackendRunner:
    """ONNX Runtime (float32) on ``onnx_path``, or on a fresh export of ``model`` to a temporary folder,
    deleted once the session holds the graph in memory."""
    device = as_device(device)
    if device.type != "cpu":
        raise BackendError("the onnx backend runs ONNX Runtime on CPU here")
    try:
        import onnxruntime  # noqa: F401 — a clear error before the export
    except ImportError as e:  # pragma: no cover
        raise BackendError(f"onnxruntime is not installed: {e}") from e


    info, cleanup_dir = {}, None
    if onnx_path is None:
        cleanup_dir = Path(tempfile.mkdtemp(prefix="dermfusion_onnx_"))
        onnx_path = cleanup_dir / "model.onnx"
        t0 = time.perf_counter()
        try:
            export_onnx(model, onnx_path, check=False, exporter=exporter, layer_stats=layer_stats)
        except BaseException:
            shutil.rmtree(cleanup_dir, ignore_errors=True)
            raise
        info["export_s"] = round(time.perf_counter() - t0, 2)
    try:
        sess = cpu_session(onnx_path, threads)
    finally:  # a ViT-B pair's export is ~0.7 GB: never leave it behind in the temp folder
        if cleanup_dir is not None:
            shutil.rmtree(cleanup_dir, ignore_errors=True)
    names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    modalities = list(getattr(model, "modalities", []))

    def fn(batch: dict) -> dict:
        feeds = batch_to_onnx_inputs(batch, modalities, names)
        res = dict(zip(outputs, sess.run(outputs, feeds)))
        out = {"logits": torch.from_numpy(res["logits"]), "probabilities": torch.from_numpy(res["probabilities"])}
        if "layer_stats" in res:  # the familiarity check's input (export_onnx(layer_stats=…))
            out["layer_stats"] = res["layer_stats"]
        if CRITERIA_OUTPUT in res:  # a multi-task network's criteria heads, as the PyTorch model returns them
            out["criteria"] = criteria_from_onnx(model, res[CRITERIA_OUTPUT])
        return out

    if cleanup_dir is None:
        info["onnx_path"] = str(onnx_path)
    return BackendRunner("onnx", fn, device, None, info)


def onnx_int8_backend(model: nn.Module, device="cpu", sample_batch: dict | None = None, threads: int | None = None,
               exporter: str = "torchscript", quantize_fusion: bool = False, reduce_range: bool | None = None,
               layer_stats: str | None = None, **_) -> BackendRunner:
    """ONNX Runtime with the encoders' MatMul weights quantised to int8 (per channel, dynamic activations).

    Fusion and head MatMuls stay float32 (excluded by module scope); 2-D linears export as Gemm and
    are not quantised at all. ``reduce_range`` (default: on CPUs without an int8 dot-product instruction)
    quantises weights to 7 bits: there MLAS sums u8×s8 products in saturating 16-bit pairs, and full-range
    weights lose up to ~20 % of a product (tests/test_bench.py).
    """


    if reduce_range is None:
        reduce_range = not cpu_int8_dot_product()

    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:  # pragma: no cover
        raise BackendError(f"onnxruntime quantisation is unavailable: {e}") from e

    tmp = Path(tempfile.mkdtemp(prefix="dermfusion_onnx_int8_"))
    try:  # the session holds the quantised graph in memory: the files (fp32 + int8) go afterwards
        t0 = time.perf_counter()
        export_onnx(model, tmp / "fp32.onnx", check=False, exporter=exporter, layer_stats=layer_stats)
        exclude = []
        if not quantize_fusion:  # keep fusion + heads in float32: few FLOPs, most of the decision
            # TorchScript node names carry the module scope, "/model/<child of the network>/…"; encoders are
            # entered through forward_tokens, so their nodes show the encoder's own children instead.
            fusion = set()
            for name, child in model.named_children():
                if name != "encoders":
                    fusion.add(name)
                    if isinstance(child, nn.ModuleDict):  # ModuleDict members get their own scope (token_proj.<m>)
                        fusion.update(child.keys())
            graph = onnx.load(str(tmp / "fp32.onnx"), load_external_data=False).graph
            exclude = [n.name for n in graph.node if n.op_type in {"MatMul", "Gemm"}
                       and len(n.name.split("/")) > 2 and n.name.split("/")[2] in fusion]
            exclude += [f"{n}_MatMul" for n in exclude]  # the quantiser rewrites Gemm as <name>_MatMul + Add
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every skipped node
        try:
            quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "model.onnx"), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude, per_channel=True,
                             reduce_range=reduce_range)
        finally:
            logging.getLogger().setLevel(level)
        runner = onnx_backend(model, device, onnx_path=tmp / "model.onnx", threads=threads)
        runner.name = "onnx-int8"
        runner.info.pop("onnx_path", None)  # deleted below, once the session is built
        runner.info.update({"export_quantize_s": round(time.perf_counter() - t0, 2), "float_nodes": len(exclude),
                            "weight_bits": 7 if reduce_range else 8})
        return runner
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

