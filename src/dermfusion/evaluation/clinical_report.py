"""The clinical file's decisions, evaluated: the triage action at the operating point and the conformal
differential, when a predictions file carries them (``dermfusion predict … --clinical FILE``: ``action`` and
``differential`` columns beside the posteriors).

Triage: melanoma and malignant sensitivity (referred = routine or urgent), specificity (benign lesions not referred),
referral and urgent rates; lesions answered ``cannot_assess`` count as *referred* for sensitivity (a retake is not a
miss, and no malignant lesion is sent home by it) and are counted on their own. Differential: coverage (the true class
in the set), per-class coverage with melanoma's, mean set size and the share of empty sets. Each figure with a
percentile bootstrap 95 % interval over lesions.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ..errors import DermfusionError
from ..tasks import TaskSpec
from .conformal import set_metrics
from .decision_rules import ACTIONS, triage_rates

CANNOT_ASSESS = "cannot_assess"


class ClinicalFileError(DermfusionError, ValueError):
    """A clinical predictions file whose ``action`` / ``differential`` columns name something unknown."""


def _boot(fn, n: int, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    draws = [fn(rng.integers(0, n, n)) for _ in range(n_boot)]
    keys = [k for k, v in draws[0].items() if isinstance(v, float)] if draws else []
    return {k: [float(np.nanquantile([d[k] for d in draws], q)) for q in (0.025, 0.975)] for k in keys}


def clinical_metrics(task: TaskSpec, pred: pd.DataFrame, y_true: np.ndarray, n_boot: int = 1000,
                     seed: int = 0) -> dict | None:
    """Triage and differential figures of a clinical predictions file (None when it has neither column)."""
    has_action, has_set = "action" in pred.columns, "differential" in pred.columns
    if not (has_action or has_set):
        return None
    y = np.asarray(y_true).argmax(1)
    n = len(y)
    out: dict = {"n": n}
    if has_action:
        acts = pred["action"].astype(str).to_numpy()
        unknown = sorted(set(acts) - set(ACTIONS) - {CANNOT_ASSESS})
        if unknown:
            raise ClinicalFileError(f"unknown actions in the predictions file: {unknown} (known: "
                                    f"{', '.join((*ACTIONS, CANNOT_ASSESS))})")
        level = np.array([ACTIONS.index(a) if a in ACTIONS else 1 for a in acts])  # cannot_assess: not sent home
        point = triage_rates(task, y, level)
        point["cannot_assess_rate"] = float((acts == CANNOT_ASSESS).mean())
        out["triage"] = {"point": point, "ci95": _boot(lambda i: triage_rates(task, y[i], level[i]), n, n_boot, seed),
                         "counts": {a: int((acts == a).sum()) for a in (*ACTIONS, CANNOT_ASSESS)}}
    if has_set:
        sets = np.zeros((n, task.num_classes), dtype=bool)
        for i, v in enumerate(pred["differential"].fillna("").astype(str)):
            for c in v.split("|"):
                if c:
                    if c not in task.classes:
                        raise ClinicalFileError(f"differential names {c!r}, not a {task.name} class")
                    sets[i, task.classes.index(c)] = True
        point = set_metrics(task, y, sets)

        def one(i):
            m = set_metrics(task, y[i], sets[i])
            r = {"coverage": m["coverage"], "mean_set_size": m["mean_set_size"]}
            if "MEL" in task.classes:
                r["melanoma_coverage"] = m["coverage_by_class"]["MEL"]
            return r
        if "MEL" in task.classes:
            point["melanoma_coverage"] = point["coverage_by_class"]["MEL"]
        out["differential"] = {"point": point, "ci95": _boot(one, n, n_boot, seed)}
    return out


def _fmt(v, ci=None) -> str:
    s = "—" if v is None or not np.isfinite(v) else f"{v:.3f}"
    return s + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def clinical_section_html(m: dict | None) -> str:
    if not m:
        return ""
    rows = []
    if "triage" in m:
        t, ci = m["triage"]["point"], m["triage"]["ci95"]
        for k, label in (("melanoma_sensitivity", "melanomas referred"), ("malignant_sensitivity", "malignant referred"),
                         ("specificity", "benign not referred (specificity)"), ("referral_rate", "referred, all"),
                         ("urgent_rate", "urgent, all"), ("cannot_assess_rate", "cannot assess")):
            if k in t:
                rows.append(f"<tr><td class='text'>{label}</td><td>{_fmt(t[k], ci.get(k))}</td></tr>")
    if "differential" in m:
        d, ci = m["differential"]["point"], m["differential"]["ci95"]
        for k, label in (("coverage", "prediction set covers the diagnosis"), ("melanoma_coverage", "… for melanomas"),
                         ("mean_set_size", "mean set size"), ("empty_rate", "empty sets")):
            if k in d:
                rows.append(f"<tr><td class='text'>{label}</td><td>{_fmt(d[k], ci.get(k))}</td></tr>")
    return ("<section><h2>Clinical decisions: triage and the conformal differential</h2><div class='scroll'><table>"
            "<tr><th class='text'>measure</th><th>value [95% CI]</th></tr>" + "".join(rows) + "</table></div>"
            "<p class='note'>From the file's <code>action</code> and <code>differential</code> columns (<code>dermfusion "
            "predict --clinical</code>): referred = routine or urgent referral; a lesion answered <i>cannot assess</i> "
            "counts as referred (not sent home). " + html.escape(f"{m['n']} lesions.") + "</p></section>\n")
