"""The checks behind "A full-data refit with an operating point and a conformal set" (BENCHMARKS.md, Derm7pt):

    python benchmarks/derm7pt_refit.py --evidence runs/d7_mt_val --manifest d7_trainval.parquet \
        [--before cal_before.json --after runs/d7_mt/full/bundle/calibration.json] \
        [--fold-clinical d7_mt_val_test_clinical.csv --refit-clinical d7_mt_test_clinical.csv]

- ``--before`` / ``--after``: the refit's calibration.json before and after ``calibrate --evidence``: the largest
  difference of the balanced scores (the official file's rule) over 1,000 random outputs, and of the posteriors.
- ``--fold-clinical`` / ``--refit-clinical``: ``predict --clinical`` files of the evidence run's fold model and of the
  refit on the same (unlabelled) images: referred and urgent shares of the assessable lesions, mean top posterior,
  mean entropy — does the refit behave like the model its decisions were fitted on?
- always: on the evidence run's out-of-fold predictions, posterior ECE and NLL with no fitted temperature (Bayes' rule
  from the sampler's prior) and with one (cross-validated over 5 random folds), and the balanced rule's accuracy with
  the fitted temperature over five fold seeds.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from dermfusion.config import ExperimentConfig
from dermfusion.data.manifest import load_manifest, targets
from dermfusion.evaluation.calibration import Calibration, training_prior
from dermfusion.evaluation.metrics import balanced_accuracy, expected_calibration_error, log_loss
from dermfusion.tasks import get_task
from dermfusion.training.cv import training_class_counts
from dermfusion.training.run_calibration import fit_posterior


def cross_fitted(mode: str, y, raw, sampling_prior, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """(posteriors, balanced scores, temperatures), each fold's calibration fitted on the other 4 random folds."""
    folds = np.random.default_rng(seed).permutation(np.arange(len(raw)) % 5)
    post, bal, Ts = np.zeros_like(raw), np.zeros_like(raw), []
    for k in range(5):
        tr, te = folds != k, folds == k
        T, bias, prior = fit_posterior(mode, y[tr], raw[tr], sampling_prior)
        cal = Calibration(T, None, None, bias, prior, 1.0)
        post[te], bal[te] = cal.posterior(raw[te]), cal.balanced(raw[te])
        Ts.append(T)
    return post, bal, Ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evidence", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--before")
    ap.add_argument("--after")
    ap.add_argument("--fold-clinical")
    ap.add_argument("--refit-clinical")
    a = ap.parse_args()

    import yaml

    cfg = ExperimentConfig.model_validate(yaml.safe_load(open(f"{a.evidence}/config.yaml")))
    task = get_task(cfg.task)
    C = list(task.classes)
    if a.before and a.after:
        before, after = (Calibration.from_dict(json.load(open(f))) for f in (a.before, a.after))
        raw = np.random.default_rng(0).dirichlet(np.ones(len(C)), 1000)
        print(f"balanced scores, before vs after: largest difference {np.abs(before.balanced(raw) - after.balanced(raw)).max():.1e}, "
              f"argmax differs on {(before.balanced(raw).argmax(1) != after.balanced(raw).argmax(1)).sum()} of 1000; "
              f"posteriors: largest difference {np.abs(before.posterior(raw) - after.posterior(raw)).max():.3f}")
    if a.fold_clinical and a.refit_clinical:
        for name, path in (("fold model", a.fold_clinical), ("refit", a.refit_clinical)):
            c = pd.read_csv(path)
            ok = (c["action"] != "cannot_assess").to_numpy()
            p = c.loc[ok, C].to_numpy()
            print(f"{name}: {ok.sum()} assessable, referred {c.loc[ok, 'action'].isin(['routine_referral', 'urgent_referral']).mean():.3f}, "
                  f"urgent {(c.loc[ok, 'action'] == 'urgent_referral').mean():.3f}, mean top posterior {p.max(1).mean():.3f}, "
                  f"mean entropy {-(p * np.log(np.clip(p, 1e-12, 1))).sum(1).mean():.3f}")
    oof = pd.read_csv(f"{a.evidence}/oof.csv", dtype={"lesion_id": str})
    full = load_manifest(a.manifest)
    y = targets(full.set_index("lesion_id").loc[oof["lesion_id"]].reset_index(), task)
    raw = oof[C].to_numpy()
    s = training_prior(training_class_counts(full, task, oof["fold"].unique()), cfg.train.sampler_power)
    for mode in ("prior", "temperature"):
        post, _, Ts = cross_fitted(mode, y, raw, s)
        print(f"posterior '{mode}', cross-fitted (5 random folds): ECE {expected_calibration_error(y, post):.3f}, "
              f"NLL {log_loss(y, post):.3f}, T {np.round(Ts, 2).tolist()}")
    bas = [balanced_accuracy(y, cross_fitted("temperature", y, raw, s, seed)[1]) for seed in range(5)]
    print(f"balanced rule: no temperature {balanced_accuracy(y, raw / s):.3f}; fitted temperature (cross-fitted, "
          f"5 fold seeds) {min(bas):.3f}–{max(bas):.3f}")


if __name__ == "__main__":
    main()
