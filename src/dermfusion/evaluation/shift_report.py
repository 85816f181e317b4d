"""Rendering of a covariate-shift check: an HTML section (shared by shift.html and the evaluation report),
the standalone self-contained page, shift.json and the terminal summary."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..console import console as default_console
from .figures import RenderedFigure, _new, _render
from .report_html import CSS, fmt, jsonable
from .shift import ShiftResult

FEATURE_SET_LABELS = {"image_statistics": "Image statistics (colour, texture)", "embeddings": "Model embeddings"}
CLASSIFIER_LABELS = {"logistic": "logistic regression on standardised features", "gbm": "gradient boosting"}
LEVEL_NOTES = {"none detected": "the sets cannot be told apart", "slight": "barely told apart",
               "moderate": "told apart in part: check the differing statistics",
               "strong": "easily told apart: an out-of-fold score may not predict this set"}


def smd_figure(summary: dict) -> RenderedFigure | None:
    """Horizontal bars of the standardised mean differences of the most differing statistics."""
    rows = [r for r in summary.get("top_differences", []) if r.get("smd") is not None and np.isfinite(r["smd"])]
    if not rows:
        return None
    rows = rows[::-1]  # largest at the top
    smd = np.array([r["smd"] for r in rows], float)
    fig, ax = _new((6.4, 0.9 + 0.32 * len(rows)))
    ax.barh(range(len(rows)), smd, color=["#e45756" if v > 0 else "#4c78a8" for v in smd], edgecolor="white")
    ax.set_yticks(range(len(rows)), [r["statistic"] for r in rows], fontsize=8)
    for x in (-0.5, -0.1, 0.1, 0.5):
        ax.axvline(x, ls="--" if abs(x) == 0.5 else ":", lw=0.8, color="#999")
    ax.axvline(0, lw=0.8, color="#333")
    ax.set(title="Image statistics that differ most between the sets",
           xlabel="SMD = (other − reference mean) / pooled SD", ylabel="Statistic")
    return _render("shift_smd", fig, ax)


def _auc_rows(summary: dict) -> str:
    out = []
    for key, fs in summary["feature_sets"].items():
        flagged = fs["level"] in ("moderate", "strong")
        label = FEATURE_SET_LABELS.get(key, key) + (f" <span class='ci'>({fs['dim']}-d, {html.escape(Path(fs['bundle']).name)})</span>"
                                                   if key == "embeddings" else "")
        ci = fs["ci"]
        badge = "badge flag" if flagged else "badge"
        out.append(f"<tr class='{'flagged' if flagged else ''}'><td class='text'>{label}</td>"
                   f"<td>{fs['n_reference']} / {fs['n_other']}</td><td>{fs['n_features']}</td>"
                   f"<td><b>{fmt(fs['auc'])}</b> <span class='ci'>[{fmt(ci[0])}, {fmt(ci[1])}]</span></td>"
                   f"<td class='text'><span class='{badge}'>{html.escape(fs['level'])}</span> {html.escape(LEVEL_NOTES.get(fs['level'], ''))}</td></tr>")
    return ("<div class='scroll'><table><tr><th class='text'>Features</th><th>Images (reference / other)</th>"
            "<th>Features used</th><th>Domain AUC [95% CI]</th><th class='text'>Reading</th></tr>" + "".join(out)
            + "</table></div>")


def _difference_rows(rows: list[dict], names: tuple[str, str]) -> str:
    out = []
    for r in rows:
        smd = r.get("smd")
        big = smd is not None and np.isfinite(smd) and abs(smd) > 0.5
        out.append(f"<tr class='{'flagged' if big else ''}'><td class='text'>{html.escape(r['statistic'])}</td>"
                   f"<td class='text'>{html.escape(r['description'])}</td><td>{fmt(r['reference_mean'], 2)}</td>"
                   f"<td>{fmt(r['other_mean'], 2)}</td><td>{fmt(smd, 2)}</td></tr>")
    return ("<div class='scroll'><table><tr><th class='text'>Statistic</th><th class='text'>What it measures</th>"
            f"<th>Mean, {html.escape(names[0])}</th><th>Mean, {html.escape(names[1])}</th><th>SMD</th></tr>"
            + "".join(out) + "</table></div>")


def _thumb_strip(label: str, thumbs: list[str]) -> str:
    if not thumbs:
        return ""
    imgs = "".join(f"<img class='thumb' alt='{html.escape(label)} image {i + 1}' src='data:image/jpeg;base64,{t}'> "
                   for i, t in enumerate(thumbs))
    return f"<div><b>{html.escape(label)}</b><br>{imgs}</div>"


def shift_section_html(result: ShiftResult, heading: str = "Covariate shift") -> str:
    """The report section: AUC per feature set, the differing statistics (table and figure), sample images."""
    s = result.summary
    names = (s["reference"]["name"], s["other"]["name"])
    fig = smd_figure(s)
    figure = (f"<figure><img alt='{html.escape(fig.title)}' src='data:image/png;base64,{fig.png_base64}'>"
              f"<figcaption>{html.escape(fig.title)}</figcaption></figure>") if fig else ""
    thumbs = (_thumb_strip(f"{names[0]} (reference)", result.thumbnails.get("reference", []))
              + "<br>" + _thumb_strip(f"{names[1]} (other)", result.thumbnails.get("other", [])))
    if result.thumbnails:
        thumbs += (f"<p class='note'>Sample images as the statistics saw them"
                   f"{' (after colour constancy)' if s['color_constancy'] != 'none' else ''}.</p>")
    unread = [f"{s[k]['n_unreadable']} unreadable {k} image(s) skipped (e.g. {html.escape(s[k]['unreadable_examples'][0])})"
              for k in ("reference", "other") if s[k]["n_unreadable"]]
    geo = [r for r in s.get("geometry", []) if r.get("smd") is not None and np.isfinite(r["smd"]) and abs(r["smd"]) > 0.1]
    geo_note = ("Image size differs (descriptive only — the model resizes every image): "
                + "; ".join(f"{r['statistic']} {fmt(r['reference_mean'], 1)} vs {fmt(r['other_mean'], 1)}" for r in geo)
                + ".") if geo else "Image sizes do not differ materially."
    cc = s["color_constancy"]
    return f"""<section><h2>{html.escape(heading)}: {html.escape(names[0])} vs {html.escape(names[1])}</h2>
<p>A classifier ({CLASSIFIER_LABELS.get(s['classifier'], html.escape(s['classifier']))}, {s['feature_sets']['image_statistics']['folds']}-fold
cross-validated) tries to tell which set each {html.escape(s['modality'])} image comes from. Its out-of-fold ROC AUC
measures the shift: <b>0.5 = no detectable shift</b>, 1.0 = the sets are told apart perfectly. A shift does not
prove the model fails on the other set, but it means an out-of-fold score on the reference set need not
predict performance there.{' Images were white-balanced first (colour constancy: ' + html.escape(cc) + ').' if cc != 'none' else ''}</p>
{_auc_rows(s)}
<div class="grid" style="margin-top:12px">{figure}<div>{thumbs}</div></div>
<h3 style="font-size:15px;margin:14px 0 6px">Statistics that differ most</h3>
{_difference_rows(s['top_differences'], names)}
<p class="note">SMD = standardised mean difference (other − reference, over the pooled standard deviation):
|SMD| &gt; 0.1 is the usual mark of imbalance, rows above 0.5 (highlighted) are large shifts. {geo_note}
{' '.join(unread)} Up to {s['max_images']} images per set (fixed seed {s['seed']}); AUC interval: stratified bootstrap
over the out-of-fold predictions.</p></section>"""


def render_shift_html(result: ShiftResult) -> str:
    s = result.summary
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>dermfusion covariate shift — {html.escape(s['reference']['name'])} vs {html.escape(s['other']['name'])}</title>
<style>{CSS}</style></head><body>
<header><h1>Covariate shift check</h1>
<div class="meta">{html.escape(s['reference']['name'])} ({s['reference']['n_rows']} lesions) vs
{html.escape(s['other']['name'])} ({s['other']['n_rows']} lesions) · {html.escape(s['modality'])} images ·
generated {html.escape(s['generated'])} · dermfusion {html.escape(s['version'])}</div></header>
<main>{shift_section_html(result, heading="Domain classifier")}</main></body></html>
"""


def write_shift_report(result: ShiftResult, out_dir) -> dict:
    """out_dir/shift.json and out_dir/shift.html; returns the JSON-able summary as written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = jsonable(result.summary)
    (out / "shift.json").write_text(json.dumps(summary, indent=2))
    (out / "shift.html").write_text(render_shift_html(result), encoding="utf-8")
    return summary


def print_shift_summary(summary: dict, console=None, top: int = 5) -> None:
    """AUC [CI] per feature set and the most differing statistics, for the CLI."""
    from rich.table import Table

    console = console or default_console
    names = summary["reference"]["name"], summary["other"]["name"]
    cc = summary.get("color_constancy", "none")
    for key, fs in summary["feature_sets"].items():
        style = "red" if fs["level"] == "strong" else "yellow" if fs["level"] == "moderate" else "green"
        console.print(f"{FEATURE_SET_LABELS.get(key, key)}{f' ({cc})' if cc != 'none' and key == 'image_statistics' else ''}: "
                      f"domain AUC [bold]{fmt(fs['auc'])}[/] [{fmt(fs['ci'][0])}, {fmt(fs['ci'][1])}] — "
                      f"[{style}]{fs['level']}[/] ({fs['n_reference']} vs {fs['n_other']} images)", highlight=False)
    table = Table(title="statistics that differ most", title_justify="left")
    for col in ("statistic", f"mean, {names[0]}", f"mean, {names[1]}", "SMD"):
        table.add_column(col, justify="left" if col == "statistic" else "right")
    for r in summary["top_differences"][:top]:
        table.add_row(r["statistic"], fmt(r["reference_mean"], 2), fmt(r["other_mean"], 2), fmt(r["smd"], 2))
    console.print(table)
    for k in ("reference", "other"):
        if summary[k]["n_unreadable"]:
            console.print(f"[yellow]{summary[k]['n_unreadable']} unreadable {k} image(s) skipped[/], "
                          f"e.g. {summary[k]['unreadable_examples'][0]}")
