"""ONNX export of the whole tri-modal network: exporter time, file size, parity with PyTorch, a Triton repo.

    python benchmarks/onnx_export.py [--bundle DIR | --encoder timm:vit_small_patch16_224]
                                     [--exporters dynamo,torchscript] [--ham ../shared/data/ham10000] [--n 64]

For each exporter: wall time to export, graph size, max |p_onnx − p_torch| on random batches
(sizes 1 and 3, one image missing) and on real HAM10000 images (batch 32), and ONNX Runtime vs
PyTorch fp32 latency at batch 1. Writes benchmarks/results/onnx_export_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dermfusion.bench import lesion_frame, real_batches, save_json
from dermfusion.bench.core import machine_info
from dermfusion.export import batch_to_onnx_inputs, export_onnx, input_specs, write_triton_repository
from dermfusion.export.triton import parse_pbtxt

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--encoder", default="timm:vit_small_patch16_224")
    ap.add_argument("--exporters", default="dynamo,torchscript")
    ap.add_argument("--ham", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    import onnxruntime as ort
    import pandas as pd

    from dermfusion.models.factory import preprocess_of

    if args.bundle:
        from dermfusion.export.onnx import load_bundle_model

        model, bundle = load_bundle_model(args.bundle)
        name = bundle.name
    else:
        import sys

        sys.path.insert(0, str(ROOT / "benchmarks"))
        from cpu_backends import build

        model, name = build({"name": args.encoder}), f"tri-modal {args.encoder}"
    pre = preprocess_of(model, model.feature_spec)
    batches = []
    if (args.ham / "train.csv").exists():
        df = pd.read_csv(args.ham / "train.csv").head(args.n)
        frame = lesion_frame([args.ham / p for p in df["image"]], model.feature_spec.modalities)
        batches = real_batches(model, frame, pre, min(32, args.n))
    results = {"name": name, "machine": machine_info(), "exporters": {}}
    tmp = Path(tempfile.mkdtemp(prefix="onnx_export_bench_"))
    for exporter in args.exporters.split(","):
        path = tmp / exporter / "model.onnx"
        rec: dict = {}
        try:
            t0 = time.perf_counter()
            res = export_onnx(model, path, exporter=exporter, batch_sizes=(1, 3))
            rec.update(export_s=time.perf_counter() - t0, exporter=res.exporter, size_mb=path.stat().st_size / 2**20,
                       parity_random=res.parity)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            specs = input_specs(model)
            diffs = []
            for b in batches:
                with torch.no_grad():
                    ref = torch.softmax(model(b)["logits"], -1).numpy()
                got = sess.run(["probabilities"], batch_to_onnx_inputs(b, specs=specs))[0]
                diffs.append(float(np.abs(got - ref).max()))
            rec["parity_ham_max"] = max(diffs) if diffs else None
            one = batches[0] if batches else None
            if one is not None:
                one = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in one.items()}
                one["images"] = {m: x[:1] for m, x in batches[0]["images"].items()}
                feeds = batch_to_onnx_inputs(one, specs=specs)
                sess.run(None, feeds)
                t0 = time.perf_counter()
                for _ in range(5):
                    sess.run(None, feeds)
                rec["ort_b1_ms"] = (time.perf_counter() - t0) / 5 * 1000
                with torch.no_grad():
                    model(one)
                    t0 = time.perf_counter()
                    for _ in range(5):
                        model(one)
                rec["torch_b1_ms"] = (time.perf_counter() - t0) / 5 * 1000
            repo = write_triton_repository(path, tmp / f"triton_{exporter}", "dermfusion_bench")
            cfg = parse_pbtxt((repo / "config.pbtxt").read_text())
            rec["triton_inputs"] = [i["name"][0] for i in cfg["input"]]
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results["exporters"][exporter] = rec
        print(exporter, {k: v for k, v in rec.items() if k != "triton_inputs"}, flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d_%H%M")
    print("wrote", save_json(results, args.out / f"onnx_export_{stamp}.json"))


if __name__ == "__main__":
    main()
