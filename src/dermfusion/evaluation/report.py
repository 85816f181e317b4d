"""Evaluate a predictions CSV against a labelled manifest: metrics.json and one self-contained report.html.

The HTML has no external resources (figures and thumbnails are inlined as base64), so it can be mailed,
archived with a submission or opened on an air-gapped hospital workstation.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..data.manifest import IMAGE_COLUMNS, ManifestError, targets
from ..inference.submission import read_predictions_csv, with_lesion_id
from ..tasks import TASKS, TaskSpec
from .fairness import fairness_table
from .figures import RenderedFigure, all_figures
from .metrics import HEADLINE, bootstrap_metrics, compute_metrics, reliability_bins
from .model_card import report_link_html
from .provenance import DEFAULT_MARGIN, MIN_CLASS_LESIONS, provenance_figure, provenance_recall, provenance_section_html

MAX_ERRORS = 12
THUMB_PX = 96
ALL_CLASS_NAMES = frozenset(c for t in TASKS.values() for c in t.classes)
LABELS = {
    "official": "Official score", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro F1 (argmax)",
    "accuracy": "Accuracy", "top2_accuracy": "Top-2 accuracy", "top3_accuracy": "Top-3 accuracy",
    "milk10k_score": "MILK10k score (Dice, p > 0.5)", "macro_auroc": "Macro AUROC",
    "melanoma_sensitivity": "Melanoma sensitivity", "melanoma_specificity": "Melanoma specificity",
    "malignant_sensitivity": "Malignant sensitivity", "malignant_specificity": "Malignant specificity",
    "ece": "Expected calibration error (15 bins)", "brier": "Brier score (multiclass)", "log_loss": "Log loss",
}


class EvaluationError(ValueError):
    """Predictions that cannot be evaluated against the manifest; the message says what to fix."""


# ---------------------------------------------------------------------------- inputs
def align(predictions, manifest_df: pd.DataFrame, task: TaskSpec):
    """(predictions frame, aligned manifest rows, y_true N×C, y_prob N×C), in the predictions' row order.

    Predictions may cover a subset of the manifest (e.g. the test split); every predicted lesion must be
    in the manifest with labels, and the class columns must be exactly the task's. The id column may be
    headed `lesion_id` or `image` (the ISIC single-image format); the returned frame names it `lesion_id`.
    """
    pred = (read_predictions_csv(predictions) if isinstance(predictions, (str, Path))
            else with_lesion_id(predictions.copy()))
    if "lesion_id" not in pred.columns:
        raise EvaluationError("predictions have no lesion_id (or image) column; expected the submission format "
                              f"{task.id_column},{','.join(task.classes)}")
    missing = [c for c in task.classes if c not in pred.columns]
    foreign = [c for c in pred.columns if c in ALL_CLASS_NAMES and c not in task.classes]
    if missing or foreign:
        raise EvaluationError(
            f"prediction columns do not match task {task.name!r} (classes {', '.join(task.classes)}): "
            + (f"missing {', '.join(missing)}" if missing else "")
            + ("; " if missing and foreign else "") + (f"not in the task: {', '.join(foreign)}" if foreign else "")
            + ". Was --task right?")
    pred["lesion_id"] = pred["lesion_id"].astype(str)
    dup = pred["lesion_id"][pred["lesion_id"].duplicated()].unique()
    if len(dup):
        raise EvaluationError(f"{len(dup)} lesion id(s) appear more than once in the predictions, e.g. {', '.join(dup[:5])}")
    man = manifest_df.assign(lesion_id=manifest_df["lesion_id"].astype(str))
    if man["lesion_id"].duplicated().any():
        raise ManifestError("the manifest has duplicate lesion ids; it must have one row per lesion")
    unknown = sorted(set(pred["lesion_id"]) - set(man["lesion_id"]))
    if unknown:
        raise EvaluationError(f"{len(unknown)} predicted lesion id(s) are not in the manifest, e.g. "
                              f"{', '.join(unknown[:5])}; are predictions and manifest from the same dataset?")
    rows = man.set_index("lesion_id").loc[pred["lesion_id"]].reset_index()
    y_true = targets(rows, task).astype(float)
    # only labelled manifest rows count: predictions for unlabelled lesions (e.g. a test split without
    # ground truth) are left out and counted in pred.attrs["n_unlabelled"]
    labelled = np.isfinite(y_true).all(1)
    if not labelled.any():
        raise EvaluationError(f"none of the {len(pred)} predicted lesions has a label in the manifest (e.g. "
                              f"{', '.join(rows['lesion_id'][:5])}); evaluate against a manifest with ground truth")
    n_unlabelled = int((~labelled).sum())
    if n_unlabelled:
        pred, rows, y_true = (pred[labelled].reset_index(drop=True), rows[labelled].reset_index(drop=True),
                              y_true[labelled])
    pred.attrs["n_unlabelled"] = n_unlabelled
    try:
        y_prob = pred[list(task.classes)].to_numpy(dtype=float)
    except ValueError as e:
        raise EvaluationError(f"prediction columns must be numeric probabilities: {e}") from None
    if not np.isfinite(y_prob).all() or (y_prob < 0).any() or (y_prob > 1).any():
        raise EvaluationError("predictions must be probabilities in [0, 1] with no missing values")
    return pred, rows, y_true, y_prob


# ---------------------------------------------------------------------------- main entry
def evaluate_predictions(predictions, manifest_df: pd.DataFrame, task: TaskSpec, out_dir, n_bootstrap: int = 200,
                         seed: int = 0, *, provenance_margin: float = DEFAULT_MARGIN,
                         provenance_min_class: int = MIN_CLASS_LESIONS, shift_reference: pd.DataFrame | None = None,
                         shift_config=None) -> dict:
    """Metrics with bootstrap 95% CIs, fairness slices, recall by label provenance and worst errors →
    out_dir/metrics.json and out_dir/report.html. Returns the metrics dict (as written to metrics.json).

    With `shift_reference` (e.g. the training manifest), a covariate-shift check between it and the evaluated
    lesions is added (`evaluation.shift.check_shift`, configured by `shift_config`): evidence of whether the
    evaluated images look like the ones a model learnt from."""
    pred, rows, y_true, y_prob = align(predictions, manifest_df, task)
    n_labelled_manifest = int(np.isfinite(targets(manifest_df, task).astype(float)).all(1).sum())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = compute_metrics(task, y_true, y_prob)
    m["reliability"] = reliability_bins(y_true, y_prob)
    ci = bootstrap_metrics(task, y_true, y_prob, n=n_bootstrap, seed=seed) if n_bootstrap > 0 else \
        {"headline": {}, "per_class": {}, "n_resamples": 0, "alpha": 0.05}
    fair = fairness_table(task, y_true, y_prob, rows)
    errors = worst_errors(task, rows, y_true, y_prob)
    figures = all_figures(task, y_true, y_prob, m, ci)
    prov = provenance_recall(task, y_true, y_prob, rows, margin=provenance_margin, min_class_lesions=provenance_min_class)
    prov_fig = provenance_figure(task, prov) if prov["available"] else None
    sections = [provenance_section_html(task, prov, prov_fig)]
    shift = None
    if shift_reference is not None:
        from .shift import ShiftConfig, check_shift
        from .shift_report import shift_section_html

        shift = check_shift(shift_reference, rows, shift_config or ShiftConfig(names=("reference", "evaluated")))
        sections.append(shift_section_html(shift))
    result = {
        "task": task.name, "official_metric": task.metric, "n": int(len(y_true)),
        "n_manifest_without_prediction": n_labelled_manifest - int(len(y_true)),
        "n_predictions_without_label": int(pred.attrs.get("n_unlabelled", 0)),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "version": __version__,
        "metrics": {k: m[k] for k in HEADLINE}, "ci": ci["headline"], "n_bootstrap": ci["n_resamples"],
        "per_class": {c: {**m["per_class"][c], "ci": ci["per_class"].get(c, {})} for c in task.classes},
        "confusion_matrix": m["confusion_matrix"], "reliability": m["reliability"],
        "fairness": fair.to_dict(orient="records"),
        "worst_errors": [{k: v for k, v in e.items() if k != "thumbnail"} for e in errors],
        "figures": [f.describe() for f in figures] + ([prov_fig.describe()] if prov_fig else []),
        "provenance": prov,
        **({"shift": {k: v for k, v in shift.summary.items() if k != "all_differences"}} if shift else {}),
    }
    result = _jsonable(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "report.html").write_text(render_html(task, result, figures, errors, "".join(sections), out_dir=out), encoding="utf-8")
    return result


def worst_errors(task: TaskSpec, rows: pd.DataFrame, y_true, y_prob, k: int = MAX_ERRORS) -> list[dict]:
    """The k most confident wrong argmax predictions — the cases to review first."""
    t, p = y_true.argmax(1), y_prob.argmax(1)
    conf = y_prob.max(1)
    wrong = np.flatnonzero(t != p)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
    return [{"lesion_id": str(rows["lesion_id"].iloc[i]), "true": task.classes[t[i]], "predicted": task.classes[p[i]],
             "confidence": float(conf[i]), "p_true": float(y_prob[i, t[i]]), "thumbnail": _thumbnail(rows.iloc[i])}
            for i in wrong]


def _thumbnail(row) -> str | None:
    """Small base64 JPEG of the lesion's first available image, or None (images are optional)."""
    for col in (IMAGE_COLUMNS["dermoscopic"], IMAGE_COLUMNS["clinical"]):
        path = row.get(col, "") if hasattr(row, "get") else ""
        if isinstance(path, str) and path and Path(path).is_file():
            try:
                from PIL import Image

                with Image.open(path) as im:
                    im = im.convert("RGB")
                    im.thumbnail((THUMB_PX, THUMB_PX))
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=80)
                return base64.b64encode(buf.getvalue()).decode("ascii")
            except Exception:  # noqa: BLE001 — a broken image must not break the report
                return None
    return None


def _jsonable(x):
    """numpy → Python, NaN/inf → None (strict JSON), tuples → lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


# ---------------------------------------------------------------------------- HTML
CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--accent:#2f6fbf;--flag:#fde8e8;--small:#f5f7fa}
*{box-sizing:border-box}
body{font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--ink);
     margin:0;background:#fafbfc}
header{background:#fff;border-bottom:1px solid var(--line);padding:20px 32px}
header h1{margin:0 0 4px;font-size:22px}
header .meta{color:var(--muted)}
main{max-width:1200px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:20px 0}
h2{font-size:17px;margin:0 0 10px}
p.note{color:var(--muted);margin:6px 0 0;font-size:12.5px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:#f5f7fa;font-weight:600;white-space:normal;vertical-align:bottom}
th:first-child,td:first-child,th.text,td.text{text-align:left}
td.text{white-space:normal}
.scroll{overflow-x:auto}
tr.flagged td{background:var(--flag)}
tr.small td{color:var(--muted);background:var(--small)}
tr.total td{font-weight:600}
.ci{color:var(--muted);font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
figure{margin:0;text-align:center}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
figcaption{color:var(--muted);font-size:12.5px;margin-top:4px}
img.thumb{width:64px;height:64px;object-fit:cover;border-radius:4px}
.badge{display:inline-block;padding:1px 6px;border-radius:4px;font-size:12px;background:#e6f0fb;color:var(--accent)}
.badge.flag{background:#f8d4d4;color:#9b1c1c}
td.status{min-width:180px}
.howto ul{margin:0;padding-left:20px;color:var(--ink)}
.howto li{margin:2px 0}
"""


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ci(ci) -> str:
    if not ci or ci[0] is None:
        return ""
    return f' <span class="ci">[{_fmt(ci[0])}, {_fmt(ci[1])}]</span>'


def _headline_table(result: dict) -> str:
    rows = []
    for k in HEADLINE:
        v = result["metrics"].get(k)
        if v is None and k.startswith("melanoma"):
            continue  # task without a melanoma class
        name = LABELS[k] + (f" — {result['official_metric']}" if k == "official" else "")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(v)}{_ci(result['ci'].get(k))}</td></tr>")
    return "<div class='scroll'><table><tr><th>Metric</th><th>Value [95% CI]</th></tr>" + "".join(rows) + "</table></div>"


def _per_class_table(task: TaskSpec, result: dict) -> str:
    head = ("<tr><th>Class</th><th class='text'>Description</th><th>n</th><th>Precision</th><th>Recall</th><th>F1 [95% CI]</th>"
            "<th>Dice (p&gt;0.5)</th><th>AUROC</th><th>Avg. precision</th></tr>")
    rows = []
    for c in task.classes:
        pc = result["per_class"][c]
        mal = ' <span class="badge flag">malignant</span>' if c in task.malignant else ""
        rows.append(f"<tr><td>{html.escape(c)}{mal}</td><td class='text'>{html.escape(task.class_descriptions.get(c, ''))}</td>"
                    f"<td>{pc['support']}</td><td>{_fmt(pc['precision'])}</td><td>{_fmt(pc['recall'])}</td>"
                    f"<td>{_fmt(pc['f1'])}{_ci(pc['ci'].get('f1'))}</td><td>{_fmt(pc['dice'])}</td>"
                    f"<td>{_fmt(pc['auroc'])}</td><td>{_fmt(pc['average_precision'])}</td></tr>")
    return "<div class='scroll'><table>" + head + "".join(rows) + "</table></div>"


def _fairness_table(rows: list[dict]) -> str:
    head = ("<tr><th>Attribute</th><th class='text'>Group</th><th>n</th><th>Malignant n</th><th>Balanced acc.</th><th>Macro F1</th>"
            "<th>Malignant sens.</th><th>Malignant spec.</th><th>Melanoma sens.</th><th>Malignant AUROC</th>"
            "<th class='text'>Status</th></tr>")
    out = []
    for r in rows:
        cls = {"flagged": "flagged", "too small": "small"}.get(r["status"], "total" if r["attribute"] == "all" else "")
        reason = str(r.get("reason") or "").replace("sensitivity", "sens.")  # the columns say what it is
        status = html.escape(r["status"]) + (f": {html.escape(reason)}" if r["status"] == "flagged" else "")
        out.append(f"<tr class='{cls}'><td>{html.escape(r['attribute'])}</td><td class='text'>{html.escape(str(r['group']))}</td>"
                   f"<td>{r['n']}</td><td>{r['n_malignant']}</td><td>{_fmt(r['balanced_accuracy'])}</td>"
                   f"<td>{_fmt(r['macro_f1'])}</td><td>{_fmt(r['malignant_sensitivity'])}</td>"
                   f"<td>{_fmt(r['malignant_specificity'])}</td><td>{_fmt(r['melanoma_sensitivity'])}</td>"
                   f"<td>{_fmt(r.get('malignant_auroc'))}</td><td class='text status'>{status}</td></tr>")
    return "<div class='scroll'><table>" + head + "".join(out) + "</table></div>"


def _errors_table(errors: list[dict]) -> str:
    if not errors:
        return "<p>No misclassified lesions.</p>"
    thumbs = any(e["thumbnail"] for e in errors)
    head = "<tr>" + ("<th>Image</th>" if thumbs else "") + ("<th class='text'>Lesion</th><th class='text'>True</th><th class='text'>Predicted</th>"
                                                            "<th>Confidence</th><th>P(true class)</th></tr>")
    rows = []
    for e in errors:
        img = ""
        if thumbs:
            img = (f"<td><img class='thumb' alt='lesion {html.escape(e['lesion_id'])}' "
                   f"src='data:image/jpeg;base64,{e['thumbnail']}'></td>" if e["thumbnail"] else "<td></td>")
        rows.append(f"<tr>{img}<td class='text'>{html.escape(e['lesion_id'])}</td><td class='text'>{html.escape(e['true'])}</td>"
                    f"<td class='text'>{html.escape(e['predicted'])}</td><td>{_fmt(e['confidence'])}</td><td>{_fmt(e['p_true'])}</td></tr>")
    return "<div class='scroll'><table>" + head + "".join(rows) + "</table></div>"


def render_html(task: TaskSpec, result: dict, figures: list[RenderedFigure], errors: list[dict],
                extra_sections: str = "", out_dir=None) -> str:
    """The whole page; `extra_sections` (ready HTML <section>s: provenance, shift) follow the subgroups."""
    figs = "".join(f"<figure><img alt='{html.escape(f.title)}' src='data:image/png;base64,{f.png_base64}'>"
                   f"<figcaption>{html.escape(f.title)}</figcaption></figure>" for f in figures)
    n_flag = sum(r["status"] == "flagged" for r in result["fairness"])
    extra = result["n_manifest_without_prediction"]
    unlabelled = result.get("n_predictions_without_label", 0)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>dermfusion evaluation — {html.escape(task.name)}</title><style>{CSS}</style></head>
<body>
<header><h1>Evaluation report — {html.escape(task.name)}</h1>
<div class="meta">{html.escape(task.description)}<br>
{result['n']} lesions evaluated{f' ({extra} labelled manifest lesions had no prediction)' if extra > 0 else ''}{f' · {unlabelled} predictions without a label left out' if unlabelled else ''} ·
official metric <b>{html.escape(task.metric)}</b> = {_fmt(result['metrics']['official'])} ·
generated {html.escape(result['generated'])} · dermfusion {html.escape(result['version'])}</div></header>
<main>{report_link_html(out_dir)}
<section class="howto"><h2>How to read this report</h2><ul>
<li><b>Headline metrics</b> come with 95% bootstrap intervals: if two models' intervals overlap widely, the
data cannot tell them apart. Small classes have wide intervals.</li>
<li><b>Sensitivity</b> is the share of true cases the model names; for the malignant set and melanoma a missed
case is the costly error, so read those rows before accuracy.</li>
<li><b>Calibration</b> (ECE, reliability diagram): bars on the diagonal mean a stated 80% is right about 80% of
the time; the grey histogram shows how many lesions each bar rests on.</li>
<li><b>Subgroups</b> highlighted in red do worse on cancers than the whole set; check their counts before
acting. <b>Most confident errors</b> are the cases to review by eye first.</li>
<li>This is a research evaluation on retrospective data, not evidence of clinical safety.</li></ul></section>
<section><h2>Headline metrics</h2>{_headline_table(result)}
<p class="note">Intervals: percentile bootstrap over lesions ({result['n_bootstrap']} resamples).
Argmax metrics read the most probable class; the MILK10k score counts a class as predicted when its probability
is strictly above 0.5 and scores an absent, unpredicted class as 1.0. Malignant = {html.escape(', '.join(sorted(task.malignant)))}.</p></section>
<section><h2>Per class</h2>{_per_class_table(task, result)}</section>
<section><h2>Figures</h2><div class="grid">{figs}</div></section>
<section><h2>Subgroups</h2>{_fairness_table(result['fairness'])}
<p class="note">{n_flag} slice(s) flagged: sensitivity for the malignant set or for melanoma more than 0.10 below
the whole set — a screening rule, not a significance test: read it with the slice's counts. Slices under
10 lesions are marked too small to judge.</p></section>
{extra_sections}
<section><h2>Most confident errors</h2>{_errors_table(errors)}
<p class="note">Wrong argmax predictions sorted by the model's confidence (up to {MAX_ERRORS}): review these first.</p></section>
</main></body></html>
"""


# ---------------------------------------------------------------------------- terminal
def print_summary(metrics: dict, console=None) -> None:
    """Headline metrics with CIs and the per-class table, for the CLI."""
    from rich.table import Table

    if console is None:
        from ..console import console
    head = Table(title=f"{metrics['task']} · {metrics['n']} lesions", show_lines=False)
    head.add_column("metric")
    head.add_column("value", justify="right")
    head.add_column("95% CI", justify="right", style="dim")
    for k in HEADLINE:
        v = metrics["metrics"].get(k)
        if v is None and k.startswith("melanoma"):
            continue
        ci = metrics["ci"].get(k)
        head.add_row(LABELS[k], _fmt(v), f"{_fmt(ci[0])} – {_fmt(ci[1])}" if ci and ci[0] is not None else "")
    console.print(head)
    pcs = Table(title="per class")
    for col in ("class", "n", "precision", "recall", "F1", "AUROC"):
        pcs.add_column(col, justify="left" if col == "class" else "right")
    for c, pc in metrics["per_class"].items():
        pcs.add_row(c, str(pc["support"]), _fmt(pc["precision"]), _fmt(pc["recall"]), _fmt(pc["f1"]), _fmt(pc["auroc"]))
    console.print(pcs)
    flagged = [r for r in metrics.get("fairness", []) if r["status"] == "flagged"]
    for r in flagged:
        console.print(f"[yellow]subgroup flagged[/] {r['attribute']}={r['group']} (n={r['n']}): {r['reason']}")
    prov = metrics.get("provenance") or {}
    for w in prov.get("warnings", []):
        console.print(f"[yellow]provenance shortcut?[/] {w['message']}", highlight=False)
    if prov and not prov.get("available"):
        console.print(f"[dim]no label provenance in the manifest ({prov.get('column')}): recall by provenance not checked[/]")
    if metrics.get("shift"):
        from .shift_report import print_shift_summary

        console.print("[bold]covariate shift[/] (reference vs evaluated images):")
        print_shift_summary(metrics["shift"], console)
