"""How much a cross-validated run loses when patient metadata is absent at prediction time.

    python benchmarks/missing_metadata.py runs/ham_cpu --manifest ham_train.parquet [--tta 0]

Each fold's bundle predicts its own held-out lesions twice: with the metadata as recorded, and with
age / sex / skin tone / site (and concept scores) removed — the situation of the ISIC 2018 test set,
whose CSV has no metadata, or of an API request without the form filled in. Prints out-of-fold
balanced accuracy and macro-F1 for both — raw, and after the run's calibration (temperature + prior
adjustment, fitted on the out-of-fold predictions *with* metadata) — and the predicted class counts,
so a shift in the predicted classes is visible.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from dermfusion.data.manifest import class_index, concept_columns, load_manifest
from dermfusion.evaluation.calibration import Calibration
from dermfusion.evaluation.metrics import balanced_accuracy, macro_f1
from dermfusion.inference import load_predictor


def strip_metadata(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["age"] = np.nan
    for c in ("sex", "skin_tone", "site"):
        if c in out:
            out[c] = ""
    for c in concept_columns(out):
        out[c] = np.nan
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--tta", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    df = load_manifest(args.manifest)
    summary = json.loads((args.run / "summary.json").read_text())
    task = None
    out: dict = {"with metadata": None, "without metadata": None}
    for fold, bundle in zip(summary["folds"], summary["bundles"]):
        pred = load_predictor(args.run / bundle, backend="fp32")
        task = pred.task
        rows = np.flatnonzero(df["fold"].to_numpy() == fold)
        part = df.iloc[rows].reset_index(drop=True)
        for name, frame in (("with metadata", part), ("without metadata", strip_metadata(part))):
            p = pred.predict_raw(frame, tta=args.tta)
            if out[name] is None:
                out[name] = np.zeros((len(df), p.shape[1]))
            out[name][rows] = p
        print(f"fold {fold}: {len(rows)} lesions", flush=True)
    done = np.isin(df["fold"].to_numpy(), summary["folds"])  # a run of some folds only: score those lesions
    df, out = df[done].reset_index(drop=True), {k: v[done] for k, v in out.items()}
    y = class_index(df, task)
    calib = Calibration.from_dict((summary.get("calibration") or {}).get("fitted") or {})
    res = {}
    for name, raw in out.items():
        for stage, p in (("raw", raw), ("calibrated", calib.apply(raw))):
            counts = pd.Series(np.asarray(task.classes)[p.argmax(1)]).value_counts().to_dict()
            r = res[f"{name}, {stage}"] = {"balanced_accuracy": balanced_accuracy(y, p), "macro_f1": macro_f1(y, p),
                                          "predicted": counts}
            print(f"{name + ', ' + stage:30s} balanced accuracy {r['balanced_accuracy']:.4f} · macro-F1 "
                  f"{r['macro_f1']:.4f} · predicted {counts}")
    truth = pd.Series(np.asarray(task.classes)[y]).value_counts().to_dict()
    print(f"{'true classes':30s} {truth}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
