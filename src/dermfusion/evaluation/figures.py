"""The report's figures, rendered to base64 PNG with matplotlib's object API (Agg canvas, no pyplot,
so no global backend or figure state leaks into the caller).

Every figure goes through `_render`, which refuses a figure without a title and axis labels and keeps
a record of them: a chart a clinician cannot read without asking is a bug.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from ..tasks import TaskSpec
from .metrics import _as_arrays

DPI = 110


@dataclass
class RenderedFigure:
    """A finished figure: what its axes say, and the PNG as base64 for an <img src="data:…">."""

    key: str
    title: str
    xlabel: str
    ylabel: str
    png_base64: str

    def describe(self) -> dict:
        return {"key": self.key, "title": self.title, "xlabel": self.xlabel, "ylabel": self.ylabel}


def _new(size=(6.0, 4.6)):
    fig = MplFigure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _render(key: str, fig, ax, panels=()) -> RenderedFigure:
    """PNG of a finished figure. ``ax`` carries the title and the y label, and the x label unless a panel
    below it (sharing x) carries it; ``panels`` are extra axes (a twin axis, a histogram strip) that must
    label at least one of their axes."""
    title, ylabel = ax.get_title(), ax.get_ylabel()
    xlabel = ax.get_xlabel() or next((a.get_xlabel() for a in panels if a.get_xlabel().strip()), "")
    missing = [n for n, v in (("title", title), ("x label", xlabel), ("y label", ylabel)) if not v.strip()]
    missing += [f"label on panel {i}" for i, a in enumerate(panels) if not (a.get_ylabel().strip() or a.get_xlabel().strip())]
    if missing:
        raise ValueError(f"figure {key!r} has no {', '.join(missing)}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return RenderedFigure(key, title, xlabel, ylabel, base64.b64encode(buf.getvalue()).decode("ascii"))


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def confusion_figure(task: TaskSpec, cm) -> RenderedFigure:
    """Row-normalised confusion matrix: each row shows where one true class's lesions went."""
    cm = np.asarray(cm, float)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    C = len(task.classes)
    fig, ax = _new((1.2 + 0.55 * C, 0.9 + 0.5 * C) if C > 8 else (6.2, 5.2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(C):
        for j in range(C):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({int(cm[i, j])})", ha="center", va="center",
                    fontsize=6 if C > 8 else 7.5, linespacing=1.1, color="white" if norm[i, j] > 0.55 else "#222")
    ax.set_xticks(range(C), task.classes, rotation=45, ha="right")
    ax.set_yticks(range(C), [f"{c} (n={int(r)})" for c, r in zip(task.classes, rows[:, 0])])
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    ax.set(title="Confusion matrix (row share, count in brackets)", xlabel="Predicted class (argmax)", ylabel="True class")
    return _render("confusion_matrix", fig, ax)


def roc_figure(task: TaskSpec, y_true, y_prob, auroc: dict) -> RenderedFigure:
    """One-vs-rest ROC per class; classes without positives and negatives are listed as n/a."""
    from sklearn.metrics import roc_curve

    y_true, y_prob = _as_arrays(y_true, y_prob)
    fig, ax = _new()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999", label="chance")
    for j, (c, col) in enumerate(zip(task.classes, _colors(len(task.classes)))):
        t = y_true[:, j] > 0.5
        if t.all() or not t.any():
            continue
        fpr, tpr, _ = roc_curve(t, y_prob[:, j])
        ax.plot(fpr, tpr, lw=1.4, color=col, label=f"{c} (AUC {auroc.get(c, float('nan')):.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title="ROC curves, one class vs the rest",
           xlabel="False positive rate (1 − specificity)", ylabel="True positive rate (sensitivity)")
    ax.legend(fontsize=7, loc="lower right")
    return _render("roc", fig, ax)


def pr_figure(task: TaskSpec, y_true, y_prob, ap: dict) -> RenderedFigure:
    """Precision–recall per class: more telling than ROC for rare classes."""
    from sklearn.metrics import precision_recall_curve

    y_true, y_prob = _as_arrays(y_true, y_prob)
    fig, ax = _new()
    for j, (c, col) in enumerate(zip(task.classes, _colors(len(task.classes)))):
        t = y_true[:, j] > 0.5
        if not t.any():
            continue
        prec, rec, _ = precision_recall_curve(t, y_prob[:, j])
        ax.step(rec, prec, where="post", lw=1.4, color=col, label=f"{c} (AP {ap.get(c, float('nan')):.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), title="Precision–recall curves, one class vs the rest",
           xlabel="Recall (sensitivity)", ylabel="Precision (positive predictive value)")
    ax.legend(fontsize=7, loc="lower left")
    return _render("precision_recall", fig, ax)


def reliability_figure(rel: dict, ece: float) -> RenderedFigure:
    """Top-label reliability diagram: bars at the diagonal mean the stated confidence can be trusted."""
    edges = np.asarray(rel["edges"])
    acc = np.asarray(rel["accuracy"], float)
    conf = np.asarray(rel["confidence"], float)
    count = np.asarray(rel["count"])
    width = np.diff(edges)
    ok = count > 0
    fig = MplFigure(figsize=(6.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    # a strip below with the lesions per bin: a bar built on 3 lesions says little
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    hist.bar(edges[:-1], count, width=width, align="edge", color="#9aa5b1", edgecolor="white")
    hist.set(xlabel="Confidence (highest predicted probability)", ylabel="Lesions")
    ax.tick_params(labelbottom=False)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999", label="perfect calibration")
    ax.bar(edges[:-1][ok], acc[ok], width=width[ok], align="edge", color="#4c78a8", edgecolor="white",
           alpha=0.85, label="accuracy in bin")
    ax.plot(conf[ok], acc[ok], "o", ms=3, color="#e45756", label="mean confidence in bin")
    ax.set(xlim=(0, 1), ylim=(0, 1), title=f"Reliability diagram (top label, ECE {ece:.3f})",
           ylabel="Accuracy (share correct)")  # the x label sits on the histogram strip below
    ax.legend(fontsize=7, loc="upper left")
    return _render("reliability", fig, ax, panels=(hist,))


def f1_figure(task: TaskSpec, per_class: dict, ci: dict) -> RenderedFigure:
    """Per-class F1 with bootstrap 95% CIs: wide bars are where more data would help most."""
    C = len(task.classes)
    f1 = np.array([per_class[c]["f1"] for c in task.classes], float)
    lo = np.array([(ci.get(c, {}).get("f1") or (np.nan, np.nan))[0] for c in task.classes], float)
    hi = np.array([(ci.get(c, {}).get("f1") or (np.nan, np.nan))[1] for c in task.classes], float)
    val = np.nan_to_num(f1)
    err = np.vstack([np.clip(val - np.nan_to_num(lo, nan=val), 0, None), np.clip(np.nan_to_num(hi, nan=val) - val, 0, None)])
    fig, ax = _new((max(5.0, 0.6 * C + 2), 4.2))
    colors = ["#e45756" if c in task.malignant else "#4c78a8" for c in task.classes]
    ax.bar(range(C), val, yerr=err, capsize=3, color=colors, edgecolor="white")
    for j in np.flatnonzero(np.isnan(f1)):  # no lesions and no predictions: F1 undefined, not 0
        ax.text(j, 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="#555")
    ax.set_xticks(range(C), task.classes, rotation=45, ha="right")
    ax.set(ylim=(0, 1.05), title="F1 per class (argmax) with 95% bootstrap CI — red: malignant",
           xlabel="Class", ylabel="F1 score")
    return _render("f1_per_class", fig, ax)


def all_figures(task: TaskSpec, y_true, y_prob, metrics: dict, ci: dict) -> list[RenderedFigure]:
    pc = metrics["per_class"]
    return [confusion_figure(task, metrics["confusion_matrix"]),
            roc_figure(task, y_true, y_prob, {c: pc[c]["auroc"] for c in task.classes}),
            pr_figure(task, y_true, y_prob, {c: pc[c]["average_precision"] for c in task.classes}),
            reliability_figure(metrics["reliability"], metrics["ece"]),
            f1_figure(task, pc, ci.get("per_class", {}))]
