"""Validation-split figures of Derm7pt runs (BENCHMARKS.md, "Derm7pt"): for each `dermfusion train … --folds 0`
run directory (fold 0 = the official validation split; its oof.csv holds the raw validation probabilities),
and for their average when several are given, the 5-group balanced accuracy (mean recall) raw and after dividing
by the training prior (the training split's square-root-balanced sampling prior, what the bundles apply),
per-class recall, per-class AUC, the confusion matrix and a sweep of the prior division's strength k.

    python benchmarks/derm7pt_validation.py --manifest runs/d7/trainval.parquet runs/d7/mt_val runs/d7/st_val
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dermfusion.data.manifest import load_manifest, targets
from dermfusion.evaluation.calibration import training_prior
from dermfusion.tasks import get_task


def recalls(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    pred = p.argmax(1)
    return np.array([(pred[y == i] == i).mean() if (y == i).any() else np.nan for i in range(k)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--sampler-power", type=float, default=0.5)
    a = ap.parse_args()
    task = get_task("derm7pt")
    classes = list(task.classes)
    m = load_manifest(a.manifest).set_index("lesion_id")
    prior = training_prior(np.nansum(targets(m[m["fold"] == 1], task), 0), a.sampler_power)
    probs = []
    for run in a.runs:
        oof = pd.read_csv(f"{run}/oof.csv", dtype={"lesion_id": str}).set_index("lesion_id").sort_index()
        probs.append((run, oof[classes].to_numpy()))
    y = targets(m.loc[oof.index], task).argmax(1)
    if len(probs) > 1:
        probs.append(("average of " + " + ".join(r for r, _ in probs), np.mean([p for _, p in probs], 0)))
    print(f"validation lesions per class: {dict(zip(classes, np.bincount(y, minlength=len(classes))))}")
    for name, p in probs:
        for label, q in (("raw", p), ("adj", p / prior)):
            r = recalls(y, q, len(classes))
            print(f"{name} {label}: BA {np.nanmean(r):.3f}  " + " ".join(f"{c} {v:.2f}" for c, v in zip(classes, r)))
        auc = [roc_auc_score(y == i, p[:, i]) for i in range(len(classes))]
        print("  AUC " + " ".join(f"{c} {v:.3f}" for c, v in zip(classes, auc)))
        print("  prior strength k: " + "  ".join(
            f"{k}: {np.nanmean(recalls(y, p / prior ** k, len(classes))):.3f}" for k in (0.5, 1, 1.5, 2)))
    name, p = probs[-1]
    pred = (p / prior).argmax(1)
    print(f"confusion (adj) of {name}: rows true, columns predicted")
    print(pd.crosstab(pd.Series(np.array(classes)[y], name="true"), pd.Series(np.array(classes)[pred], name="pred")))


if __name__ == "__main__":
    main()
