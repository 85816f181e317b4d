"""Inference backends on real weights, checked on real images: is the fast path's answer the fp32 answer?

    python benchmarks/backend_accuracy.py --bundle runs/final/ham_pre/member_0/full/bundle \\
        --test-manifest runs/ham_test.parquet --fold-bundle runs/ham_pre_cv1/member_0/fold_1/bundle \\
        --manifest runs/ham_train.parquet [--backends onnx,onnx-qdq,bf16] [--json out.json]

For each backend, against fp32 eager (the reference): argmax agreement and |Δp| (max, 99th percentile, mean) of
the raw probabilities over the ``--test-manifest`` images (the 1,512 ISIC 2018 test images: no labels needed),
the largest change of the risk score (100 × calibrated P(malignant), what triage reads) — and with
``--fold-bundle`` the balanced accuracy of that fold bundle on its own validation fold (out-of-fold, calibrated
as the bundle calibrates) with fp32 and with the backend. ``onnx-qdq`` is calibrated on ``--calibration-n``
training lesions of ``--manifest`` that are not in the fold bundle's validation fold.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermfusion.data.manifest import targets
from dermfusion.evaluation.metrics import balanced_accuracy
from dermfusion.inference import load_run
from dermfusion.inference.backends import prepare_backend
from dermfusion.runtime.device import cpu_name


def network(bundle):
    return load_run(bundle, device="cpu").mixture()[0][1]


def raw_probs(fn, batches) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.softmax(fn(b)["logits"].float(), -1).cpu().numpy() for b in batches])


def backend(net, name: str, calibration):
    opts = {"calibration_batches": calibration} if name == "onnx-qdq" else {}
    return prepare_backend(net.model, name, device="cpu", **opts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--test-manifest", type=Path, required=True)
    ap.add_argument("--fold-bundle", type=Path)
    ap.add_argument("--manifest", type=Path, required=True, help="training manifest (folds; calibration images)")
    ap.add_argument("--backends", default="onnx,onnx-qdq,bf16")
    ap.add_argument("--calibration-n", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t_all = time.time()
    names = [b for b in args.backends.split(",") if b]
    print(f"# backend accuracy · {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {cpu_name()} · "
          f"torch threads {torch.get_num_threads()}")
    print("# command: python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    train = pd.read_parquet(args.manifest)
    test = pd.read_parquet(args.test_manifest)
    report: dict = {"cpu": cpu_name(), "date": datetime.now(timezone.utc).isoformat(), "backends": {}}

    def calibration_rows(exclude_fold: int | None):
        rows = train if exclude_fold is None else train[train["fold"] != exclude_fold]
        return rows.sample(n=args.calibration_n, random_state=1)

    net = network(args.bundle)
    net.batch_size = 16
    batches = list(net.loader(test))
    ref = raw_probs(net.model, batches)
    cal = net.calibration.apply
    risk_idx = list(net.task.malignant_indices)
    ref_risk = 100 * cal(ref)[:, risk_idx].sum(1)
    print(f"\n## {args.bundle}: {len(test)} test images vs fp32 eager")
    print(f"{'backend':<10} {'agree':>8} {'max Δp':>8} {'p99 Δp':>8} {'mean Δp':>8} {'max Δrisk':>10}")
    for name in names:
        t = time.time()
        runner = backend(net, name, list(net.loader(calibration_rows(None))))
        p = raw_probs(runner, batches)
        d = np.abs(p - ref)
        risk = 100 * cal(p)[:, risk_idx].sum(1)
        rec = {"n": len(p), "argmax_agreement": float((p.argmax(1) == ref.argmax(1)).mean()),
               "max_dp": float(d.max()), "p99_dp": float(np.quantile(d.max(1), 0.99)), "mean_dp": float(d.mean()),
               "max_risk_change": float(np.abs(risk - ref_risk).max()), "seconds": round(time.time() - t, 1)}
        report["backends"][name] = {"test": rec}
        print(f"{name:<10} {100 * rec['argmax_agreement']:7.2f}% {rec['max_dp']:8.4f} {rec['p99_dp']:8.4f} "
              f"{rec['mean_dp']:8.5f} {rec['max_risk_change']:10.2f}")

    if args.fold_bundle:
        fnet = network(args.fold_bundle)
        fnet.batch_size = 16
        fold = int(fnet.bundle.config.get("fold", -1))
        val = train[train["fold"] == fold].reset_index(drop=True)
        y = targets(val, fnet.task)
        vb = list(fnet.loader(val))
        fref = fnet.calibration.apply(raw_probs(fnet.model, vb))
        ba_ref = balanced_accuracy(y, fref)
        print(f"\n## {args.fold_bundle}: balanced accuracy on its validation fold {fold} ({len(val)} lesions), "
              f"calibrated; fp32 eager {ba_ref:.4f}")
        report["fold"] = {"bundle": str(args.fold_bundle), "fold": fold, "n": len(val), "fp32_ba": ba_ref}
        for name in names:
            runner = backend(fnet, name, list(fnet.loader(calibration_rows(fold))))
            p = fnet.calibration.apply(raw_probs(runner, vb))
            ba = balanced_accuracy(y, p)
            agree = float((p.argmax(1) == fref.argmax(1)).mean())
            report["backends"][name]["oof"] = {"ba": ba, "ba_change": ba - ba_ref, "argmax_agreement": agree}
            print(f"  {name:<10} BA {ba:.4f} (Δ {ba - ba_ref:+.4f}), argmax agreement {100 * agree:.2f} %")
    print(f"\n# {time.time() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
