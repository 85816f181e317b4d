"""ONNX Runtime int8 variants for one ViT encoder: which quantisation is fastest here, at what error.

    python benchmarks/onnx_int8_variants.py [--model vit_small_patch16_224] [--batch 8] [--ham ../shared/data/ham10000]

Exports a randomly initialised timm ViT (no hub here) with the TorchScript exporter, as the ``onnx-int8``
backend does, and times (best of 5, ``--threads`` intra-op threads) on ``--batch`` HAM10000 images (random
pixels without ``--ham``):

- ``fp32``: the exported graph;
- ``dynamic 8-bit`` / ``dynamic 7-bit``: ``quantize_dynamic`` of the weight MatMuls, per channel, full-range
  weights vs ``reduce_range`` (the backend's default on CPUs without VNNI / AMX, where MLAS's u8×s8 sums
  saturate);
- ``dynamic 7-bit + attention``: also the two activation×activation MatMuls of attention
  (``MatMulConstBOnly=False``);
- ``static QOperator`` / ``static QDQ``: ``quantize_static`` with activation ranges calibrated on other images;
- ``fp32, opset-23 Attention``: the dynamo exporter at opset 23, which maps SDPA to ONNX's fused Attention op.

Error: the largest |Δ| of the pooled features relative to fp32's largest feature, and the lowest cosine
similarity between a lesion's fp32 and quantised features.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dermfusion.export.onnx import cpu_session

ROOT = Path(__file__).resolve().parents[1]


def images(ham: Path | None, n: int, offset: int, size: int = 224) -> np.ndarray:
    if ham is None or not (ham / "train.csv").is_file():
        return np.random.default_rng(offset).standard_normal((n, 3, size, size), dtype=np.float32)
    import pandas as pd
    from PIL import Image

    rows = pd.read_csv(ham / "train.csv").iloc[offset:offset + n]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    arr = [(np.asarray(Image.open(ham / p).convert("RGB").resize((size, size)), np.float32) / 255 - mean) / std
           for p in rows["image"]]
    return np.stack(arr).transpose(0, 3, 1, 2).astype(np.float32)


def measure(path: Path, x: np.ndarray, ref: np.ndarray | None, threads: int, repeats: int = 5) -> dict:
    s = cpu_session(path, threads)
    out = s.run(None, {"x": x})[0]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    res = {"ms": 1e3 * min(times)}
    if ref is not None:
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        res.update(rel_err=float(np.abs(out - ref).max() / np.abs(ref).max()), min_cos=float(cos.min()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ham", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    args = ap.parse_args()
    import onnxruntime as ort
    import timm
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from dermfusion.bench.core import machine_info

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the quantisers log every node they skip
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=0).eval()
    ham = args.ham if args.ham.is_dir() else None
    x = images(ham, args.batch, 0)
    calib = [images(ham, 4, 1000 + 4 * i) for i in range(2)]  # other images for the static ranges
    tmp = Path(tempfile.mkdtemp(prefix="onnx_int8_variants_"))
    fp32 = tmp / "fp32.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(fp32), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    variants: dict[str, Path | None] = {"fp32": fp32}

    def dyn(name: str, **kw) -> None:
        variants[name] = tmp / f"{name}.onnx".replace(" ", "_")
        quantize_dynamic(str(fp32), str(variants[name]), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True, **kw)

    dyn("dynamic 8-bit", reduce_range=False)
    dyn("dynamic 7-bit", reduce_range=True)
    dyn("dynamic 7-bit + attention", reduce_range=True, extra_options={"MatMulConstBOnly": False})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c} for c in calib])

        def get_next(self):
            return next(self.it, None)

    for fmt in (QuantFormat.QOperator, QuantFormat.QDQ):
        name = f"static {fmt.name}"
        variants[name] = tmp / f"static_{fmt.name}.onnx"
        quantize_static(str(fp32), str(variants[name]), Reader(), quant_format=fmt, op_types_to_quantize=["MatMul"],
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    try:
        prog = torch.onnx.export(model, (torch.from_numpy(x),), dynamo=True, input_names=["x"], opset_version=23,
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
        variants["fp32, opset-23 Attention"] = tmp / "opset23.onnx"
        prog.save(str(variants["fp32, opset-23 Attention"]))
    except Exception as e:  # noqa: BLE001 — an exporter without opset 23
        print(f"opset-23 export failed: {type(e).__name__}: {e}")

    ref = cpu_session(fp32, args.threads).run(None, {"x": x})[0]
    info = machine_info()
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, onnxruntime {ort.__version__}, "
          f"{info.get('cpu', '?')}, images: {'HAM10000' if ham else 'random'}\n")
    print("| variant | ms | speed-up vs fp32 | max rel. error | min cosine |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, path in variants.items():
        r = measure(path, x, ref, args.threads)
        base = base or r["ms"]
        print(f"| {name} | {r['ms']:.0f} | {base / r['ms']:.2f}× | {r['rel_err']:.4f} | {r['min_cos']:.4f} |",
              flush=True)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
