"""Recall per class by label provenance — how each diagnosis was established (histopathology, follow-up,
expert consensus, confocal microscopy).

Why: provenance is a shortcut. In HAM10000, nevi confirmed by follow-up (photographed over time, typically
flat and unremarkable) look unlike nevi excised for histology (suspicious enough to cut out); a from-scratch
model recalled 86% of the former and 5% of the latter out of fold. A test set whose labels come mostly from
histology then scores far below the out-of-fold figure. A class whose recall differs between two provenance
groups by more than `margin` (both groups holding at least `min_class_lesions` lesions of that class) is
warned about: the model may have learnt how a label was obtained rather than what the lesion is.
The margin is a screening rule, not a significance test; the counts are reported beside every recall.
"""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from ..tasks import TaskSpec

PROVENANCE_COLUMN = "dx_confirmation"
DEFAULT_MARGIN = 0.25
MIN_CLASS_LESIONS = 10
MIN_GROUP_LESIONS = 10
UNKNOWN = "unknown"
GROUP_LABELS = {"histo": "histopathology", "follow_up": "follow-up", "consensus": "expert consensus",
                "confocal": "confocal microscopy", "single image expert consensus": "expert consensus (single image)",
                "serial imaging showing no change": "serial imaging, no change"}


def provenance_groups(rows: pd.DataFrame, column: str = PROVENANCE_COLUMN) -> pd.Series | None:
    """Normalised provenance label per lesion ("" / NaN → "unknown"), or None when the manifest has no
    provenance (no column, or nothing recorded in it)."""
    if column not in rows.columns:
        return None
    s = rows[column].astype(object).where(rows[column].notna(), "").astype(str).str.strip().str.lower()
    s = s.replace({"": UNKNOWN, "nan": UNKNOWN, "none": UNKNOWN})
    return s.reset_index(drop=True) if (s != UNKNOWN).any() else None


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for small n and for 0 or n successes)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def provenance_recall(task: TaskSpec, y_true, y_prob, rows: pd.DataFrame, *, column: str = PROVENANCE_COLUMN,
                      margin: float = DEFAULT_MARGIN, min_class_lesions: int = MIN_CLASS_LESIONS,
                      min_group_lesions: int = MIN_GROUP_LESIONS) -> dict:
    """Per provenance group (≥ `min_group_lesions` lesions): per-class argmax recall with the class's lesion
    count and a Wilson 95% interval; plus one warning per class whose recall differs by more than `margin`
    between two known groups that each hold ≥ `min_class_lesions` lesions of it (the most and the least
    recalled such groups are named). Smaller groups are listed as too small, not dropped silently."""
    if margin < 0 or min_class_lesions < 1 or min_group_lesions < 1:
        raise ValueError("margin must be ≥ 0 and the minimum counts ≥ 1")
    base = {"column": column, "margin": float(margin), "min_class_lesions": int(min_class_lesions),
            "min_group_lesions": int(min_group_lesions)}
    groups = provenance_groups(rows, column)
    if groups is None:
        return {**base, "available": False, "groups": [], "too_small": [], "warnings": []}
    t = np.asarray(y_true, float).argmax(1)
    p = np.asarray(y_prob, float).argmax(1)
    counts = groups.value_counts()
    order = sorted(counts.index, key=lambda g: (g == UNKNOWN, -counts[g], g))
    out_groups, too_small = [], []
    for g in order:
        idx = np.flatnonzero(groups.to_numpy() == g)
        if len(idx) < min_group_lesions:
            too_small.append({"group": g, "n": int(len(idx))})
            continue
        per_class = {}
        for j, c in enumerate(task.classes):
            of_class = idx[t[idx] == j]
            k = int((p[of_class] == j).sum())
            n = int(len(of_class))
            per_class[c] = {"n": n, "recall": k / n if n else None, "ci": list(wilson_interval(k, n)) if n else None}
        out_groups.append({"group": g, "label": GROUP_LABELS.get(g, g), "n": int(len(idx)),
                           "accuracy": float((p[idx] == t[idx]).mean()), "per_class": per_class})
    warnings = []
    for c in task.classes:
        judged = [(gr["group"], gr["per_class"][c]) for gr in out_groups
                  if gr["group"] != UNKNOWN and gr["per_class"][c]["n"] >= min_class_lesions]
        if len(judged) < 2:
            continue
        hi = max(judged, key=lambda x: x[1]["recall"])
        lo = min(judged, key=lambda x: x[1]["recall"])
        diff = hi[1]["recall"] - lo[1]["recall"]
        if diff > margin:
            warnings.append({
                "class": c, "high_group": hi[0], "high_recall": hi[1]["recall"], "high_n": hi[1]["n"],
                "low_group": lo[0], "low_recall": lo[1]["recall"], "low_n": lo[1]["n"], "difference": diff,
                "message": (f"{c}: recall {hi[1]['recall']:.2f} for {GROUP_LABELS.get(hi[0], hi[0])}-confirmed lesions "
                            f"(n={hi[1]['n']}) vs {lo[1]['recall']:.2f} for {GROUP_LABELS.get(lo[0], lo[0])}-confirmed "
                            f"(n={lo[1]['n']}), a gap of {diff:.2f} > {margin:.2f}: the model may read how the label "
                            "was obtained rather than the lesion; judge it on the provenance that matches the "
                            "deployment population")})
    return {**base, "available": True, "groups": out_groups, "too_small": too_small, "warnings": warnings,
            "n_unknown": int((groups == UNKNOWN).sum())}


# ---------------------------------------------------------------------------- rendering
def provenance_figure(task: TaskSpec, prov: dict):
    """Grouped bars: recall per class, one bar per provenance group; cells under the minimum count are pale."""
    from .figures import _colors, _new, _render  # matplotlib: loaded only when a figure is drawn

    groups = [g for g in prov["groups"] if g["group"] != UNKNOWN] or prov["groups"]
    if not groups:
        return None
    C, G = len(task.classes), len(groups)
    width = 0.8 / G
    fig, ax = _new((max(5.5, 0.75 * C + 2.5), 4.2))
    for i, (g, col) in enumerate(zip(groups, _colors(G))):
        label = f"{g['label']} (n={g['n']})"
        for j, c in enumerate(task.classes):
            cell = g["per_class"][c]
            if cell["recall"] is None:
                continue
            ok = cell["n"] >= prov["min_class_lesions"]
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(x, cell["recall"], width=width, color=col, alpha=1.0 if ok else 0.3, edgecolor="white", label=label)
            if cell["recall"] < 0.02:  # a zero recall is the finding: make it visible, not a missing bar
                ax.plot(x, 0.012, marker="v", ms=5, color=col, alpha=1.0 if ok else 0.3)
            label = None  # one legend entry per group
    ax.set_xticks(range(C), task.classes, rotation=45, ha="right")
    ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6),
           title=f"Recall per class by label provenance (pale: < {prov['min_class_lesions']} lesions; ▼ ≈ 0)",
           xlabel="True class", ylabel="Recall (argmax)")
    ax.legend(fontsize=7, loc="upper center", ncol=min(G, 4), frameon=False)
    return _render("provenance_recall", fig, ax)


def _cell(c: dict, minimum: int) -> str:
    if c["recall"] is None:
        return "<td class='ci'>–</td>"
    ci = c["ci"]
    style = " style='color:var(--muted)'" if c["n"] < minimum else ""
    return (f"<td{style}>{c['recall']:.2f}<br><span class='ci'>n={c['n']}"
            + (f" · {ci[0]:.2f}–{ci[1]:.2f}" if ci else "") + "</span></td>")


def provenance_section_html(task: TaskSpec, prov: dict, figure=None, title: str = "") -> str:
    """The report section: a recall table (groups × classes), warnings in the flag style, the figure. ``title``
    names a part of the evaluated lesions (e.g. one dataset of a combined manifest)."""
    col = html.escape(prov["column"])
    heading = "Recall by label provenance" + (f" — {html.escape(title)}" if title else "")
    if not prov["available"]:
        return (f"<section><h2>{heading}</h2><p>The manifest carries no label provenance (no "
                f"<code>{col}</code> column, or nothing recorded in it), so recall cannot be split by how each "
                "diagnosis was established. Re-import the data with an importer that keeps it (HAM10000 "
                "<code>dx_type</code>, MILK10k <code>diagnosis_confirm_type</code>) to check this shortcut.</p></section>")
    flagged = {w["class"] for w in prov["warnings"]}
    head = "<tr><th class='text'>Provenance</th><th>Lesions</th><th>Accuracy</th>" + "".join(
        f"<th>{html.escape(c)}{' ⚠' if c in flagged else ''}</th>" for c in task.classes) + "</tr>"
    body = "".join(f"<tr><td class='text'>{html.escape(g['label'])}</td><td>{g['n']}</td><td>{g['accuracy']:.2f}</td>"
                   + "".join(_cell(g["per_class"][c], prov["min_class_lesions"]) for c in task.classes) + "</tr>"
                   for g in prov["groups"])
    warn = "".join(f"<tr class='flagged'><td class='text'><span class='badge flag'>shortcut?</span> "
                   f"{html.escape(w['message'])}</td></tr>" for w in prov["warnings"])
    warn = (f"<div class='scroll' style='margin:10px 0'><table>{warn}</table></div>" if warn else
            "<p><span class='badge'>no warning</span> no class's recall differs by more than "
            f"{prov['margin']:.2f} between provenance groups with enough lesions.</p>")
    small = ", ".join(f"{html.escape(GROUP_LABELS.get(s['group'], s['group']))} ({s['n']})" for s in prov["too_small"])
    fig = (f"<figure style='margin-top:12px'><img alt='{html.escape(figure.title)}' src='data:image/png;base64,"
           f"{figure.png_base64}'><figcaption>{html.escape(figure.title)}</figcaption></figure>") if figure else ""
    return f"""<section><h2>{heading}</h2>
<p>How each diagnosis was established (<code>{col}</code>). A model that recalls a class far better for one kind of
confirmation than another may have learnt a shortcut, and its overall score will not carry over to a population
confirmed differently (e.g. a histopathology-confirmed test set).</p>
{warn}<div class='scroll'><table>{head}{body}</table></div>
<p class="note">Recall = share of the class's lesions predicted as that class (argmax), with its lesion count and
Wilson 95% interval; grey cells rest on fewer than {prov['min_class_lesions']} lesions and are not compared.
Warned: a gap above {prov['margin']:.2f} between two groups each holding at least {prov['min_class_lesions']}
lesions of the class — a screening rule, read with the counts.{' Groups under ' + str(prov['min_group_lesions']) + ' lesions left out: ' + small + '.' if small else ''}</p>
{fig}</section>"""
