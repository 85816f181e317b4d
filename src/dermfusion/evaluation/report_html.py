"""The evaluation report as one self-contained HTML page (figures inline, no external resources), and the
HTML pieces the covariate-shift page shares with it."""
from __future__ import annotations

import html
import math

import numpy as np

from ..tasks import TaskSpec
from .figures import RenderedFigure
from .metrics import HEADLINE
from .report_link import report_link_html

MAX_ERRORS = 12
LABELS = {
    "official": "Official score", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro F1 (argmax)",
    "accuracy": "Accuracy", "top2_accuracy": "Top-2 accuracy", "top3_accuracy": "Top-3 accuracy",
    "milk10k_score": "MILK10k score (Dice, p > 0.5)", "macro_auroc": "Macro AUROC",
    "melanoma_sensitivity": "Melanoma sensitivity", "melanoma_specificity": "Melanoma specificity",
    "malignant_sensitivity": "Malignant sensitivity", "malignant_specificity": "Malignant specificity",
    "ece": "Expected calibration error (15 bins)", "brier": "Brier score (multiclass)", "log_loss": "Log loss",
}


def jsonable(x):
    """numpy → Python, NaN/inf → None (strict JSON), tuples → lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
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


def fmt(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ci(ci) -> str:
    if not ci or ci[0] is None:
        return ""
    return f' <span class="ci">[{fmt(ci[0])}, {fmt(ci[1])}]</span>'


def _headline_table(result: dict) -> str:
    rows = []
    for k in HEADLINE:
        v = result["metrics"].get(k)
        if v is None and k.startswith("melanoma"):
            continue  # task without a melanoma class
        name = LABELS[k] + (f" — {result['official_metric']}" if k == "official" else "")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{fmt(v)}{_ci(result['ci'].get(k))}</td></tr>")
    return "<div class='scroll'><table><tr><th>Metric</th><th>Value [95% CI]</th></tr>" + "".join(rows) + "</table></div>"


def _per_class_table(task: TaskSpec, result: dict) -> str:
    head = ("<tr><th>Class</th><th class='text'>Description</th><th>n</th><th>Precision</th><th>Recall</th><th>F1 [95% CI]</th>"
            "<th>Dice (p&gt;0.5)</th><th>AUROC</th><th>Avg. precision</th></tr>")
    rows = []
    for c in task.classes:
        pc = result["per_class"][c]
        mal = ' <span class="badge flag">malignant</span>' if c in task.malignant else ""
        rows.append(f"<tr><td>{html.escape(c)}{mal}</td><td class='text'>{html.escape(task.class_descriptions.get(c, ''))}</td>"
                    f"<td>{pc['support']}</td><td>{fmt(pc['precision'])}</td><td>{fmt(pc['recall'])}</td>"
                    f"<td>{fmt(pc['f1'])}{_ci(pc['ci'].get('f1'))}</td><td>{fmt(pc['dice'])}</td>"
                    f"<td>{fmt(pc['auroc'])}</td><td>{fmt(pc['average_precision'])}</td></tr>")
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
                   f"<td>{r['n']}</td><td>{r['n_malignant']}</td><td>{fmt(r['balanced_accuracy'])}</td>"
                   f"<td>{fmt(r['macro_f1'])}</td><td>{fmt(r['malignant_sensitivity'])}</td>"
                   f"<td>{fmt(r['malignant_specificity'])}</td><td>{fmt(r['melanoma_sensitivity'])}</td>"
                   f"<td>{fmt(r.get('malignant_auroc'))}</td><td class='text status'>{status}</td></tr>")
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
                    f"<td class='text'>{html.escape(e['predicted'])}</td><td>{fmt(e['confidence'])}</td><td>{fmt(e['p_true'])}</td></tr>")
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
official metric <b>{html.escape(task.metric)}</b> = {fmt(result['metrics']['official'])} ·
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
