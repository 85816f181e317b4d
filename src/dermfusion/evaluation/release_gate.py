"""The release gate: does a model meet a written set of criteria on a held-out set — with its uncertainty counted?

``dermfusion gate BUNDLE --manifest HELD_OUT --criteria gate.yaml`` predicts the held-out lesions, then checks each
criterion of ``gate.yaml`` (``GateCriteria``; every key optional, unknown keys are errors):

  balanced_accuracy_min             balanced accuracy of the balanced rule's diagnosis (``metrics.balanced_accuracy``)
  melanoma_sensitivity_min          share of melanomas *referred* at the deployed operating point
  specificity_min                   share of benign lesions *not* referred at that operating point
  skin_tone_sensitivity_spread_max  largest minus smallest malignant referral sensitivity across the skin-tone groups
                                    present, in percentage points (skipped, with a note, without skin tone)
  calibration_error_max             top-label ECE of the posteriors, 15 bins (``metrics.expected_calibration_error``)
  latency_ms_max                    p95 of single-lesion predictions on this machine, in milliseconds

**Passing rule.** A point estimate on a few hundred lesions is not evidence, so each statistical criterion is judged
on its percentile bootstrap interval (``metrics.bootstrap_ci``, ``bootstrap`` resamples of the lesions, two-sided
``confidence``, 95 % by default): a minimum passes when the interval's *lower* bound reaches it, a maximum when its
*upper* bound stays at or below it. The resamples are the evaluate report's (same seed, same draws), so the gate's
interval for balanced accuracy and ECE is the report's. Latency is measured, not estimated: its p95 must not exceed
the maximum. A criterion that cannot be computed (no melanoma in the held-out set) fails — a gate fails closed —
except the skin-tone spread, which is skipped when fewer than two skin-tone groups have ``skin_tone_min_malignant``
malignant lesions.

**Operating point.** A lesion counts as detected when the triage policy would *refer* it (urgent or routine
referral); the caller passes that rule as ``refer`` (``dermfusion gate``: ``decision_rules.triage_levels`` at the
operating point the clinical engine uses — the bundle's, unless a service config overrides it). The "cannot assess"
image gate is not applied.

**A model change** (``--compare OLD``): with ``noninferiority_margin`` set, the new model must be non-inferior to the
old overall and — with a subset (``--subset COLUMN=VALUE``) — superior on it by more than ``subset_min_difference``,
on paired cases (``evaluation.paired_comparison``: Newcombe's interval, McNemar's exact test).
"""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import __version__
from ..config import nearest_hint, read_yaml_mapping
from ..errors import DermfusionError
from ..tasks import TaskSpec
from .fairness import UNKNOWN, slice_labels
from .metrics import balanced_accuracy, bootstrap_ci, expected_calibration_error, sensitivity_specificity
from .paired_comparison import change_rule
from .report import align, evaluate_predictions
from .report_html import fmt, jsonable

GATE_FILE = "gate.json"
PASSING_RULE = ("a minimum passes when the bootstrap interval's lower bound reaches it, a maximum when the interval's "
                "upper bound stays at or below it; latency: the measured p95")
NAN = float("nan")


class GateCriteriaError(DermfusionError, ValueError):
    """A criteria file that cannot be used; the message names the key."""


class GateCriteria(BaseModel):
    """gate.yaml: the release criteria (each optional; at least one) and how they are judged."""
    model_config = ConfigDict(extra="forbid")

    balanced_accuracy_min: Optional[float] = Field(None, ge=0, le=1)
    melanoma_sensitivity_min: Optional[float] = Field(None, ge=0, le=1)
    specificity_min: Optional[float] = Field(None, ge=0, le=1)
    noninferiority_margin: Optional[float] = Field(None, ge=0, le=1, description="a model change (--compare): its "
                                                   "correct-diagnosis rate may be lower than the old one's by less")
    subset_min_difference: float = Field(0.0, ge=-1, le=1, description="a model change with --subset: the lower bound "
                                         "of its improvement on the subset must exceed this")
    skin_tone_sensitivity_spread_max: Optional[float] = Field(None, ge=0, le=100, description="percentage points")
    calibration_error_max: Optional[float] = Field(None, ge=0, le=1)
    latency_ms_max: Optional[float] = Field(None, gt=0)
    bootstrap: int = Field(1000, ge=50, description="bootstrap resamples of the held-out lesions")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided interval the bounds are read from")
    seed: int = 0
    latency_lesions: int = Field(20, ge=3, description="single-lesion predictions timed (after one warm-up)")
    skin_tone_min_malignant: int = Field(5, ge=1, description="a skin-tone group is compared when it has this "
                                                              "many malignant lesions")

    @model_validator(mode="after")
    def _something_to_check(self):
        if all(getattr(self, name) is None for name in CRITERIA) and self.noninferiority_margin is None:
            raise ValueError(f"no criterion set: give at least one of {', '.join(CRITERIA)}, noninferiority_margin")
        return self


# name → (label, "min" | "max", unit shown after the threshold)
CRITERIA = {
    "balanced_accuracy_min": ("Balanced accuracy", "min", ""),
    "melanoma_sensitivity_min": ("Melanoma sensitivity (referred)", "min", ""),
    "specificity_min": ("Specificity (benign not referred)", "min", ""),
    "skin_tone_sensitivity_spread_max": ("Skin-tone sensitivity spread", "max", " pts"),
    "calibration_error_max": ("Calibration error (ECE)", "max", ""),
    "latency_ms_max": ("Latency p95, one lesion", "max", " ms"),
}


def load_criteria(path: str | Path) -> GateCriteria:
    p = Path(path)
    raw = read_yaml_mapping(p, GateCriteriaError, "gate criteria")
    try:
        return GateCriteria.model_validate(raw)
    except ValidationError as e:
        why = "; ".join(_explain(err) for err in e.errors())
        raise GateCriteriaError(f"invalid gate criteria {p}: {why}") from None


def _explain(err: dict) -> str:
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key {where}" + nearest_hint(str(err["loc"][-1]), GateCriteria.model_fields)
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


# ------------------------------------------------------------------------------------------------ statistics
def skin_tone_groups(rows: pd.DataFrame, malignant: np.ndarray, min_malignant: int) -> tuple[dict, str | None]:
    """({group: row mask} of the skin-tone groups with ≥ min_malignant malignant lesions, note when skipped)."""
    labels = slice_labels(rows.reset_index(drop=True)).get("skin_tone")
    if labels is None:
        return {}, "the held-out manifest records no skin tone"
    groups = {g: (labels == g).to_numpy() for g in sorted(set(labels)) if g != UNKNOWN}
    counts = {g: int(malignant[m].sum()) for g, m in groups.items()}
    kept = {g: m for g, m in groups.items() if counts[g] >= min_malignant}
    if len(kept) < 2:
        shown = ", ".join(f"{g}: {n}" for g, n in counts.items()) or "none"
        return {}, (f"fewer than two skin-tone groups with ≥ {min_malignant} malignant lesions "
                    f"(malignant lesions per group: {shown})")
    return kept, None


def gate_statistics(task: TaskSpec, y_true: np.ndarray, y_prob: np.ndarray, referred: np.ndarray,
                    groups: dict[str, np.ndarray], decision_probs: np.ndarray | None = None) -> Callable[[np.ndarray], dict]:
    """The gate's statistics of the lesions at row indices ``idx`` (all lesions, or one bootstrap resample):
    ``y_prob`` are posteriors (calibration), ``decision_probs`` the balanced rule's scores (the diagnosis)."""
    decide = y_prob if decision_probs is None else decision_probs
    truth = y_true.argmax(1)
    melanoma = truth == task.index(task.melanoma_class) if task.melanoma_class else np.zeros(len(truth), bool)
    malignant = np.isin(truth, task.malignant_indices)
    group_of = np.full(len(truth), -1)
    for i, mask in enumerate(groups.values()):
        group_of[mask] = i

    def stats(idx: np.ndarray) -> dict:
        ref, mal, grp = referred[idx], malignant[idx], group_of[idx]
        sens = [sensitivity_specificity(mal[grp == i], ref[grp == i])[0] for i in range(len(groups))]
        sens = [s for s in sens if np.isfinite(s)]
        return {"balanced_accuracy_min": balanced_accuracy(y_true[idx], decide[idx]),
                "melanoma_sensitivity_min": sensitivity_specificity(melanoma[idx], ref)[0],
                "specificity_min": sensitivity_specificity(mal, ref)[1],
                "skin_tone_sensitivity_spread_max": 100 * (max(sens) - min(sens)) if len(sens) >= 2 else NAN,
                "calibration_error_max": expected_calibration_error(y_true[idx], y_prob[idx])}
    return stats


def judge(name: str, threshold: float, lo: float, hi: float) -> tuple[str, float]:
    """("pass" | "fail", the bound compared): a minimum needs lo ≥ threshold, a maximum hi ≤ threshold."""
    bound = lo if CRITERIA[name][1] == "min" else hi
    if bound is None or not np.isfinite(bound):
        return "fail", NAN
    ok = bound >= threshold if CRITERIA[name][1] == "min" else bound <= threshold
    return ("pass" if ok else "fail"), float(bound)


def run_gate(predictions: pd.DataFrame, manifest_df: pd.DataFrame, task: TaskSpec, criteria: GateCriteria,
             out_dir: str | Path, *, refer: Callable[[np.ndarray], np.ndarray], latencies_ms: list[float] | None = None,
             operating_point: dict | None = None, model: dict | None = None, manifest: str = "",
             decision_probs: np.ndarray | None = None, comparison: dict | None = None) -> dict:
    """Judge ``predictions`` (lesion_id + class columns) of the labelled ``manifest_df`` lesions against
    ``criteria``; write the evaluate report (report.html with the gate's verdict on top, metrics.json) and the gate
    record (gate.json) into ``out_dir``. Returns the record; ``record["passed"]`` is the verdict."""
    out = Path(out_dir)
    _, rows, y_true, y_prob = align(predictions, manifest_df, task)
    referred = np.asarray(refer(y_prob), dtype=bool)
    malignant = np.isin(y_true.argmax(1), task.malignant_indices)
    groups, tone_note = skin_tone_groups(rows, malignant, criteria.skin_tone_min_malignant)
    if decision_probs is not None:  # row-aligned with predictions; align() may reorder to the manifest
        order = pd.Series(np.arange(len(predictions)), index=predictions["lesion_id"].astype(str))
        decision_probs = np.asarray(decision_probs)[order.loc[rows["lesion_id"].astype(str)].to_numpy()]
    stats = gate_statistics(task, y_true, y_prob, referred, groups, decision_probs)
    n = len(y_true)
    point = stats(np.arange(n))
    # resample row indices with the report's bootstrap (same seed → the same draws as its intervals)
    index = np.arange(n, dtype=float)[:, None]
    ci = bootstrap_ci(lambda i, _: stats(i[:, 0].astype(int)), index, index, n=criteria.bootstrap,
                      seed=criteria.seed, alpha=1 - criteria.confidence)
    results = []
    for name, (label, kind, unit) in CRITERIA.items():
        threshold = getattr(criteria, name)
        if threshold is None:
            continue
        row = {"criterion": name, "label": label, "kind": kind, "threshold": threshold, "unit": unit.strip(),
               "value": NAN, "ci": [NAN, NAN], "bound": NAN, "status": "fail", "note": ""}
        if name == "latency_ms_max":
            ms = np.asarray(latencies_ms or [], dtype=float)
            if len(ms):
                p95 = float(np.percentile(ms, 95))
                row.update(value=p95, bound=p95, status="pass" if p95 <= threshold else "fail",
                           note=f"p95 of {len(ms)} single-lesion predictions (median {np.median(ms):.1f} ms); "
                                "measured, no interval")
            else:
                row["note"] = "latency was not measured"
        elif name == "skin_tone_sensitivity_spread_max" and tone_note:
            row.update(status="skipped", note=tone_note)
        else:
            lo, hi = ci[name]
            row.update(value=point[name], ci=[lo, hi])
            row["status"], row["bound"] = judge(name, threshold, lo, hi)
            if not np.isfinite(point[name]):
                row["note"] = ("no melanoma in the held-out set: the sensitivity cannot be shown"
                               if name == "melanoma_sensitivity_min" else "cannot be computed on the held-out set")
            elif name == "skin_tone_sensitivity_spread_max":
                row["note"] = "malignant lesions referred; groups (malignant lesions): " + ", ".join(
                    f"{g} ({int(malignant[m].sum())})" for g, m in groups.items())
        results.append(row)
    change = None
    if comparison is not None:
        change = _change_rule(task, predictions, rows, y_true, decision_probs if decision_probs is not None else y_prob,
                              comparison, criteria)
        results += change.pop("rows")
    passed = all(r["status"] != "fail" for r in results)
    mel = task.melanoma_class
    record = jsonable({
        "passed": passed, "failed": [r["criterion"] for r in results if r["status"] == "fail"],
        "criteria": results, "passing_rule": PASSING_RULE, "task": task.name, "n": n, "manifest": manifest,
        "model": model or {},
        "confidence": criteria.confidence, "n_bootstrap": criteria.bootstrap, "seed": criteria.seed,
        "operating_point": {**(operating_point or {}), "referral_rate": float(referred.mean()),
                            "melanoma_lesions": int((y_true.argmax(1) == task.index(mel)).sum()) if mel else 0,
                            "malignant_lesions": int(malignant.sum())},
        "latencies_ms": [round(float(x), 3) for x in (latencies_ms or [])], "change_rule": change,
        "settings": criteria.model_dump(), "report": "report.html",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "version": __version__})
    evaluate_predictions(predictions, manifest_df, task, out, n_bootstrap=criteria.bootstrap, seed=criteria.seed)
    report = out / "report.html"
    page = report.read_text(encoding="utf-8")
    marker = '<section class="howto">'
    section = gate_section_html(record)
    page = page.replace(marker, section + marker, 1) if marker in page else page.replace("</main>", section + "</main>")
    page = page.replace("<h1>Evaluation report", "<h1>Release gate and evaluation report", 1)
    report.write_text(page, encoding="utf-8")
    (out / GATE_FILE).write_text(json.dumps(record, indent=2))
    return record


def _change_rule(task, predictions, rows, y_true, new_probs, comparison: dict, criteria: GateCriteria) -> dict:
    """The change rule's two verdicts as gate rows, and its figures."""
    order = pd.Series(np.arange(len(predictions)), index=predictions["lesion_id"].astype(str))
    idx = order.loc[rows["lesion_id"].astype(str)].to_numpy()
    old = np.asarray(comparison["balanced_old"])[idx]
    subset = np.asarray(comparison["subset_mask"], dtype=bool)[idx]
    truth = y_true.argmax(1)
    right_new = np.asarray(new_probs).argmax(1) == truth
    right_old = old.argmax(1) == truth
    res = change_rule(right_new, right_old, subset, margin=criteria.noninferiority_margin,
                      subset_min_difference=criteria.subset_min_difference, confidence=criteria.confidence,
                      subset_name=comparison.get("subset") or "all lesions")
    out_rows = []
    ni, sup = res["noninferiority"], res["superiority"]
    out_rows.append({"criterion": "noninferiority_margin", "label": "Change: non-inferior overall", "kind": "min",
                     "threshold": -criteria.noninferiority_margin, "unit": "", "value": ni["difference"],
                     "ci": ni["ci"], "bound": ni["ci"][0], "status": "pass" if ni["passed"] else "fail",
                     "note": (f"correct diagnoses new {ni['new']:.3f} vs old {ni['old']:.3f} on {ni['n']} paired "
                              f"lesions (Newcombe interval); McNemar p = {ni['mcnemar']['p_value']:.3g}; "
                              f"compared with {comparison['compare']}")})
    if comparison.get("subset"):
        out_rows.append({"criterion": "subset_min_difference", "label": f"Change: superior on {comparison['subset']}",
                         "kind": "min", "threshold": criteria.subset_min_difference, "unit": "",
                         "value": sup["difference"], "ci": sup["ci"], "bound": sup["ci"][0],
                         "status": "pass" if sup["passed"] else "fail",
                         "note": (f"new {sup.get('new', float('nan')):.3f} vs old {sup.get('old', float('nan')):.3f} "
                                  f"on {sup['n']} paired lesions; McNemar p = "
                                  f"{(sup.get('mcnemar') or {}).get('p_value', float('nan')):.3g}")})
    res["compare"] = comparison["compare"]
    res["rows"] = out_rows
    return res


# ------------------------------------------------------------------------------------------------ output
def _value(r: dict, v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:.1f}" if r["unit"] in {"ms", "pts"} else fmt(v)


def _rows(record: dict) -> list[tuple[str, str, str, str, str, str]]:
    out = []
    for r in record["criteria"]:
        unit = f" {r['unit']}" if r["unit"] else ""
        need = f"{'≥' if r['kind'] == 'min' else '≤'} {_value(r, r['threshold'])}{unit}"
        lo, hi = r["ci"]
        interval = f"{_value(r, lo)} – {_value(r, hi)}" if lo is not None else ""
        out.append((r["label"], need, _value(r, r["value"]), interval, r["status"].upper(), r["note"]))
    return out


def print_gate(record: dict, console) -> None:
    """The verdict as a table: criterion, requirement, value, interval, PASS / FAIL / SKIPPED, why."""
    from rich.markup import escape
    from rich.table import Table

    colour = {"PASS": "green", "FAIL": "bold red", "SKIPPED": "yellow"}
    pct = round(100 * record["confidence"])
    t = Table(title=f"release gate · {record['task']} · {record['n']} held-out lesions · {pct}% bootstrap "
                    f"intervals ({record['n_bootstrap']} resamples)")
    for col in ("criterion", "required", "value", f"{pct}% CI", "result"):
        t.add_column(col, justify="right" if col in {"value", f"{pct}% CI"} else "left")
    notes = []
    for label, need, value, interval, status, note in _rows(record):
        t.add_row(escape(label), need, value, interval, f"[{colour[status]}]{status}[/]")
        notes += [f"[dim]{escape(label)}: {escape(note)}[/]"] if note else []
    console.print(t)
    for line in [f"[dim]{record['passing_rule']}[/]", *notes]:
        console.print(line, highlight=False)
    if record["passed"]:
        console.print("[bold green]RELEASE GATE PASSED[/]")
    else:
        names = ", ".join(r["label"] for r in record["criteria"] if r["status"] == "fail")
        console.print(f"[bold red]RELEASE GATE FAILED[/]: {escape(names)}", highlight=False)


def gate_section_html(record: dict) -> str:
    pct = round(100 * record["confidence"])
    rows = "".join(
        f"<tr class='{'flagged' if status == 'FAIL' else ''}'><td class='text'>{html.escape(label)}</td>"
        f"<td>{html.escape(need)}</td><td>{value}</td><td>{interval}</td><td><b>{status}</b></td>"
        f"<td class='text'>{html.escape(note)}</td></tr>"
        for label, need, value, interval, status, note in _rows(record))
    op = record["operating_point"]
    verdict = "PASSED" if record["passed"] else "FAILED"
    return (f"<section><h2>Release gate: {verdict}</h2><div class='scroll'><table><tr><th>criterion</th>"
            f"<th>required</th><th>value</th><th>{pct}% CI</th><th>result</th><th class='text'>note</th></tr>{rows}"
            f"</table></div><p class='note'>A minimum passes when the {pct}% percentile-bootstrap interval's lower "
            f"bound reaches it, a maximum when its upper bound stays at or below it ({record['n_bootstrap']} "
            f"resamples of the {record['n']} lesions). Operating point: {html.escape(op.get('rule', 'referral'))}; "
            f"{100 * op['referral_rate']:.0f}% of the held-out lesions referred. Record: gate.json. The gate's "
            "balanced accuracy is that of the balanced rule (the posteriors divided by the training prior: the "
            "challenge files' diagnosis); the report below scores the posteriors themselves (their argmax, their "
            "calibration), so its balanced accuracy is lower where the classes are imbalanced.</p></section>\n")
