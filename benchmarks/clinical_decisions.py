"""The clinical figures of a cross-validated run, from its out-of-fold predictions — and, label-free, what the same
decisions do on a test set whose labels are held back.

    python benchmarks/clinical_decisions.py --run runs/ham_rec --manifest ham_d7.parquet \
        [--test-clinical isic2018_test_clinical.csv] [--member-clinical fold_0.csv …] [--n-boot 1000] [--markdown out.md]

Out of fold (each lesion predicted by the fold model that did not train on it; HAM10000 lesions only when the run
added train-only rows): balanced accuracy of the balanced rule, melanoma AUROC, top-label ECE of the raw output, the
posteriors and the balanced scores; the bundle's operating point (in-sample and cross-validated); the conformal
differential (cross-conformal); by label provenance (histology vs the rest). On the test file: the share referred,
urgent, "cannot assess", the mean set size, and the EM estimate of the test case mix (Saerens et al. 2002) — none of
which needs a label, and none of which was used to fit anything.
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from dermfusion.bundle import read_bundle, resolve_run
from dermfusion.data.manifest import load_manifest, targets
from dermfusion.evaluation import decision_rules
from dermfusion.evaluation.calibration import Calibration
from dermfusion.evaluation.metrics import auroc_per_class, balanced_accuracy, bootstrap_ci, expected_calibration_error
from dermfusion.evaluation.posterior import estimate_prior_em, prior_shift_distance
from dermfusion.runtime.device import cpu_name


def ci_text(fn, y, p, n_boot):
    lo, hi = bootstrap_ci(fn, y, p, n=n_boot, seed=0)
    return f"{fn(y, p):.3f} [{lo:.3f}, {hi:.3f}]"


def set_sizes(clinical: pd.DataFrame) -> pd.Series:
    """The number of classes in each lesion's prediction set (the ``differential`` column, codes joined by "|")."""
    return clinical["differential"].fillna("").map(lambda v: len([c for c in v.split("|") if c]))


def who_is_referred(task, op, oof_post, test_post, t: pd.DataFrame) -> list[str]:
    """Label-free rows on the test file: which clause of the operating point refers, how many nevus-like lesions are
    referred (test vs out of fold), the out-of-fold referral rate the service's alert compares with, and the malignant
    share the test would need for "≤ 40 % of benign lesions referred" to be reachable at all."""
    if not op:
        return []
    C = list(task.classes)
    referred = t["action"].isin(["routine_referral", "urgent_referral"]).to_numpy()
    R = referred.mean()
    risk = decision_rules.risk_scores(task, test_post)
    by_risk = risk >= float(op["routine_risk"])
    by_class = np.zeros(len(t), dtype=bool)
    for c, cut in (op.get("routine_class_probability") or {}).items():
        by_class |= test_post[:, C.index(c)] >= float(cut)
    oof_referred = decision_rules.triage_levels(task, oof_post, op) > 0
    rows = [f"| referred by a class-probability cut alone / by the risk score alone | "
            f"{(referred & by_class & ~by_risk).mean():.3f} / {(referred & by_risk & ~by_class).mean():.3f} |",
            f"| out-of-fold referral rate of this operating point (the alert's yardstick) / test ÷ that | "
            f"{oof_referred.mean():.3f} / {R / max(oof_referred.mean(), 1e-9):.2f} |",
            f"| malignant share the test needs for ≤ 40 % of benign lesions to be referred: (R − 0.4) / 0.6 | "
            f"{max(R - 0.4, 0) / 0.6:.3f} |"]
    if "NV" in C and "MEL" in C:
        nv, mel = C.index("NV"), C.index("MEL")
        like = test_post.argmax(1) == nv
        like_oof = oof_post.argmax(1) == nv
        rows.append(f"| nevus-like lesions (likeliest class NV) referred: test / out of fold | "
                    f"{referred[like].mean():.3f} / {oof_referred[like_oof].mean():.3f} "
                    f"({int((referred & like).sum())} of {int(referred.sum())} referrals; median P(MEL) of those "
                    f"{np.median(test_post[referred & like, mel]):.3f}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--test-clinical", type=Path)
    ap.add_argument("--member-clinical", type=Path, nargs="*", default=[],
                    help="the same test images predicted by each fold model alone (predict FOLD/bundle --clinical): "
                         "is the test's referral rate the ensemble's averaging or the models' own?")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    b = read_bundle(resolve_run(args.run)[0])
    task, cal, dec = b.task, Calibration.from_dict(b.calibration), b.decisions
    C = list(task.classes)
    oof = pd.read_csv(args.run / "oof.csv", dtype={"lesion_id": str})
    man = load_manifest(args.manifest).set_index("lesion_id").loc[oof["lesion_id"]].reset_index()
    y = targets(man, task)
    raw = oof[C].to_numpy()
    post, bal = cal.posterior(raw), cal.balanced(raw)
    mel = C.index("MEL")
    lines = [f"# Clinical figures of {args.run} ({len(oof)} out-of-fold lesions)",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {cpu_name()} · Python {platform.python_version()}", ""]
    n = args.n_boot
    lines += ["| out of fold | value [95 % CI] |", "|---|---:|",
              f"| balanced accuracy, balanced rule | {ci_text(balanced_accuracy, y, bal, n)} |",
              f"| balanced accuracy, argmax of the posteriors | {ci_text(balanced_accuracy, y, post, n)} |",
              f"| melanoma AUROC (posterior) | {ci_text(lambda t, p: float(auroc_per_class(t, p)[mel]), y, post, n)} |",
              f"| top-label ECE, raw output | {ci_text(expected_calibration_error, y, raw, n)} |",
              f"| top-label ECE, posteriors | {ci_text(expected_calibration_error, y, post, n)} |",
              f"| top-label ECE, balanced scores | {ci_text(expected_calibration_error, y, bal, n)} |"]
    if "dx_confirmation" in man.columns:
        histo = (man["dx_confirmation"].astype(str) == "histo").to_numpy()
        lines.append(f"| balanced accuracy, balanced rule, histology-confirmed only ({histo.sum()}) | "
                     f"{ci_text(balanced_accuracy, y[histo], bal[histo], n)} |")
        lines.append(f"| melanoma AUROC (posterior), histology-confirmed only | "
                     f"{ci_text(lambda t, p: float(auroc_per_class(t, p)[mel]), y[histo], post[histo], n)} |")
        op = dec.get("triage")
        if op:  # the bundle's rule applied to the histology-confirmed benign lesions: the hard ones
            refer = decision_rules.triage_levels(task, post, op) > 0
            benign = ~np.isin(y.argmax(1), task.malignant_indices)
            lines.append(f"| benign lesions referred at the operating point, histology-confirmed only "
                         f"({int((benign & histo).sum())}) | {refer[benign & histo].mean():.3f} "
                         f"(all benign: {refer[benign].mean():.3f}) |")
    lines.append(f"\ncalibration: T = {cal.temperature:.3f}, prior (out-of-fold mix) "
                 + ", ".join(f"{c} {v:.3f}" for c, v in zip(C, cal.prior or [])))
    op = dec.get("triage")
    if op:
        rep = op["out_of_fold"]
        def cuts(d):
            return " or ".join(f"P({c}) ≥ {v:.4f}" for c, v in (d or {}).items()) or "none"
        wanted = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in op["targets"].items() if v is not None)
        lines += ["", f"operating point (targets: {wanted}): routine referral at risk ≥ {op['routine_risk']:.1f} "
                      f"or {cuts(op['routine_class_probability'])}; urgent at {cuts(op['urgent_class_probability'])}",
                  "",
                  "| operating point | in-sample [95 % CI] | cross-validated [95 % CI] |", "|---|---:|---:|"]
        for k in ("melanoma_sensitivity", "malignant_sensitivity", "specificity", "benign_referral_rate",
                  "referral_rate", "urgent_rate"):
            i, ci = rep["in_sample"][k], rep["ci95"][k]
            cv, cvci = rep.get("cross_validated", {}).get(k), rep.get("cross_validated_ci95", {}).get(k)
            lines.append(f"| {k} | {i:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                         + (f"{cv:.3f} [{cvci[0]:.3f}, {cvci[1]:.3f}] |" if cv is not None else "— |"))
    conf = dec.get("differential")
    if conf:
        cc, ci = conf["out_of_fold"]["cross_conformal"], conf["out_of_fold"]["ci95"]
        lines += ["", f"conformal differential, level {conf['level']} (class levels {conf.get('class_levels') or {}}), "
                      "cross-conformal:", "", "| measure | value [95 % CI] |", "|---|---:|"]
        for k in ("coverage", "melanoma_coverage", "mean_set_size"):
            lines.append(f"| {k} | {cc[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}] |")
        lines.append("| coverage by class | " + ", ".join(f"{c} {v:.3f}" for c, v in cc["coverage_by_class"].items())
                     + " |")
    if args.test_clinical:
        t = pd.read_csv(args.test_clinical)
        p = t[C].to_numpy()
        em = estimate_prior_em(p, cal.prior)
        sizes = set_sizes(t) if "differential" in t else None
        lines += ["", f"test file {args.test_clinical} ({len(t)} lesions, labels held back; nothing fitted on it):", "",
                  "| label-free figure | value |", "|---|---:|",
                  f"| referred (routine or urgent) | {t['action'].isin(['routine_referral', 'urgent_referral']).mean():.3f} |",
                  f"| urgent | {(t['action'] == 'urgent_referral').mean():.3f} |",
                  f"| cannot assess | {(t['action'] == 'cannot_assess').mean():.3f} |",
                  f"| mean posterior per class | " + ", ".join(f"{c} {v:.3f}" for c, v in zip(C, p.mean(0))) + " |",
                  f"| EM estimate of the test case mix | " + ", ".join(f"{c} {v:.3f}" for c, v in zip(C, em["prior"]))
                  + f" (distance from the training prior {prior_shift_distance(em['prior'], cal.prior):.3f}) |"]
        if sizes is not None:
            lines.append(f"| mean prediction-set size | {sizes.mean():.2f} (empty sets {(sizes == 0).mean():.3f}) |")
        op_mel = (t["differential"].fillna("").str.contains("MEL")).mean() if "differential" in t else float("nan")
        lines.append(f"| sets naming MEL | {op_mel:.3f} |")
        lines += who_is_referred(task, op, post, p, t)
    if args.member_clinical:
        lines += ["", "the same test images, each fold model alone (the run's decisions applied to its posteriors):", "",
                  "| file | referred | urgent | mean set size |", "|---|---:|---:|---:|"]
        for f in [f for f in (args.test_clinical, *args.member_clinical) if f]:
            t = pd.read_csv(f)
            lines.append(f"| {Path(f).name} | {t['action'].isin(['routine_referral', 'urgent_referral']).mean():.3f} | "
                         f"{(t['action'] == 'urgent_referral').mean():.3f} | {set_sizes(t).mean():.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
