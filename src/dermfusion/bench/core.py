"""Measuring instruments: the machine, its matmul rates per precision, a model's FLOPs and the floor they imply
(latency, memory and part timers: ``bench.timing``).

The *floor* of a backend is the time its FLOPs would take at the machine's own measured matmul
rate for the precision that backend computes in (``floor_ms``). FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) — elementwise work,
memory traffic and framework overhead are what separate a real run from its floor.
"""
from __future__ import annotations

import copy
import datetime as _dt
import os
import platform
import time
import warnings
from typing import Callable

import torch
from torch import nn

from ..export.onnx import cpu_session
from ..models.fast_attention import fast_attention_
from ..runtime.device import cpu_flags as _all_cpu_flags
from ..runtime.device import cpu_int8_dot_product, cpu_model, native_bf16  # noqa: F401 — cpu_model: bench's API

KINDS = ("linear", "attention", "conv")
# which dtype each backend computes (part, kind) in; parts: encoders | fusion
_BF16_ENC = {("encoders", k): "bf16" for k in KINDS}
_BF16_ALL = {**_BF16_ENC, **{("fusion", k): "bf16" for k in KINDS}}
BACKEND_PRECISION: dict[str, dict] = {
    "fp32": {}, "onnx": {},
    "bf16": _BF16_ALL, "compile": _BF16_ALL, "autocast": _BF16_ALL,
    "int8": {("encoders", "linear"): "int8"}, "onnx-int8": {("encoders", "linear"): "int8"},
    "onnx-qdq": {("encoders", k): "int8" for k in KINDS},
}


# ------------------------------------------------------------------------------------------ machine
def cpu_flags() -> list[str]:
    """The vector / matrix-unit flags worth reporting next to a benchmark."""
    return sorted(f for f in _all_cpu_flags() if f.startswith(("avx512", "amx")) or f in {"avx2", "fma"})


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg_1m"] = float(fh.read().split()[0])
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: str = "fp32", n: int = 2048, device: torch.device | str = "cpu", repeats: int = 5) -> float | None:
    """Measured GFLOP/s (GOP/s for int8) of an n³ matmul, the fastest of the kernels the backends run;
    None when the dtype is unsupported here."""
    device = torch.device(device)
    if device.type == "cpu" and dtype == "int8":
        return _cpu_int8_rate(n, repeats)
    rates = [_torch_matmul_rate(dtype, n, device, repeats)]
    if device.type == "cpu" and dtype == "fp32":
        rates.append(_ort_matmul_rate("fp32", n, repeats))
    rates = [r for r in rates if r is not None]
    return max(rates) if rates else None


def _best_rate(fn: Callable[[], object], n: int, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """GFLOP/s of an n³ product from the fastest of ``repeats`` calls after a warm-up: the machine's peak, which
    a busy neighbour on a shared host can only lower (means drifted 117–265 GOP/s between runs on one guest)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _torch_matmul_rate(dtype: str, n: int, device: torch.device, repeats: int) -> float | None:
    try:
        if dtype == "int8":
            a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
            b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            if device.type == "cpu" and dtype != "fp32" and not native_bf16(torch.device("cpu")):
                n = min(n, 1024)  # emulated bf16 (no AMX / AVX-512 BF16) runs ~1 GFLOP/s: keep the probe short
            a, b = torch.randn(n, n, device=device).to(dt), torch.randn(n, n, device=device).to(dt)
            fn = lambda: a @ b  # noqa: E731
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        if time.perf_counter() - t0 > 1.0:  # a slow path: the warm-up call is the measurement
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            return 2 * n ** 3 / (time.perf_counter() - t0) / 1e9
        return _best_rate(fn, n, repeats, lambda: sync_device(device))
    except Exception:  # noqa: BLE001 — e.g. _int_mm missing on this build
        return None


def ort_matmul_session(w, dtype: str = "fp32", reduce_range: bool | None = None):
    """An ONNX Runtime CPU session computing ``x @ w`` with the kernel the ``onnx`` backend runs (MatMul, fp32)
    or ``onnx-int8`` (DynamicQuantizeMatMul: ``w`` per-channel int8 — 7-bit with ``reduce_range``, by default
    where the backend uses it — and ``x`` quantised per call). Input ``x``, output ``y``; ``w`` is a float32
    numpy K×N array."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper


    k, n = w.shape
    if dtype == "int8":
        reduce_range = not cpu_int8_dot_product() if reduce_range is None else reduce_range
        scale = (np.abs(w).max(0) / (63 if reduce_range else 127)).astype(np.float32)
        inits = [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "w"), numpy_helper.from_array(scale, "s")]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")
    else:
        inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return cpu_session(model.SerializeToString())


def _ort_matmul_rate(dtype: str, n: int, repeats: int) -> float | None:
    """GFLOP/s (GOP/s) of ONNX Runtime's CPU GEMM (MLAS) on an n³ product; None without onnxruntime."""
    try:
        import numpy as np

        rng = np.random.default_rng(0)
        sess = ort_matmul_session(rng.standard_normal((n, n), dtype=np.float32), dtype)
        x = {"x": rng.standard_normal((n, n), dtype=np.float32)}
        return _best_rate(lambda: sess.run(None, x), n, repeats)
    except Exception:  # noqa: BLE001 — no onnxruntime, or a build without the contrib op
        return None


def _cpu_int8_rate(n: int, repeats: int) -> float | None:
    """The fastest CPU int8 GEMM path: ``torch._int_mm`` (oneDNN; AMX / VNNI where present), the
    dynamically quantised ``nn.Linear`` the ``int8`` backend runs (fbgemm; uses AVX2 where VNNI is absent —
    on an AVX2-only EPYC ``_int_mm`` falls back to a reference kernel at ~1 GOP/s) and ONNX Runtime's
    DynamicQuantizeMatMul the ``onnx-int8`` backend runs (MLAS; 233 vs fbgemm's 204 GOP/s on that EPYC).
    A 512³ probe first keeps a reference kernel from costing half a minute."""

    def paths(k: int):
        a = torch.randint(-128, 127, (k, k), dtype=torch.int8)
        b = torch.randint(-128, 127, (k, k), dtype=torch.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice, as in the int8 backend
            lin = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(k, k, bias=False)), {nn.Linear},
                                                         dtype=torch.qint8)
        x = torch.randn(k, k)
        return [lambda: torch._int_mm(a, b), lambda: lin(x)]

    rates, full = [_ort_matmul_rate("int8", n, repeats)], None
    for i, probe in enumerate(paths(512)):
        try:
            r = _best_rate(probe, 512, 2)
            if r > 20:  # a real kernel: measure it at full size
                full = full or paths(n)
                r = _best_rate(full[i], n, repeats)
            rates.append(r)
        except Exception:  # noqa: BLE001 — a path this build lacks
            continue
    rates = [r for r in rates if r is not None]
    return max(rates) if rates else None


def matmul_rates(device="cpu", dtypes=("fp32", "bf16", "int8"), repeats: int = 5) -> dict[str, float | None]:
    return {d: matmul_rate(d, device=device, repeats=repeats) for d in dtypes}


# ------------------------------------------------------------------------------------------ FLOPs
def _op_kind(op) -> str:
    name = str(op)
    if "convolution" in name:
        return "conv"
    if "attention" in name or "bmm" in name:
        return "attention"
    return "linear"


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: nn.Module, batch: dict) -> dict:
    """FLOPs of one forward pass on ``batch``, per lesion: ``total``, ``encoders`` {key: flops}, ``fusion``,
    and ``by_part`` {encoders|fusion: {linear|attention|conv: flops}}."""
    from torch.utils.flop_counter import FlopCounterMode


    frozen = copy.deepcopy(model).eval().requires_grad_(False)  # the module tracker needs grad-free params
    # nn.MultiheadAttention's fused inference kernel (open_clip's ViT, our fusion layers) is one opaque op
    # that FlopCounterMode cannot see into: count the same arithmetic through its nn.Linear + SDPA form.
    fast_attention_(frozen)
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops  # keyed by the overload packet, as FlopCounterMode looks ops up
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        frozen(batch)
    counts = counter.get_flop_counts()
    b = int(batch["image_present"].shape[0])
    root = type(frozen).__name__
    total_ops = counts.get("Global", {})
    enc_keys = list(getattr(frozen, "encoders", {}).keys()) if hasattr(frozen, "encoders") else []
    by_part = {"encoders": dict.fromkeys(KINDS, 0), "fusion": dict.fromkeys(KINDS, 0)}
    encoders = {}
    for k in enc_keys:
        # Encoders are entered through forward_tokens (not __call__), so the tracker records only their
        # submodules: sum the outermost ones (a key nested in another would be counted twice).
        prefix = f"{root}.encoders.{k}"
        keys = [n for n in counts if n == prefix or n.startswith(prefix + ".")]
        top = [n for n in keys if not any(n != q and n.startswith(q + ".") for q in keys)]
        encoders[k] = 0.0
        for n in top:
            for op, c in counts[n].items():
                encoders[k] += c / b
                by_part["encoders"][_op_kind(op)] += c / b
    for op, c in total_ops.items():
        by_part["fusion"][_op_kind(op)] += c / b
    for kind in KINDS:  # fusion = everything that is not an encoder
        by_part["fusion"][kind] -= by_part["encoders"][kind]
    total = sum(total_ops.values()) / b
    return {"total": total, "encoders": encoders, "fusion": total - sum(encoders.values()), "by_part": by_part}


def floor_ms(flops: dict, rates: dict, backend: str, batch_size: int = 1) -> float | None:
    """Time for ``batch_size`` lesions if every FLOP ran at the measured matmul rate of its precision."""
    precision = BACKEND_PRECISION.get(backend, {})
    total_s = 0.0
    for part, kinds in flops["by_part"].items():
        for kind, f in kinds.items():
            if f <= 0:
                continue
            rate = rates.get(precision.get((part, kind), "fp32")) or rates.get("fp32")
            if not rate:
                return None
            total_s += f / (rate * 1e9)
    return total_s * batch_size * 1000
