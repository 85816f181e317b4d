"""Two prediction files of the same lesions, compared cell by cell: the largest difference of each numeric column
group (class columns, criteria probabilities), label columns that differ, and how often the class argmax agrees.

    python benchmarks/compare_predictions.py before.csv after.csv

Used for "the criteria in the diagnosis pass" (BENCHMARKS.md, Derm7pt): the `predict` output of the code before and
after, same bundle and images.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd


def compare(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        raise SystemExit(f"the files differ in shape or columns: {a.shape} {list(a.columns)[:6]}… vs {b.shape}")
    numeric = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c])]
    labels = [c for c in a.columns[1:] if c not in numeric]
    classes = [c for c in numeric if ":" not in c and c != "seven_point_score"]
    criteria = [c for c in numeric if ":" in c]
    out = {"rows": len(a)}
    for name, cols in (("classes", classes), ("criteria probabilities", criteria)):
        if cols:
            out[f"largest difference, {name}"] = float(np.abs(a[cols].to_numpy(float) - b[cols].to_numpy(float)).max())
    if classes:
        out["class argmax differs"] = int((a[classes].to_numpy().argmax(1) != b[classes].to_numpy().argmax(1)).sum())
    out["label cells that differ"] = {c: int((a[c].astype(str) != b[c].astype(str)).sum()) for c in labels}
    if "seven_point_score" in a:
        out["7-point scores that differ"] = int((a["seven_point_score"] != b["seven_point_score"]).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args()
    for k, v in compare(pd.read_csv(args.before), pd.read_csv(args.after)).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
