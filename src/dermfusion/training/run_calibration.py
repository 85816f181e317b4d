"""What a run fits on its out-of-fold predictions and writes into every bundle: the posterior calibration
(``calibration.json``) and the decision rules built on it (``decisions.json``).

Files of a cross-validated run (docs/CLINICAL.md):

- ``oof.csv``            raw network output of each lesion's held-out fold model (what calibration is fitted on);
- ``oof_calibrated.csv`` the **posteriors** under the training prior (temperature + per-class bias applied) — what
                         a clinician's probabilities are, and what the operating point and the conformal sets are
                         fitted on;
- ``oof_balanced.csv``   the balanced rule's scores (posteriors divided by the training prior): what the official
                         challenge files carry; evaluate this one for the challenge metric.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..bundle import update_files
from ..console import console
from ..evaluation.calibration import Calibration, calibrate_oof, fit_temperature, training_prior
from ..evaluation.conformal import conformal_report, fit_conformal, lesions_needed
from ..evaluation.decision_rules import EVIDENCE_FILE, choose_operating_point, operating_point_report, write_evidence
from ..evaluation.metrics import balanced_accuracy, expected_calibration_error, log_loss
from ..evaluation.posterior import fit_bias_temperature, normalise_prior
from ..evaluation.quality_gate import confidence_reference
from .val_metrics import epoch_metrics

MIN_PER_CLASS = 20  # out-of-fold lesions of every class before per-class biases are fitted
# a melanoma-only operating point whose malignant sensitivity falls this far below its melanoma sensitivity is called
# out (the ensemble of the ISIC 2018 recipe with the segmentation-guided network: 0.939 vs 0.715 out of fold)
MALIGNANT_GAP_WARNING = 0.05


def fit_posterior(mode: str, y: np.ndarray, raw: np.ndarray, sampling_prior: np.ndarray) -> tuple[float, list, list]:
    """(temperature, per-class bias, prior) turning raw output into posteriors under the out-of-fold class mix.

    ``bias_temperature``: both fitted by log-loss (bias-corrected temperature scaling); ``temperature``: T fitted,
    bias = log(mix / sampling prior) — Bayes' rule from the prior the sampler trained under; ``prior``: T = 1 and
    that bias (no fitting at all)."""
    prior = normalise_prior(y.sum(0) + 1e-9)
    analytic = (np.log(prior) - np.log(normalise_prior(sampling_prior))).tolist()
    if mode == "bias_temperature":
        T, bias = fit_bias_temperature(y, raw)
        return T, bias, prior.tolist()
    if mode == "temperature":
        z = np.log(np.clip(raw, 1e-12, 1)) + np.asarray(analytic)[None]
        T = fit_temperature(y, np.exp(z - z.max(1, keepdims=True)))
        return T, (np.asarray(analytic) / T).tolist(), prior.tolist()
    return 1.0, analytic, prior.tolist()


def tune_prior_strength(y: np.ndarray, posterior: np.ndarray, prior, strengths=None) -> tuple[float, dict]:
    """The balanced rule's strength k (divide by prior ** k) that maximises out-of-fold balanced accuracy."""
    strengths = np.round(np.arange(0, 2.01, 0.1), 2) if strengths is None else strengths
    logp, logpi = np.log(np.clip(posterior, 1e-12, 1)), np.log(normalise_prior(prior))
    table = {float(k): balanced_accuracy(y, logp - k * logpi[None]) for k in strengths}
    return max(table, key=lambda k: (table[k], -abs(k - 1))), table


def fit_decisions(options: dict, task, y_idx: np.ndarray, posterior: np.ndarray, folds, *, n_boot: int = 500) -> dict:
    """The decision rules fitted on out-of-fold posteriors: the triage operating point for the targets in
    ``options`` (with its in-sample and cross-validated consequences) and the conformal differential (with its
    cross-conformal coverage and set size). A task without malignant classes gets no operating point."""
    out: dict = {"format": 1, "fitted_on": f"{len(y_idx)} out-of-fold posteriors",
                 # the "cannot assess" model check's cut comes from these (hashed here: it changes answers)
                 "model_check": confidence_reference(posterior)}
    targets = {"melanoma_sensitivity": float(options.get("melanoma_sensitivity", 0.95)),
               "malignant_sensitivity": options.get("malignant_sensitivity"),
               "max_urgent_rate": options.get("max_urgent_rate", 0.10)}
    if task.malignant:
        try:
            op = choose_operating_point(task, y_idx, posterior, **targets)
        except ValueError as e:
            console.print(f"[yellow]no operating point: {e}[/]")
        else:
            op["chosen_on"] = out["fitted_on"]
            op["out_of_fold"] = operating_point_report(task, y_idx, posterior, op, folds=folds, choose=targets,
                                                       n_boot=n_boot)
            out["triage"] = op
    level = float(options.get("conformal_level", 0.95))
    class_levels = options.get("conformal_class_levels") or {}
    conf = fit_conformal(task, y_idx, posterior, level, class_levels)
    conf["out_of_fold"] = conformal_report(task, y_idx, posterior, level, folds=folds, n_boot=n_boot,
                                           class_levels=class_levels)
    out["differential"] = conf
    return out


def calibrate_run(options, task, y: np.ndarray, oof: pd.DataFrame, bundles, sampler_power: float = 0.0, *,
                  class_counts=None, evidence: str | None = None, bundle_sampling_prior=None) -> dict:
    """Fit the posterior calibration and the decision rules on out-of-fold predictions and write them into every
    bundle of the run (``calibration.json`` + ``decisions.json``, each bundle re-sealed).

    options (``calibration`` of the config): posterior (bias_temperature | temperature | prior), prior_adjustment —
    the balanced rule: training_prior (divide by the training prior ** prior_strength), balanced_accuracy (strength
    tuned on OOF), none (strength 0) — cuts (MILK10k, nested estimate), the operating-point targets and the conformal
    level. ``class_counts``: the training rows' class counts (``training_class_counts``), for the sampling prior.

    ``evidence``: the out-of-fold predictions are another run's (a cross-validated run of the same recipe standing in
    for a full-data refit); ``bundle_sampling_prior``: the prior the bundles' own sampler drew with, when it is not
    the evidence models' — the bias is shifted by Bayes' rule so the bundles' output lands on the posteriors the
    decisions were fitted on (with no fitted temperature, T = 1, and ``prior_strength`` 1 the balanced rule is unchanged by the shift)."""
    if hasattr(options, "model_dump"):
        options = options.model_dump()
    raw = oof[list(task.classes)].to_numpy(np.float64)
    folds = oof["fold"].to_numpy()
    counts = y.sum(0) if class_counts is None else np.asarray(class_counts, float)
    mode = options.get("posterior", "bias_temperature") if options.get("temperature", True) else "prior"
    if mode == "bias_temperature" and y.sum(0).min() < MIN_PER_CLASS:
        # a per-class bias fitted on a handful of lesions follows their noise: Bayes' rule from the sampler's prior
        # instead, with a fitted temperature
        console.print(f"[yellow]calibration: a class has fewer than {MIN_PER_CLASS} out-of-fold lesions "
                      f"({dict(zip(task.classes, y.sum(0).astype(int).tolist()))}); bias from the training prior, "
                      "temperature fitted[/]")
        mode = "temperature"
    T, bias, prior = fit_posterior(mode, y, raw, training_prior(counts, sampler_power))
    cal = Calibration(T, None, None, bias, prior, 0.0)
    post = cal.posterior(raw)
    report: dict = {"n": int(len(raw)), "posterior": mode, "temperature": T, "bias": bias, "prior": prior,
                    "nll_raw": log_loss(y, raw), "nll_posterior": log_loss(y, post),
                    "ece_raw": expected_calibration_error(y, raw), "ece_posterior": expected_calibration_error(y, post)}
    rule = options.get("prior_adjustment", "none")
    if rule == "training_prior":
        cal.prior_strength = float(options.get("prior_strength", 1.0))
        _warn_strength_on_oof_mix(task, cal.prior_strength, prior, counts)
    elif rule == "balanced_accuracy":
        cal.prior_strength, table = tune_prior_strength(y, post, prior)
        report["balanced_accuracy_by_strength"] = table
    report["balanced_rule"] = {"rule": rule, "prior_strength": cal.prior_strength}
    cuts = options.get("cuts", "auto")
    cuts = None if cuts == "auto" else bool(cuts)
    if cuts or (cuts is None and task.metric == "milk10k_dice"):
        fitted, cut_report = calibrate_oof(task, y, cal.balanced(raw), folds, temperature=False, cuts=True,
                                           eval_size=options.get("eval_size"))
        cal.cuts = fitted.cuts
        report["cuts"] = cut_report.get("cuts")
    report["oof_posterior"] = epoch_metrics(task, y, post)
    report["oof_balanced"] = epoch_metrics(task, y, cal.balanced(raw))
    decisions = fit_decisions(options, task, y.argmax(1), post, folds)
    if evidence is not None:
        decisions["fitted_on"] = f"{len(raw)} out-of-fold posteriors of {evidence} (the same recipe's fold models)"
        report["evidence"] = evidence
        for part in ("triage", "differential"):
            if part in decisions and "chosen_on" in decisions[part]:
                decisions[part]["chosen_on"] = decisions["fitted_on"]
    d = cal.to_dict()
    if bundle_sampling_prior is not None:  # raw output under another sampler: log(s_evidence / s_bundle) / T more
        shift = np.log(training_prior(counts, sampler_power)) - np.log(normalise_prior(bundle_sampling_prior))
        d["bias"] = (np.asarray(bias) + shift / T).tolist()
    for b in bundles:  # one re-seal per bundle (the model file is hashed once, not three times)
        update_files(b, {"calibration.json": lambda f: f.write_text(json.dumps(d, indent=2)),
                         **_decision_files(decisions, post, y.argmax(1), folds)})
    console.print(f"calibration ({mode}): T = {T:.3f}, out-of-fold ECE {report['ece_raw']:.3f} raw → "
                  f"{report['ece_posterior']:.3f} posterior; balanced rule (prior ** {cal.prior_strength:g}): "
                  f"balanced accuracy {report['oof_balanced']['balanced_accuracy']:.4f}")
    _print_decisions(task, decisions)
    return {"fitted": d, "report": report, "decisions": _summary(decisions)}


def _warn_strength_on_oof_mix(task, strength: float, oof_mix, train_counts) -> None:
    """At strength 1 the balanced rule is the raw output divided by the sampler's prior, whatever mix the posteriors
    are under. At any other strength it also carries (posterior mix) ** (1 − strength): for a cross-validated run
    that is the out-of-fold lesions' mix, while a full-data refit applies its training rows' mix. Say so when the two
    differ (e.g. a Derm7pt --folds 0 run, whose out-of-fold lesions are the validation split)."""
    train_mix = normalise_prior(np.asarray(train_counts, float) + 1e-9)
    gap = float(np.abs(np.asarray(oof_mix) - train_mix).max())
    if abs(strength - 1.0) > 1e-9 and gap > 0.02:
        console.print(f"[yellow]calibration: prior_strength {strength:g} ≠ 1 divides by the out-of-fold class mix, which "
                      f"differs from the training rows' by up to {gap:.2f} "
                      f"({', '.join(f'{c} {a:.2f}/{b:.2f}' for c, a, b in zip(task.classes, oof_mix, train_mix))}): "
                      "this run's balanced rule is not the one its full-data refit applies; judge the strength on "
                      "the training mix (benchmarks/derm7pt_prior_strength.py)[/]")


RECIPE_KEYS_SAME = ("task", "model", "data", "loss")  # what must match for one run's evidence to stand for another's


def recipe_differences(evidence_cfg: dict, run_cfg: dict) -> list[str]:
    """The settings in which a run standing as evidence differs from the run it stands for (model, data, loss;
    ``train`` beyond the sampler is allowed to differ: a refit may train longer)."""
    out = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path}: {a!r} (evidence) vs {b!r}")

    for key in RECIPE_KEYS_SAME:
        walk(evidence_cfg.get(key), run_cfg.get(key), key)
    walk((evidence_cfg.get("train") or {}).get("sampler_power"), (run_cfg.get("train") or {}).get("sampler_power"),
         "train.sampler_power")
    return out


def _decision_files(decisions: dict, posterior: np.ndarray, y_idx: np.ndarray, folds) -> dict:
    """The writers of a bundle's decisions.json and evidence file (for ``update_files``)."""
    return {"decisions.json": lambda f: f.write_text(json.dumps(decisions, indent=1, default=float)),
            EVIDENCE_FILE: lambda f: write_evidence(f, posterior, y_idx, folds)}


def write_decisions(bundle: Path, options: dict, task, y_idx: np.ndarray, posterior: np.ndarray, folds) -> dict:
    """The decision rules of a bundle that combines runs and carries its own calibration (``dermfusion ensemble``,
    ``stack``): fitted on its out-of-fold posteriors (``fit_decisions``, ``options`` as a config's ``calibration``)
    and written as ``decisions.json`` + the evidence file, the bundle re-sealed."""
    decisions = fit_decisions(options, task, y_idx, posterior, folds)
    update_files(bundle, _decision_files(decisions, posterior, y_idx, folds))
    _print_decisions(task, decisions)
    return decisions


def _summary(decisions: dict) -> dict:
    """The decisions' figures without the conformal calibration scores (summary.json stays small)."""
    out = {k: v for k, v in decisions.items() if k != "differential"}
    conf = decisions.get("differential") or {}
    out["differential"] = {k: v for k, v in conf.items() if k != "calibration_scores"}
    return out


def melanoma_only_warning(op: dict) -> str | None:
    """What to tell a user whose operating point targets melanoma alone and refers far fewer of the other cancers
    (cross-validated, else in-sample); None when a malignant target was set or the gap is small."""
    rep = op.get("out_of_fold") or {}
    cv = rep.get("cross_validated") or rep.get("in_sample") or {}
    malignant, melanoma = cv.get("malignant_sensitivity"), cv.get("melanoma_sensitivity")
    if (op.get("targets") or {}).get("malignant_sensitivity") is not None or malignant is None or melanoma is None \
            or malignant >= melanoma - MALIGNANT_GAP_WARNING:
        return None
    return (f"the operating point targets melanoma only: {malignant:.0%} of all malignant lesions (BCC, AKIEC too) "
            "are referred. Set a target for them as well — `calibration.malignant_sensitivity` in the config, or "
            "`dermfusion operating-point RUN --manifest M --malignant-sensitivity 0.95` — and read what it costs.")


def _print_decisions(task, decisions: dict) -> None:
    op = decisions.get("triage")
    if op:
        cv = op["out_of_fold"].get("cross_validated") or op["out_of_fold"]["in_sample"]
        mel = f"melanoma sensitivity {cv['melanoma_sensitivity']:.3f}, " if "melanoma_sensitivity" in cv else ""

        def cuts(d):
            return " or ".join(f"P({c}) ≥ {v:.3f}" for c, v in (d or {}).items()) or "none"
        routine, urgent = cuts(op["routine_class_probability"]), cuts(op["urgent_class_probability"])
        console.print(f"operating point (routine: risk ≥ {op['routine_risk']:.1f} or {routine}; urgent: {urgent}): "
                      f"cross-validated {mel}malignant sensitivity "
                      f"{cv['malignant_sensitivity']:.3f}, benign referred {cv['benign_referral_rate']:.3f}, "
                      f"urgent {cv['urgent_rate']:.3f}")
        warning = melanoma_only_warning(op)
        if warning:
            console.print(f"[yellow]{warning}[/]")
    conf = decisions.get("differential")
    if conf:
        cc = conf["out_of_fold"]["cross_conformal"]
        console.print(f"conformal differential ({conf['level']:.0%}): cross-conformal coverage {cc['coverage']:.3f}, "
                      f"mean set size {cc['mean_set_size']:.2f}"
                      + (f", melanoma coverage {cc['melanoma_coverage']:.3f}" if "melanoma_coverage" in cc else ""))
        rare = conf.get("always_in") or {}
        if rare:
            levels = conf.get("class_levels") or {}
            console.print("[yellow]in every set: " + ", ".join(
                f"{c} ({n} lesions; needs {lesions_needed(levels.get(c, conf['level']))} at "
                f"{levels.get(c, conf['level']):.0%})" for c, n in rare.items())
                + " — too few out-of-fold lesions of a class to rule it out at its level[/]")


def write_calibrated_oof(task, oof: pd.DataFrame, calibration: dict, path: Path) -> Path:
    """The out-of-fold **posteriors** (``oof_calibrated.csv``) and, beside them, the balanced rule's scores
    (``oof_balanced.csv``, the file to score for the challenge metric). ``oof.csv`` holds the raw output."""
    cal = Calibration.from_dict(calibration)
    raw = oof[list(task.classes)].to_numpy()
    for f, values in ((path, cal.posterior(raw)), (path.with_name("oof_balanced.csv"), cal.balanced(raw))):
        out = oof.copy()
        out[list(task.classes)] = values
        out.to_csv(f, index=False, float_format="%.6f")
    return path
