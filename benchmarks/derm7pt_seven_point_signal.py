"""Issue 30, item 3: the 7-point checklist computed from the *predicted* criteria as a second, interpretable melanoma
signal, measured on Derm7pt's official validation split (the models of `derm7pt_metadata_ablation.sh`, trained on
the training split only; nothing here is fitted on the validation split).

For each run directory (a `train --folds 0` run of a network with criteria heads) this predicts the validation
split with `dermfusion predict` (diagnosis + criteria columns), then compares, for melanoma vs the rest:
- the network's melanoma probability (balanced rule: divided by the training prior, as the official files);
- the checklist: the expected 7-point score  sum_c sum_l P(c = l) * points(c, l)  from the criteria heads, and the
  checklist's own rule (score of the predicted labels >= 3);
- an *unfitted* combination: the mean of the two signals' ranks (no weight is learned, so nothing can over-fit the
  200 validation lesions);
and reports AUROC with bootstrap intervals, and melanoma recall / specificity of the rules, overall and on the
lesions the dataset marks `difficulty = high`.

    python benchmarks/derm7pt_seven_point_signal.py --manifest D7_TRAINVAL.parquet runs/d7_ablation/image \
        runs/d7_ablation/image_metadata [--markdown out.md]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from dermfusion.criteria import SEVEN_POINT


def expected_score(pred: pd.DataFrame) -> np.ndarray:
    """The 7-point score's expectation under the criteria heads' (prior-divided) probabilities."""
    s = np.zeros(len(pred))
    for c in SEVEN_POINT:
        for label, pts in c.points.items():
            s += pts * pred[f"{c.name}:{label}"].to_numpy(float)
    return s


def auc_ci(y, s, n_boot=2000, seed=0):
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boots = []
    for _ in range(n_boot):  # stratified: every resample keeps the melanoma count
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boots.append(roc_auc_score(y[i], s[i]))
    return roc_auc_score(y, s), np.percentile(boots, 2.5), np.percentile(boots, 97.5)


def rule_row(name, y, flag, high):
    out = [name]
    for mask in (np.ones_like(y, bool), high):
        m = y[mask] == 1
        f = flag[mask]
        out.append(f"{int(f[m].sum())}/{int(m.sum())} = {f[m].mean():.2f}")
        out.append(f"{1 - f[~m].mean():.2f}")
    return out


def analyse(run: Path, manifest: pd.DataFrame, workdir: Path) -> list[str]:
    valid = manifest[manifest["split"] == "valid"].reset_index(drop=True)
    mpath = workdir / "valid.parquet"
    valid.to_parquet(mpath)
    out = workdir / f"{run.name}_valid.csv"
    subprocess.run(["dermfusion", "predict", str(run / "fold_0"), "--manifest", str(mpath), "--out", str(out)],
                   check=True)
    pred = pd.read_csv(out)  # one row per lesion, in manifest order (named by the dataset's image)
    assert len(pred) == len(valid), (len(pred), len(valid))
    y = valid["label_MEL"].to_numpy(float).round().astype(int)
    high = (valid["difficulty"].astype(str) == "high").to_numpy()
    p_mel = pred["MEL"].to_numpy(float)
    e7 = expected_score(pred)
    combo = (rankdata(p_mel) + rankdata(e7)) / 2
    lines = [f"### `{run}` — {len(valid)} validation lesions, {y.sum()} melanomas "
             f"({int(y[high].sum())} of them among the {int(high.sum())} high-difficulty lesions)", "",
             "| melanoma signal | AUROC [95 % CI] | AUROC, high difficulty |", "|---|---:|---:|"]
    for name, s in (("network P(MEL) (balanced rule)", p_mel), ("expected 7-point score (criteria heads)", e7),
                    ("mean rank of the two (unfitted)", combo)):
        a, lo, hi = auc_ci(y, s)
        ah = roc_auc_score(y[high], s[high]) if 0 < y[high].sum() < high.sum() else float("nan")
        lines.append(f"| {name} | {a:.3f} [{lo:.3f}, {hi:.3f}] | {ah:.3f} |")
    argmax_mel = pred[["BCC", "NEV", "MEL", "SK", "MISC"]].to_numpy(float).argmax(1) == 2
    checklist = pred["seven_point_score"].to_numpy(int) >= 3
    lines += ["", "| rule | melanoma recall | specificity | recall, high difficulty | specificity, high difficulty |",
              "|---|---:|---:|---:|---:|"]
    for name, flag in (("network: MEL is the predicted class", argmax_mel),
                       ("checklist: predicted 7-point score >= 3", checklist),
                       ("either", argmax_mel | checklist)):
        lines.append("| " + " | ".join(rule_row(name, y, flag, high)) + " |")
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    manifest = pd.read_parquet(a.manifest)
    with tempfile.TemporaryDirectory() as tmp:
        lines = [line for run in a.runs for line in analyse(run, manifest, Path(tmp))]
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
