"""Metrics per subset of the evaluated lesions: per level of a manifest column (Derm7pt's diagnostic difficulty,
the dataset of a combined manifest, or any column named with ``dermfusion evaluate --subset-column``).

Why: a model can score well on average and fail on the cases that matter. On Derm7pt's ``high`` difficulty
lesions — the atypical ones, on which triage products are known to fail — melanoma recall was half the
low-difficulty figure. Each level gets the mean recall over the classes present in it (the balanced accuracy,
as the official scorer computes it) with a bootstrap 95% interval over that level's lesions, the melanoma recall
with its count and interval, and every class's recall with its count. Levels under ``MIN_SUBSET`` lesions are
reported, marked too small to judge.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ..errors import DermfusionError
from ..tasks import TaskSpec
from .metrics import NAN, balanced_accuracy, bootstrap_ci, per_class_prf, predicted_class

DIFFICULTY_COLUMN = "difficulty"
ORDERS = {DIFFICULTY_COLUMN: ("low", "medium", "high")}
UNKNOWN = "unknown"
MIN_SUBSET = 10
MAX_LEVELS = 20


class SubsetError(DermfusionError, ValueError):
    """A column that cannot split the evaluated lesions into subsets."""


def default_subset_columns(rows: pd.DataFrame) -> list[str]:
    """The columns reported without being asked: ``difficulty`` when recorded, ``dataset`` when the evaluated
    lesions come from more than one dataset."""
    out = []
    if DIFFICULTY_COLUMN in rows.columns and (_levels(rows[DIFFICULTY_COLUMN]) != UNKNOWN).any():
        out.append(DIFFICULTY_COLUMN)
    if "dataset" in rows.columns and _levels(rows["dataset"]).nunique() > 1:
        out.append("dataset")
    return out


def _levels(col: pd.Series) -> pd.Series:
    s = col.astype(object).where(col.notna(), "").astype(str).str.strip()
    s = s.str.replace(r"\.0$", "", regex=True)
    return s.replace({"": UNKNOWN, "nan": UNKNOWN, "None": UNKNOWN}).reset_index(drop=True)


def _order(column: str, levels) -> list[str]:
    levels = list(dict.fromkeys(levels))
    known = ORDERS.get(column, ())
    rest = sorted(v for v in levels if v not in known and v != UNKNOWN)
    return [v for v in known if v in levels] + rest + ([UNKNOWN] if UNKNOWN in levels else [])


def subset_metrics(task: TaskSpec, y_true, y_prob, rows: pd.DataFrame, column: str, *, n_bootstrap: int = 200,
                   seed: int = 0, min_subset: int = MIN_SUBSET) -> dict:
    """Per level of ``rows[column]`` ("" / NaN → "unknown"): n, mean recall with its bootstrap CI, melanoma recall
    (argmax; count and CI), per-class recall (count and CI). Raises SubsetError for a missing column or one with
    more than MAX_LEVELS levels (a continuous value: bin it into a column first)."""
    if column not in rows.columns:
        raise SubsetError(f"the manifest has no column {column!r} to report subsets by")
    levels = _levels(rows[column])
    if levels.nunique() > MAX_LEVELS:
        raise SubsetError(f"column {column!r} has {levels.nunique()} distinct values; subsets are for categorical "
                          f"columns (at most {MAX_LEVELS} levels): bin it into a new manifest column first")
    y_true, y_prob = np.asarray(y_true, float), np.asarray(y_prob, float)
    t = y_true.argmax(1)
    mel = task.index(task.melanoma_class) if task.melanoma_class else None
    groups = []
    for level in _order(column, levels):
        idx = np.flatnonzero(levels.to_numpy() == level)
        yt, yp = y_true[idx], y_prob[idx]
        p = predicted_class(yp)
        per_class = {}
        for j, c in enumerate(task.classes):
            n = int((t[idx] == j).sum())
            k = int(((t[idx] == j) & (p == j)).sum())
            per_class[c] = {"n": n, "correct": k, "recall": k / n if n else None}
        g = {"level": level, "n": int(len(idx)), "too_small": bool(len(idx) < min_subset),
             "balanced_accuracy": balanced_accuracy(yt, yp), "per_class": per_class,
             "melanoma_recall": per_class[task.classes[mel]]["recall"] if mel is not None else None,
             "melanoma_n": per_class[task.classes[mel]]["n"] if mel is not None else 0}
        g.update(_intervals(task, yt, yp, n_bootstrap, seed))
        groups.append(g)
    return {"column": column, "n_bootstrap": int(n_bootstrap), "min_subset": int(min_subset), "groups": groups}


def _intervals(task: TaskSpec, y_true, y_prob, n_bootstrap: int, seed: int) -> dict:
    """Bootstrap 95% intervals of one level's mean recall, melanoma recall and per-class recalls."""
    if n_bootstrap <= 0 or len(y_true) < 2:
        return {"balanced_accuracy_ci": None, "melanoma_recall_ci": None, "per_class_ci": {}}

    def fn(t, p):
        rec = per_class_prf(t, p)["recall"]
        present = np.bincount(t.argmax(1), minlength=task.num_classes) > 0
        return {"ba": float(rec[present].mean()) if present.any() else NAN,
                **{c: float(rec[j]) for j, c in enumerate(task.classes)}}

    ci = bootstrap_ci(fn, y_true, y_prob, n=n_bootstrap, seed=seed)
    clean = {k: (list(v) if np.isfinite(v).all() else None) for k, v in ci.items()}
    return {"balanced_accuracy_ci": clean["ba"],
            "melanoma_recall_ci": clean.get(task.melanoma_class) if task.melanoma_class else None,
            "per_class_ci": {c: clean[c] for c in task.classes}}


# ---------------------------------------------------------------------------- rendering
def _f(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.2f}"


def _ci(ci) -> str:
    return f"<br><span class='ci'>{_f(ci[0])}–{_f(ci[1])}</span>" if ci else ""


def subsets_section_html(task: TaskSpec, sub: dict) -> str:
    """One report section: a row per level, mean recall, melanoma recall, per-class recall (with counts)."""
    col = html.escape(sub["column"])
    mel = task.melanoma_class
    head = ("<tr><th class='text'>Level</th><th>Lesions</th><th>Mean recall [95% CI]</th>"
            + (f"<th>{html.escape(mel)} recall</th>" if mel else "")
            + "".join(f"<th>{html.escape(c)}</th>" for c in task.classes) + "</tr>")
    body = []
    for g in sub["groups"]:
        cells = [f"<td class='text'>{html.escape(g['level'])}{' (too small)' if g['too_small'] else ''}</td>",
                 f"<td>{g['n']}</td>", f"<td>{_f(g['balanced_accuracy'])}{_ci(g['balanced_accuracy_ci'])}</td>"]
        if mel:
            pc = g["per_class"][mel]
            cells.append(f"<td>{_f(pc['recall'])} <span class='ci'>({pc['correct']}/{pc['n']})</span>"
                         f"{_ci(g['melanoma_recall_ci'])}</td>")
        for c in task.classes:
            pc = g["per_class"][c]
            cells.append(f"<td>{_f(pc['recall'])}<br><span class='ci'>n={pc['n']}</span></td>")
        body.append(f"<tr class='{'small' if g['too_small'] else ''}'>" + "".join(cells) + "</tr>")
    return f"""<section><h2>Results by {col}</h2>
<p>The evaluated lesions split by the manifest's <code>{col}</code> column. An average can hide the subset where
the model fails{': Derm7pt marks its atypical lesions <code>high</code>' if sub['column'] == DIFFICULTY_COLUMN else ''}.</p>
<div class='scroll'><table>{head}{''.join(body)}</table></div>
<p class="note">Mean recall = balanced accuracy over the classes present in the level (a tied maximum counts as
wrong, as in the official scorer), with a percentile bootstrap interval over the level's lesions
({sub['n_bootstrap']} resamples); recall = share of a class's lesions predicted as that class (argmax), with the
count. Levels under {sub['min_subset']} lesions are marked too small to judge.</p></section>"""


def print_subsets(task: TaskSpec, subsets: dict, console) -> None:
    """One terminal table per subset column."""
    from rich.table import Table

    for column, sub in subsets.items():
        t = Table(title=f"by {column}")
        for name in ("level", "n", "mean recall", "95% CI", *((f"{task.melanoma_class} recall",)
                                                               if task.melanoma_class else ())):
            t.add_column(name, justify="left" if name == "level" else "right")
        for g in sub["groups"]:
            ci = g["balanced_accuracy_ci"]
            row = [g["level"] + (" (too small)" if g["too_small"] else ""), str(g["n"]), _f(g["balanced_accuracy"]),
                   f"{_f(ci[0])} – {_f(ci[1])}" if ci else ""]
            if task.melanoma_class:
                pc = g["per_class"][task.melanoma_class]
                row.append(f"{_f(pc['recall'])} ({pc['correct']}/{pc['n']})")
            t.add_row(*row)
        console.print(t)
