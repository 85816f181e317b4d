"""Which operating-point rule, chosen on out-of-fold posteriors, keeps its promise on another collection?

    python benchmarks/operating_point_rules.py --run runs/ham_pre_cv --manifest ham_train.parquet \
        --other-clinical d7_clinical.csv --other-manifest d7_as_isic.parquet [--markdown out.md]

Every rule is chosen on the run's out-of-fold posteriors (``oof_calibrated.csv``) only, then applied to the other
collection's posteriors (the run's ``predict --clinical`` file; "cannot assess" rows left out) and judged with its
labels:
- ``risk or P(MEL)``: the product's rule (``choose_operating_point``), at the targets given and at stricter ones;
- ``risk alone``: one cut on the summed malignant posterior, the lowest that meets both targets out of fold;
- ``P(MEL) alone`` + ``risk alone`` are the two clauses of the first taken apart.
Printed as markdown: per rule, the out-of-fold (in-sample) and the other collection's melanoma sensitivity,
malignant sensitivity and benign referral, with bootstrap 95 % intervals on the other collection.
"""
from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from dermfusion.bundle import read_bundle, resolve_run
from dermfusion.data.manifest import load_manifest, targets
from dermfusion.data.predictions import prediction_ids
from dermfusion.evaluation import decision_rules as dr
from dermfusion.runtime.device import cpu_name
from operating_point_transfer import boot_rates, emit, fmt  # benchmarks/: the same intervals and output

KEYS = ("melanoma_sensitivity", "malignant_sensitivity", "benign_referral_rate")


def lowest_cut(scores: np.ndarray, positives: np.ndarray, share: float) -> float:
    """The highest cut that ``share`` of the positives' scores still reach."""
    s = np.sort(scores[positives])[::-1]
    return float(s[int(np.ceil(share * len(s) - 1e-9)) - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--manifest", required=True, help="the run's training manifest (out-of-fold labels)")
    ap.add_argument("--other-clinical", required=True)
    ap.add_argument("--other-manifest", required=True)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--markdown")
    a = ap.parse_args()

    task = read_bundle(resolve_run(a.run)[0]).task
    C, mel_i = list(task.classes), task.classes.index("MEL")
    oof = pd.read_csv(f"{a.run}/oof_calibrated.csv", dtype={"lesion_id": str})
    y_oof = targets(load_manifest(a.manifest).set_index("lesion_id").loc[oof["lesion_id"]].reset_index(), task).argmax(1)
    p_oof = oof[C].to_numpy(np.float64)
    other = load_manifest(a.other_manifest)
    cl = pd.read_csv(a.other_clinical)
    if cl[prediction_ids(other, task)[0]].astype(str).tolist() != prediction_ids(other, task)[1]:
        raise SystemExit(f"{a.other_clinical} is not the prediction of {a.other_manifest}'s rows in order")
    ok = (cl["action"] != "cannot_assess").to_numpy()
    y_o, p_o = targets(other, task).argmax(1)[ok], cl[C].to_numpy(np.float64)[ok]

    malignant = np.isin(y_oof, list(task.malignant_indices))
    risk_oof = dr.risk_scores(task, p_oof)
    rules = {}
    for t in (0.95, 0.97, 0.99):
        op = dr.choose_operating_point(task, y_oof, p_oof, melanoma_sensitivity=t, malignant_sensitivity=t)
        rules[f"risk or P(MEL), targets {t:.2f}"] = op
        r = min(lowest_cut(risk_oof, y_oof == mel_i, t), lowest_cut(risk_oof, malignant, t))
        rules[f"risk alone, targets {t:.2f}"] = {**op, "routine_risk": r, "routine_class_probability": {}}
    rows = [f"Machine: {cpu_name()} ({platform.machine()}), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; chosen on "
            f"`{a.run}`'s {len(y_oof)} out-of-fold posteriors, judged on `{a.other_manifest}` ({ok.sum()} assessable "
            f"lesions, {(y_o == mel_i).sum()} melanomas); urgent referral as the product's rule (P(MEL) cut, ≤ 10 %)", "",
            "| rule (chosen out of fold) | out of fold: melanoma / malignant sensitivity, benign referred | other "
            "collection: melanoma sensitivity | malignant sensitivity | benign referred |", "|---|---|---|---|---|"]
    for name, op in rules.items():
        ins = dr.triage_rates(task, y_oof, dr.triage_levels(task, p_oof, op))
        there = boot_rates(task, y_o, dr.triage_levels(task, p_o, op), a.n_boot)
        rows.append(f"| {name} | {ins['melanoma_sensitivity']:.3f} / {ins['malignant_sensitivity']:.3f}, "
                    f"{ins['benign_referral_rate']:.3f} | " + " | ".join(fmt(there[k]) for k in KEYS) + " |")
    emit(rows, a.markdown)


if __name__ == "__main__":
    main()
