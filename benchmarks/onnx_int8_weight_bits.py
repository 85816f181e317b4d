"""onnx-int8 with 8-bit vs 7-bit (``reduce_range``) weights on a tri-modal model with fitted heads.

    python benchmarks/onnx_int8_weight_bits.py [--model vit_s16] [--n 256] [--fit-heads 512] [--fit-epochs 15]
                                               [--ham ../shared/data/ham10000]

The model, the head fitting and the 256 evaluation lesions are those of ``benchmarks/cpu_backends.py``
(same seeds, so ``--fit-heads 512 --fit-epochs 15`` reproduces that script's onnx-int8 row). Prints, per
weight width, the probability differences to fp32 eager — the largest over all lesions and classes, then
the mean and 99th percentile of each lesion's largest |Δp| — argmax agreement and seconds per batch of
32. On CPUs without VNNI / AMX, ONNX Runtime's u8×s8 GEMM sums products in saturating 16-bit pairs, which
full-range (8-bit) weights overflow.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_backends import MODELS, build, fit_heads, ham_frame  # noqa: E402

from dermfusion.bench import lesion_frame, real_batches  # noqa: E402
from dermfusion.bench.core import machine_info  # noqa: E402
from dermfusion.inference.backends import compare_probs, prepare_backend, probs_over  # noqa: E402
from dermfusion.models.factory import preprocess_of  # noqa: E402
from dermfusion.runtime.device import cpu_int8_dot_product  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_s16", choices=sorted(MODELS))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--fit-heads", type=int, default=512)
    ap.add_argument("--fit-epochs", type=int, default=15)
    ap.add_argument("--ham", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    args = ap.parse_args()
    title, encoder = MODELS[args.model]
    model = build(encoder)
    pre = preprocess_of(model, model.feature_spec)
    meta, paths = ham_frame(args.ham, args.n)
    eval_lesions = set(pd.read_csv(args.ham / "train.csv").head(args.n)["lesion_id"])
    info = machine_info()
    print(f"{title}; {info['cpu']}, int8 dot product: {cpu_int8_dot_product()}, {info['date_utc']}", flush=True)
    print(fit_heads(model, args.ham, eval_lesions, args.fit_heads, pre, epochs=args.fit_epochs, log=lambda m: None),
          flush=True)
    batches = real_batches(model, lesion_frame(paths, model.feature_spec.modalities, meta), pre, 32, task="isic2018")
    ref = probs_over(prepare_backend(model, "fp32"), batches)
    print("\n| weights | max Δp | mean of per-lesion max Δp | p99 of per-lesion max Δp | argmax agree "
          "| s per batch of 32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for reduce_range in (False, True):
        runner = prepare_backend(model, "onnx-int8", reduce_range=reduce_range)
        t0 = time.perf_counter()
        probs = probs_over(runner, batches)
        per_batch = (time.perf_counter() - t0) / len(batches)
        cmp = compare_probs(ref, probs)
        d = np.abs(ref - probs).max(1)
        print(f"| {runner.info['weight_bits']}-bit | {cmp['max_prob_diff']:.4f} | {d.mean():.4f} | "
              f"{np.quantile(d, 0.99):.4f} | {cmp['argmax_agreement']:.1%} ({int(cmp['n'])}) | {per_batch:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
