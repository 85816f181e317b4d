"""The balanced rule's strength for Derm7pt, chosen on validation predictions (BENCHMARKS.md, "Derm7pt: the recipe
judged on the validation split, and the strength of its balanced rule").

The official files' rule divides a bundle's posteriors (under its training rows' class mix) by that mix raised to
``calibration.prior_strength`` (1 = dividing the raw output by the sampler's prior). For each `train --folds 0` run
given (fold 0 = Derm7pt's official validation split, predicted by models trained on the training split only):

- the validation balanced accuracy (five-group mean recall) at strengths 0.5–2.0, with the posteriors a full-data
  refit of that recipe would have (temperature 1, Bayes from the sampler's prior: ``training_prior_calibration``);
- the strength the product's own rule picks (``training.run_calibration.tune_prior_strength``: the best validation
  balanced accuracy, ties towards 1);
- a nested estimate of what choosing the strength that way is worth: pick it on a class-stratified random half of
  the validation lesions, score it against strength 1 on the other half, 300 splits × both halves.

    python benchmarks/derm7pt_prior_strength.py --manifest d7_trainval.parquet RUN [RUN …]

With ``--cv-run RUN --cv-manifest M`` the same nested estimate for a cross-validated run of another task on its own
out-of-fold posteriors (``oof_calibrated.csv``) and its bundles' prior — e.g. the HAM10000 recipe, as a contrast.

With ``--rewrite FILE --strength K`` it also turns an official-format Derm7pt file written at strength 1 (the
committed ``benchmarks/results/derm7pt_test_predictions.csv``) into the file the same bundles write at strength K,
by the identity  scores_K ∝ scores_1 × mix^(1 − K)  (``mix``: the class mix of the training rows the bundles were
refitted on, ``--refit-manifest``, e.g. all 616 train + valid lesions); the 7-point criteria columns are untouched.
Exact but for the file's six decimals.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from dermfusion.data.manifest import load_manifest, targets
from dermfusion.evaluation.calibration import training_prior
from dermfusion.evaluation.metrics import balanced_accuracy
from dermfusion.tasks import get_task
from dermfusion.training.run_calibration import tune_prior_strength

TASK = get_task("derm7pt")
CLASSES = list(TASK.classes)
STRENGTHS = np.round(np.arange(0.5, 2.01, 0.1), 2)


def class_mix(manifest: pd.DataFrame) -> np.ndarray:
    counts = targets(manifest, TASK).sum(axis=0).astype(float)
    return counts / counts.sum()


def refit_posteriors(raw: np.ndarray, train_counts: np.ndarray, sampler_power: float) -> np.ndarray:
    """What a full-data refit's calibration makes of raw output: Bayes from the sampling prior to the natural mix."""
    mix = train_counts / train_counts.sum()
    post = raw * mix / training_prior(train_counts, sampler_power)
    return post / post.sum(axis=1, keepdims=True)


def evaluate_run(run: str, manifest: pd.DataFrame, sampler_power: float, rng) -> None:
    train = manifest[manifest["fold"] != 0]
    counts = targets(train, TASK).sum(axis=0).astype(float)
    mix = counts / counts.sum()
    oof = pd.read_csv(f"{run}/oof.csv").drop(columns=["fold"], errors="ignore")
    rows = manifest.set_index("lesion_id").loc[oof["lesion_id"]].reset_index()
    Y = targets(rows, TASK)
    post = refit_posteriors(oof[CLASSES].to_numpy(float), counts, sampler_power)
    picked, table = tune_prior_strength(Y, post, mix)   # its table: balanced accuracy at strengths 0–2
    print(f"\n{run}: {len(Y)} validation lesions; strength picked on all of them: {picked:g}")
    print("| strength | " + " | ".join(f"{k:g}" for k in STRENGTHS) + " |")
    print("|---|" + "---:|" * len(STRENGTHS))
    print("| balanced accuracy | " + " | ".join(f"{table[float(k)]:.3f}" for k in STRENGTHS) + " |")
    g, chosen = nested_gain(Y, post, mix, rng)
    print(f"nested (picked on one half, scored on the other; {len(g)} halves): strength median {np.median(chosen):g} "
          f"(IQR {np.percentile(chosen, 25):g}–{np.percentile(chosen, 75):g}); gain over strength 1: mean "
          f"{g.mean():+.3f}, 5–95 % [{np.percentile(g, 5):+.3f}, {np.percentile(g, 95):+.3f}], "
          f"share of halves that lose {np.mean(g < 0):.2f}")


def nested_gain(Y: np.ndarray, post: np.ndarray, prior: np.ndarray, rng, splits: int = 300) -> tuple[np.ndarray, list]:
    """Gains over strength 1 of a strength picked on one class-stratified half, scored on the other."""
    y = Y.argmax(1)
    logpost, logprior = np.log(np.clip(post, 1e-12, 1)), np.log(prior)[None]
    gains, chosen = [], []
    for r in range(splits):
        half = np.zeros(len(y), bool)
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            half[idx[: (len(idx) + r % 2) // 2]] = True
        for fit, test in ((half, ~half), (~half, half)):
            k, _ = tune_prior_strength(Y[fit], post[fit], prior)
            chosen.append(k)
            gains.append(balanced_accuracy(Y[test], logpost[test] - k * logprior)
                         - balanced_accuracy(Y[test], logpost[test] - logprior))
    return np.asarray(gains), chosen


def evaluate_cv_run(run: str, manifest: pd.DataFrame, rng) -> None:
    cfg = json.loads((Path(run) / "summary.json").read_text())
    task = get_task(cfg["task"])
    cal = json.loads(next(Path(run).glob("fold_*/bundle/calibration.json")).read_text())
    prior = np.asarray(cal["prior"], float)
    post = pd.read_csv(Path(run) / "oof_calibrated.csv").drop(columns=["fold"], errors="ignore")
    Y = targets(manifest.set_index("lesion_id").loc[post["lesion_id"]].reset_index(), task)
    picked, table = tune_prior_strength(Y, post[list(task.classes)].to_numpy(float), prior)
    g, chosen = nested_gain(Y, post[list(task.classes)].to_numpy(float), prior, rng, splits=100)
    print(f"\n{run} ({task.name}, {len(Y)} out-of-fold lesions, strength in its bundles "
          f"{cal.get('prior_strength', 1)}): picked on all {picked:g} ({table[picked]:.4f} vs {table[1.0]:.4f} at 1); "
          f"nested over {len(g)} halves: median {np.median(chosen):g}, gain {g.mean():+.4f} "
          f"[{np.percentile(g, 5):+.4f}, {np.percentile(g, 95):+.4f}], share that lose {np.mean(g < 0):.2f}")


def rewrite(path: str, refit_manifest: pd.DataFrame, strength: float, out: str) -> None:
    df = pd.read_csv(path)
    s = df[CLASSES].to_numpy(float) * class_mix(refit_manifest)[None] ** (1.0 - strength)
    s /= s.sum(axis=1, keepdims=True)
    before = df[CLASSES].to_numpy(float).argmax(1)
    df[CLASSES] = np.round(s, 6)
    df.to_csv(out, index=False, float_format="%.6f")
    after = s.argmax(1)
    moved = pd.crosstab(pd.Series(np.array(CLASSES)[before], name="strength 1"),
                        pd.Series(np.array(CLASSES)[after], name=f"strength {strength:g}"))
    print(f"\nrewrote {path} at strength {strength:g} → {out}: {int((before != after).sum())} of {len(df)} predicted "
          f"groups change\n{moved}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--manifest", required=True, help="Derm7pt train + valid manifest (fold 0 = valid)")
    ap.add_argument("--sampler-power", type=float, default=0.5)
    ap.add_argument("--rewrite", help="official-format Derm7pt file written at strength 1")
    ap.add_argument("--refit-manifest", help="the rows the rewritten file's bundles trained on (default: --manifest)")
    ap.add_argument("--strength", type=float, default=1.5)
    ap.add_argument("--out", help="where the rewritten file goes (default: over --rewrite)")
    ap.add_argument("--cv-run", help="a cross-validated run of another task (e.g. ham10000_recommended), as a contrast")
    ap.add_argument("--cv-manifest", help="its training manifest")
    a = ap.parse_args()
    manifest = load_manifest(a.manifest)
    rng = np.random.default_rng(0)
    for run in a.runs:
        evaluate_run(run, manifest, a.sampler_power, rng)
    if a.cv_run:
        evaluate_cv_run(a.cv_run, load_manifest(a.cv_manifest), rng)
    if a.rewrite:
        refit = load_manifest(a.refit_manifest) if a.refit_manifest else manifest
        rewrite(a.rewrite, refit, a.strength, a.out or a.rewrite)


if __name__ == "__main__":
    main()
