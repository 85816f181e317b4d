"""Issue 30, item 3: does a melanoma-vs-rest auxiliary term (`loss.vs_rest_class: MEL`) sharpen melanoma
discrimination? Compares two training runs of the same recipe on the same folds, lesion by lesion, on their
out-of-fold predictions (nothing here sees a test label).

    dermfusion train ham10000_recommended --manifest ham_d7.parquet --out runs/ham_mel_aux --folds 0 \
        --set loss.vs_rest_class=MEL --set loss.vs_rest_weight=0.5
    python benchmarks/melanoma_vs_rest_ablation.py --manifest ham_d7.parquet runs/ham_rec runs/ham_mel_aux \
        [--markdown out.md]

For the folds both runs have: melanoma AUROC (all lesions, and histology-confirmed only), balanced accuracy (raw
argmax, and each run's own balanced rule, `oof_balanced.csv` — its calibration was fitted on all of that run's
out-of-fold lesions, which for a 3-fold baseline against a 1-fold variant is not the same set), and the share
of benign lesions referred when the melanoma cut-off is set for 95 % melanoma sensitivity *on the same lesions*
(in-sample; a comparison between the two runs, not an estimate for deployment). Intervals: paired bootstrap over
lesions (the same resample for both runs), 2,000 resamples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

BENIGN = ("NV", "BKL", "DF", "VASC")


def load(run: Path, manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The run's raw out-of-fold output, with its balanced-rule scores (``oof_balanced.csv``, the run's own
    calibration) as ``b_<class>`` columns."""
    oof = pd.read_csv(run / "oof.csv", dtype={"lesion_id": str})
    bal = pd.read_csv(run / "oof_balanced.csv", dtype={"lesion_id": str})
    bal = bal[["lesion_id", *classes]].rename(columns={c: f"b_{c}" for c in classes})
    return oof.merge(bal, on="lesion_id").merge(manifest, on="lesion_id", suffixes=("", "_m"))


def balanced_accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    pred = scores.argmax(1)
    return float(np.mean([(pred[y == k] == k).mean() for k in np.unique(y)]))


def benign_referred_at(y_mel: np.ndarray, benign: np.ndarray, s: np.ndarray, sensitivity: float = 0.95) -> float:
    cut = np.quantile(s[y_mel == 1], 1 - sensitivity, method="lower")
    return float((s[benign] >= cut).mean())


def figures(df: pd.DataFrame, classes: list[str], idx: np.ndarray) -> dict:
    d = df.iloc[idx]
    y = d["y"].to_numpy()
    p = d[classes].to_numpy(float)
    mel = (y == classes.index("MEL")).astype(int)
    histo = (d["dx_confirmation"].astype(str) == "histo").to_numpy()
    benign = np.isin(np.asarray(classes)[y], BENIGN)
    return {"melanoma AUROC": roc_auc_score(mel, p[:, classes.index("MEL")]),
            "melanoma AUROC, histology-confirmed": roc_auc_score(mel[histo], p[histo, classes.index("MEL")]),
            "balanced accuracy, raw argmax": balanced_accuracy(y, p),
            "balanced accuracy, the run's balanced rule": balanced_accuracy(
                y, d[[f"b_{c}" for c in classes]].to_numpy(float)),
            "benign referred at 95 % melanoma sensitivity (in-sample)":
                benign_referred_at(mel, benign, p[:, classes.index("MEL")])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path)
    ap.add_argument("variant", type=Path)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    manifest = pd.read_parquet(a.manifest)
    manifest["lesion_id"] = manifest["lesion_id"].astype(str)
    classes = [c for c in pd.read_csv(a.baseline / "oof.csv", nrows=0).columns if c not in ("lesion_id", "fold")]
    labels = manifest[[f"label_{c}" for c in classes]].to_numpy(float)
    if "dx_confirmation" not in manifest:
        manifest["dx_confirmation"] = ""
    manifest = manifest.assign(y=labels.argmax(1))[["lesion_id", "y", "dx_confirmation"]]
    base, var = load(a.baseline, manifest, classes), load(a.variant, manifest, classes)
    folds = sorted(set(base["fold"]) & set(var["fold"]))
    base = base[base["fold"].isin(folds)].sort_values("lesion_id").reset_index(drop=True)
    var = var[var["fold"].isin(folds)].sort_values("lesion_id").reset_index(drop=True)
    assert (base["lesion_id"].to_numpy() == var["lesion_id"].to_numpy()).all(), "the runs' folds hold other lesions"
    n = len(base)
    every = np.arange(n)
    point = {name: figures(df, classes, every) for name, df in (("baseline", base), ("variant", var))}
    rng = np.random.default_rng(0)
    diffs = {k: [] for k in point["baseline"]}
    y = base["y"].to_numpy()
    strata = [np.flatnonzero(y == k) for k in np.unique(y)]
    for _ in range(a.n_boot):
        idx = np.concatenate([rng.choice(s, len(s)) for s in strata])  # stratified: every class keeps its count
        fb, fv = figures(base, classes, idx), figures(var, classes, idx)
        for k in diffs:
            diffs[k].append(fv[k] - fb[k])
    lines = [f"Folds {folds}: {n} out-of-fold lesions, {int((y == classes.index('MEL')).sum())} melanomas. "
             f"`{a.baseline}` (baseline) vs `{a.variant}` (variant).", "",
             "| figure | baseline | variant | variant − baseline [95 % CI, paired] |", "|---|---:|---:|---:|"]
    for k in point["baseline"]:
        lo, hi = np.percentile(diffs[k], [2.5, 97.5])
        d = point["variant"][k] - point["baseline"][k]
        lines.append(f"| {k} | {point['baseline'][k]:.3f} | {point['variant'][k]:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
