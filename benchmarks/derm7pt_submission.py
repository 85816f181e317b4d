"""Derm7pt test predictions in the format the independent scorer reads: `image` as in meta.csv, the five
diagnosis probabilities `BCC, MEL, MISC, NEV, SK`, then one column per 7-point criterion holding its predicted
grouped label (absent / typical / atypical; absent / regular / irregular; absent / present).

    python benchmarks/derm7pt_submission.py PREDICTIONS.csv --manifest d7_test.parquet \
        --out benchmarks/results/derm7pt_test_predictions.csv

PREDICTIONS.csv is what `dermfusion predict` wrote for the test manifest (headed lesion_id, or already image, with
the criteria columns of a multi-task model); the manifest maps each lesion id to meta.csv's `image` (`source_image`).
What this adds to `predict`'s file: the classes in alphabetical order and only the criteria labels (no 7-point score
or label probabilities).
"""
from __future__ import annotations

import argparse

import pandas as pd

from dermfusion.criteria import SEVEN_POINT
from dermfusion.data.manifest import load_manifest

CLASSES = ["BCC", "MEL", "MISC", "NEV", "SK"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    pred = pd.read_csv(a.predictions, dtype={"lesion_id": str, "image": str})
    images = load_manifest(a.manifest).set_index("lesion_id")["source_image"]
    if "image" in pred.columns:  # already keyed by meta.csv's image (`predict` given the manifest rows)
        pred["lesion_id"] = pd.Series(images.index, index=images.to_numpy()).reindex(pred["image"]).to_numpy()
        if pred["lesion_id"].isna().any():
            raise SystemExit(f"{int(pred['lesion_id'].isna().sum())} predicted images are not in {a.manifest}")
    missing = sorted(set(pred["lesion_id"]) - set(images.index))
    if missing:
        raise SystemExit(f"{len(missing)} predicted lesions are not in {a.manifest}, e.g. {missing[:3]}")
    crit = [c.name for c in SEVEN_POINT]
    absent = [c for c in crit if c not in pred.columns]
    if absent:
        raise SystemExit(f"{a.predictions} has no criteria columns {absent}: predict with a multi-task model")
    out = pd.concat([pd.DataFrame({"image": images.loc[pred["lesion_id"]].to_numpy()}),
                     pred[CLASSES + crit].reset_index(drop=True)], axis=1)
    out.to_csv(a.out, index=False, float_format="%.6f")
    print(f"wrote {a.out}: {len(out)} images; predicted groups {out[CLASSES].idxmax(axis=1).value_counts().to_dict()}")


if __name__ == "__main__":
    main()
