"""Does an operating point chosen on one collection's out-of-fold predictions hold on another collection — with the
other collection's labels in hand? And what does choosing it again on a labelled local sample buy?

    python benchmarks/operating_point_transfer.py --run runs/ham_pre_cv --clinical d7_clinical.csv \
        --manifest d7_as_isic.parquet [--local-fold 1] [--n-boot 1000] [--markdown out.md]

``--clinical``: the run's ``dermfusion predict RUN --manifest M --clinical FILE`` on the other collection (posteriors,
action, differential; the rows of ``--manifest`` in order). ``--manifest``: that collection, labelled in the run's
task (e.g. Derm7pt's train + valid mapped onto ISIC 2018 classes, ``dermfusion data combine --label-map
derm7pt_to_isic2018``), with its ``fold`` column splitting it into a local sample (``--local-fold``) and the rest.

Prints, as markdown rows: the bundle's out-of-fold claims (its own ``decisions.json``); what the same action column
and prediction sets do on the other collection (sensitivities, benign referral, referral / urgent rates, coverage,
set size; bootstrap 95 % intervals; "cannot assess" lesions left out and counted); the posteriors' ECE there; and,
on the lesions outside the local sample, the bundle's operating point against one chosen again on the local sample
for the same targets. The local re-choice sees only the local sample's labels.
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
from dermfusion.evaluation.conformal import fit_conformal, prediction_sets, set_metrics
from dermfusion.evaluation.metrics import expected_calibration_error
from dermfusion.runtime.device import cpu_name

RATES = ("melanoma_sensitivity", "malignant_sensitivity", "benign_referral_rate", "referral_rate", "urgent_rate")


def boot_rates(task, y, levels, n_boot, seed=0) -> dict:
    point = dr.triage_rates(task, y, levels)
    rng = np.random.default_rng(seed)
    boots = [dr.triage_rates(task, y[i], levels[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    return {k: (point[k], *np.nanquantile([b[k] for b in boots], [0.025, 0.975])) for k in RATES}


def fmt(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def emit(rows: list[str], markdown: str | None) -> None:
    """Print the markdown rows, and write them to ``markdown`` when given."""
    text = "\n".join(rows)
    print(text)
    if markdown:
        with open(markdown, "w") as fh:
            fh.write(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--clinical", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--local-fold", type=int, default=1, help="the manifest fold that plays the labelled local sample")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--markdown")
    a = ap.parse_args()

    bundle = read_bundle(resolve_run(a.run)[0])
    task, dec = bundle.task, bundle.decisions or {}
    op = dec.get("triage")
    if not op:
        raise SystemExit(f"{a.run}: the bundle carries no operating point")
    df = load_manifest(a.manifest)
    cl = pd.read_csv(a.clinical)
    header, ids = prediction_ids(df, task)
    if len(cl) != len(df) or cl[header].astype(str).tolist() != ids:
        raise SystemExit(f"{a.clinical} is not the prediction of {a.manifest}'s rows in order")
    y = targets(df, task).argmax(1)
    post = cl[list(task.classes)].to_numpy(np.float64)
    assessed = (cl["action"] != "cannot_assess").to_numpy()
    levels = cl["action"].map({"monitor": 0, "routine_referral": 1, "urgent_referral": 2}).fillna(-1).to_numpy(int)

    rows = [f"Machine: {cpu_name()} ({platform.machine()}), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; run "
            f"`{a.run}` ({dec.get('fitted_on')}), other collection `{a.manifest}` ({len(df)} lesions, "
            f"{int((y == task.classes.index('MEL')).sum())} melanomas; {int((~assessed).sum())} 'cannot assess', "
            "left out of the rates below)", "",
            "| figure | out of fold (the bundle's claim, cross-validated) | on the other collection |", "|---|---|---|"]
    claim = op.get("out_of_fold") or {}
    cv, cvci = claim.get("cross_validated") or claim.get("in_sample") or {}, claim.get("cross_validated_ci95") or {}
    there = boot_rates(task, y[assessed], levels[assessed], a.n_boot)
    for k in RATES:
        c = f"{cv[k]:.3f}" + (f" [{cvci[k][0]:.3f}, {cvci[k][1]:.3f}]" if k in cvci else "") if k in cv else "—"
        rows.append(f"| {k.replace('_', ' ')} | {c} | {fmt(there[k])} |")
    if "differential" in cl.columns:
        codes = cl["differential"].fillna("").map(lambda v: set(v.split("|")))
        sets = np.array([[c in s for c in task.classes] for s in codes])
        m = set_metrics(task, y[assessed], sets[assessed])
        conf = ((dec.get("differential") or {}).get("out_of_fold") or {}).get("cross_conformal") or {}
        rows += [f"| {dec['differential']['level']:.0%} set coverage | {conf.get('coverage', float('nan')):.3f} | "
                 f"{m['coverage']:.3f} |",
                 f"| melanoma coverage | {conf.get('melanoma_coverage', float('nan')):.3f} | "
                 f"{m['coverage_by_class']['MEL']:.3f} |",
                 f"| mean set size | {conf.get('mean_set_size', float('nan')):.2f} | {m['mean_set_size']:.2f} |"]
    rows.append(f"| top-label ECE of the posteriors | — | {expected_calibration_error(np.eye(task.num_classes)[y[assessed]], post[assessed]):.3f} |")

    # the local sample: the same targets, chosen again on its labels; both operating points on the other lesions
    local = (df["fold"].to_numpy() == a.local_fold) & assessed
    rest = (df["fold"].to_numpy() != a.local_fold) & assessed
    t = op.get("targets") or {}
    targets_ = {"melanoma_sensitivity": t.get("melanoma_sensitivity", 0.95),
                "malignant_sensitivity": t.get("malignant_sensitivity"), "max_urgent_rate": t.get("max_urgent_rate")}
    local_op = dr.choose_operating_point(task, y[local], post[local], **targets_)
    bundle_rest = boot_rates(task, y[rest], dr.triage_levels(task, post[rest], op), a.n_boot)
    local_rest = boot_rates(task, y[rest], dr.triage_levels(task, post[rest], local_op), a.n_boot)
    rows += ["", f"Targets {targets_}; the local sample: fold {a.local_fold} ({int(local.sum())} lesions); judged on the "
             f"other {int(rest.sum())} lesions (cuts: bundle routine risk ≥ {op['routine_risk']:.1f} or "
             f"{op['routine_class_probability']}; local routine risk ≥ {local_op['routine_risk']:.1f} or "
             f"{local_op['routine_class_probability']})", "",
             "| figure | the bundle's operating point (out of fold, other collection) | chosen again on the local sample |",
             "|---|---|---|"]
    rows += [f"| {k.replace('_', ' ')} | {fmt(bundle_rest[k])} | {fmt(local_rest[k])} |" for k in RATES]
    if "differential" in cl.columns:  # the prediction sets calibrated on the local sample too (split conformal)
        level = dec["differential"]["level"]
        local_conf = fit_conformal(task, y[local], post[local], level, dec["differential"].get("class_levels"))
        here = set_metrics(task, y[rest], sets[rest])
        there_local = set_metrics(task, y[rest], prediction_sets(task, post[rest], local_conf))
        rows += [f"| {level:.0%} set coverage / melanoma coverage / mean size | {here['coverage']:.3f} / "
                 f"{here['coverage_by_class']['MEL']:.3f} / {here['mean_set_size']:.2f} | {there_local['coverage']:.3f} / "
                 f"{there_local['coverage_by_class']['MEL']:.3f} / {there_local['mean_set_size']:.2f} |"]
    emit(rows, a.markdown)


if __name__ == "__main__":
    main()
