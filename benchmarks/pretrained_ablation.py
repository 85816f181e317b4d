"""The held-out-fold figures of the pretrained HAM10000 ablations (BENCHMARKS.md, "Pretrained HAM10000 recipe").

For each run directory (``dermfusion train … --folds 0``; its ``oof.csv`` holds the raw probabilities of the
held-out fold) and for every ensemble of them (probabilities averaged, then one calibration — the product's
ensemble rule), prints balanced accuracy raw and after the training-prior adjustment (the one the recipe ships:
divide by the square-root-balanced sampling prior), its bootstrap 95% CI, the same on histology-confirmed lesions
only (the test set's provenance mix is closer to this), macro AUC and per-class recall.

    python benchmarks/pretrained_ablation.py --manifest runs/ham_train.parquet runs/expA runs/expB runs/expC1 runs/expC2
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from dermfusion.evaluation.calibration import Calibration, fit_prior_adjustment, training_prior
from dermfusion.evaluation.metrics import auroc_per_class, balanced_accuracy, per_class_prf
from dermfusion.tasks import ISIC2018


def bootstrap_ci(y: np.ndarray, p: np.ndarray, n: int = 500, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    scores = [balanced_accuracy(y[i], p[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n))]
    return float(np.percentile(scores, 2.5)), float(np.percentile(scores, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--manifest", type=Path, required=True, help="the training manifest (labels, dx_confirmation)")
    ap.add_argument("--sampler-power", type=float, default=0.5, help="train.sampler_power of the runs")
    ap.add_argument("--recall", action="store_true", help="also print per-class recall")
    args = ap.parse_args()

    classes = list(ISIC2018.classes)
    manifest = pd.read_parquet(args.manifest).set_index("lesion_id")
    oofs = {r: pd.read_csv(r / "oof.csv").set_index("lesion_id") for r in args.runs}
    index = oofs[args.runs[0]].index
    for r, oof in oofs.items():
        if set(oof.index) != set(index):
            raise SystemExit(f"{r}: its held-out lesions differ from {args.runs[0]}'s (train the same --folds)")
    labels = manifest.loc[index]
    y = labels[ISIC2018.label_columns()].to_numpy()
    histo = (labels["dx_confirmation"] == "histo").to_numpy()
    adjust = Calibration(prior_adjustment=fit_prior_adjustment(training_prior(y.sum(0), args.sampler_power)))
    print(f"{len(index)} held-out lesions ({histo.sum()} histology-confirmed); chance {1 / len(classes):.3f}")
    print(f"{'run / ensemble':28s} {'raw BA':>7s} {'adj BA':>7s} {'95% CI':>15s} {'histo adj':>9s} {'AUC':>6s}")
    for k in range(1, len(args.runs) + 1):
        for combo in itertools.combinations(args.runs, k):
            raw = np.mean([oofs[r].loc[index, classes].to_numpy() for r in combo], axis=0)
            adj = adjust.apply(raw)
            lo, hi = bootstrap_ci(y, adj)
            name = "+".join(r.name for r in combo)
            print(f"{name:28s} {balanced_accuracy(y, raw):7.3f} {balanced_accuracy(y, adj):7.3f} "
                  f"[{lo:.3f}, {hi:.3f}] {balanced_accuracy(y[histo], adj[histo]):9.3f} "
                  f"{np.nanmean(auroc_per_class(y, raw)):6.3f}")
            if args.recall:
                for group, mask in (("all", slice(None)), ("histo", histo), ("follow-up", labels["dx_confirmation"].eq("follow_up").to_numpy())):
                    rec = per_class_prf(y[mask], adj[mask])["recall"]
                    print(f"    recall ({group}): " + " ".join(f"{c} {v:.2f}" for c, v in zip(classes, rec)))


if __name__ == "__main__":
    main()
