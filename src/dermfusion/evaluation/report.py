"""Evaluate a predictions CSV against a labelled manifest: metrics.json and one self-contained report.html.

The HTML has no external resources (figures and thumbnails are inlined as base64), so it can be mailed,
archived with a submission or opened on an air-gapped hospital workstation.
"""
from __future__ import annotations

import base64
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..console import console as default_console
from ..data.manifest import IMAGE_COLUMNS, ManifestError, targets
from ..data.predictions import read_predictions_csv, to_manifest_ids, with_lesion_id
from ..errors import DermfusionError
from ..tasks import TASKS, TaskSpec
from .clinical_report import clinical_metrics, clinical_section_html
from .fairness import fairness_table
from .figures import all_figures
from .metrics import HEADLINE, bootstrap_metrics, compute_metrics, reliability_bins
from .criteria_metrics import criteria_metrics, criteria_section_html
from .provenance import DEFAULT_MARGIN, MIN_CLASS_LESIONS, provenance_figure, provenance_recall, provenance_section_html
from .report_html import LABELS, MAX_ERRORS, fmt, jsonable, render_html
from .shift import ShiftConfig, check_shift
from .shift_report import print_shift_summary, shift_section_html
from .subsets import default_subset_columns, print_subsets, subset_metrics, subsets_section_html

THUMB_PX = 96
ALL_CLASS_NAMES = frozenset(c for t in TASKS.values() for c in t.classes)


class EvaluationError(DermfusionError, ValueError):
    """Predictions that cannot be evaluated against the manifest; the message says what to fix."""


# ---------------------------------------------------------------------------- inputs
def align(predictions, manifest_df: pd.DataFrame, task: TaskSpec):
    """(predictions frame, aligned manifest rows, y_true N×C, y_prob N×C), in the predictions' row order.

    Predictions may cover a subset of the manifest (e.g. the test split); every predicted lesion must be
    in the manifest with labels, and the class columns must be exactly the task's. The id column may be
    headed `lesion_id` or `image` (the ISIC single-image format) and hold lesion ids or the dataset's own ids
    (``TaskSpec.id_source``: Derm7pt's image paths); the returned frame names it `lesion_id` and holds lesion ids.
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
    man = manifest_df.assign(lesion_id=manifest_df["lesion_id"].astype(str))
    if man["lesion_id"].duplicated().any():
        raise ManifestError("the manifest has duplicate lesion ids; it must have one row per lesion")
    pred["lesion_id"] = pred["lesion_id"].astype(str)
    pred = to_manifest_ids(pred, man, task)  # a file keyed as the dataset keys it (Derm7pt: meta.csv's image)
    dup = pred["lesion_id"][pred["lesion_id"].duplicated()].unique()
    if len(dup):
        raise EvaluationError(f"{len(dup)} lesion id(s) appear more than once in the predictions, e.g. {', '.join(dup[:5])}")
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
                         shift_config=None, subset_columns=()) -> dict:
    """Metrics with bootstrap 95% CIs, fairness slices, recall by label provenance and worst errors →
    out_dir/metrics.json and out_dir/report.html. Returns the metrics dict (as written to metrics.json).

    With `shift_reference` (e.g. the training manifest), a covariate-shift check between it and the evaluated
    lesions is added (`evaluation.shift.check_shift`, configured by `shift_config`): evidence of whether the
    evaluated images look like the ones a model learnt from.

    Metrics per subset (``evaluation.subsets``) are reported for every column in `subset_columns` and, unasked,
    for Derm7pt's `difficulty` and — when the lesions come from several datasets — for `dataset` (whose label
    provenance is then also broken down per dataset)."""
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
    crit = criteria_metrics(task, pred, rows)
    columns = list(dict.fromkeys([*default_subset_columns(rows), *subset_columns]))
    subsets = {c: subset_metrics(task, y_true, y_prob, rows, c, n_bootstrap=n_bootstrap, seed=seed) for c in columns}
    sections = [subsets_section_html(task, s) for s in subsets.values()]
    sections.append(provenance_section_html(task, prov, prov_fig))
    if "dataset" in subsets:  # one training set from several datasets: how each one's labels were confirmed
        prov["by_dataset"] = {}
        for ds in rows["dataset"].astype(str).unique():
            keep = (rows["dataset"].astype(str) == ds).to_numpy()
            prov["by_dataset"][ds] = provenance_recall(task, y_true[keep], y_prob[keep], rows[keep].reset_index(drop=True),
                                                       margin=provenance_margin, min_class_lesions=provenance_min_class)
            if prov["by_dataset"][ds]["available"]:
                sections.append(provenance_section_html(task, prov["by_dataset"][ds], title=f"dataset {ds}"))
    sections.append(criteria_section_html(crit))
    clinical = clinical_metrics(task, pred, y_true, n_boot=max(n_bootstrap, 200), seed=seed)  # a --clinical file
    if clinical:
        sections.insert(0, clinical_section_html(clinical))
    shift = None
    if shift_reference is not None:
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
        **({"subsets": subsets} if subsets else {}),
        **({"criteria": crit} if crit.get("available") else {}),
        **({"clinical": clinical} if clinical else {}),
        **({"shift": {k: v for k, v in shift.summary.items() if k != "all_differences"}} if shift else {}),
    }
    result = jsonable(result)
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


def print_summary(metrics: dict, console=None) -> None:
    """Headline metrics with CIs and the per-class table, for the CLI."""
    from rich.table import Table

    console = console or default_console
    head = Table(title=f"{metrics['task']} · {metrics['n']} lesions", show_lines=False)
    head.add_column("metric")
    head.add_column("value", justify="right")
    head.add_column("95% CI", justify="right", style="dim")
    for k in HEADLINE:
        v = metrics["metrics"].get(k)
        if v is None and k.startswith("melanoma"):
            continue
        ci = metrics["ci"].get(k)
        head.add_row(LABELS[k], fmt(v), f"{fmt(ci[0])} – {fmt(ci[1])}" if ci and ci[0] is not None else "")
    console.print(head)
    pcs = Table(title="per class")
    for col in ("class", "n", "precision", "recall", "F1", "AUROC"):
        pcs.add_column(col, justify="left" if col == "class" else "right")
    for c, pc in metrics["per_class"].items():
        pcs.add_row(c, str(pc["support"]), fmt(pc["precision"]), fmt(pc["recall"]), fmt(pc["f1"]), fmt(pc["auroc"]))
    console.print(pcs)
    flagged = [r for r in metrics.get("fairness", []) if r["status"] == "flagged"]
    for r in flagged:
        console.print(f"[yellow]subgroup flagged[/] {r['attribute']}={r['group']} (n={r['n']}): {r['reason']}")
    prov = metrics.get("provenance") or {}
    for w in prov.get("warnings", []):
        console.print(f"[yellow]provenance shortcut?[/] {w['message']}", highlight=False)
    if metrics.get("subsets"):
        print_subsets(TASKS[metrics["task"]], metrics["subsets"], console)
    if prov and not prov.get("available"):
        console.print(f"[dim]no label provenance in the manifest ({prov.get('column')}): recall by provenance not checked[/]")
    if metrics.get("criteria"):
        crit = Table(title="dermoscopic criteria (multi-task heads)")
        for col in ("criterion", "n", "balanced acc.", "chance", "macro AUROC"):
            crit.add_column(col, justify="left" if col == "criterion" else "right")
        for name, e in metrics["criteria"]["criteria"].items():
            crit.add_row(name, str(e["n"]), fmt(e["balanced_accuracy"]), fmt(e["chance"]), fmt(e.get("auroc")))
        console.print(crit)
    if metrics.get("shift"):
        console.print("[bold]covariate shift[/] (reference vs evaluated images):")
        print_shift_summary(metrics["shift"], console)
