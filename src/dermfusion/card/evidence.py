"""Evidence sections of a model card: subgroups, recall by label provenance, covariate shift, calibration."""
from __future__ import annotations

from pathlib import Path

from .sources import fmt_value, as_number, ci_pair, read_json, source_ref


def subgroups_section(m: dict, src: list) -> dict:
    rows = [r for r in (m.get("fairness") or []) if isinstance(r, dict)]
    if not rows:
        return {"available": False, "source": src, "note": "the evaluation's metrics.json has no subgroup table"}
    keep = ("attribute", "group", "n", "n_malignant", "balanced_accuracy", "malignant_sensitivity",
            "melanoma_sensitivity", "malignant_auroc", "status", "reason")
    attrs = sorted({str(r.get("attribute")) for r in rows} - {"all"})
    return {"available": True, "source": src, "attributes": attrs,
            "rows": [{k: r.get(k) for k in keep} for r in rows],
            "rule": "flagged: malignant or melanoma sensitivity more than 0.10 below the whole set; "
                    "slices under 10 lesions are too small to judge"}


def _tables_in(d, prefix: str = "") -> list[dict]:
    """Tables in a dict of unknown shape: {group: {col: value}} or lists of records (flattened one level)."""
    out = []
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            out.append({"name": name, "rows": [_flat(r) for r in v]})
        elif isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values()):
            out.append({"name": name, "rows": [{"group": g, **_flat(r)} for g, r in v.items()]})
    return out


def _flat(r: dict, prefix: str = "", depth: int = 0) -> dict:
    o = {}
    for k, v in r.items():
        if isinstance(v, dict) and depth < 1:
            o.update(_flat(v, f"{prefix}{k}.", depth + 1))
        elif not isinstance(v, (dict, list)) or (isinstance(v, list) and len(v) <= 2):
            o[f"{prefix}{k}"] = v
    return o


def provenance_section(m: dict, src: list) -> dict:
    """metrics.json "provenance" (evaluation.provenance.provenance_recall): per provenance group the per-class
    recall (n, Wilson CI) and warnings where recall differs between groups. Unknown shapes shown generically."""
    prov = m.get("provenance")
    if not isinstance(prov, dict) or not prov:
        return {"available": False, "source": src,
                "note": "the evaluation's metrics.json has no provenance results (evaluated by a version "
                        "without them)"}
    if prov.get("available") is False:
        return {"available": False, "source": src, "column": prov.get("column"),
                "note": f"the evaluated manifest records no label provenance ({prov.get('column') or 'dx_confirmation'})"}
    warnings = [str(w.get("message") or w) if isinstance(w, dict) else str(w) for w in prov.get("warnings") or [] if w]
    groups = prov.get("groups")
    out = {"available": True, "source": src, "warnings": warnings, "column": prov.get("column"), "tables": []}
    if isinstance(groups, list) and groups and all(isinstance(g, dict) and isinstance(g.get("per_class"), dict)
                                                   for g in groups):
        classes = list(dict.fromkeys(c for g in groups for c in g["per_class"]))
        rows = []
        for g in groups:
            row = {"group": g.get("label") or g.get("group"), "n": g.get("n"), "accuracy": as_number(g.get("accuracy"))}
            for c in classes:
                cell = g["per_class"].get(c) or {}
                rec = as_number(cell.get("recall")) if isinstance(cell, dict) else as_number(cell)
                row[c] = "–" if rec is None else f"{rec:.2f} (n={cell.get('n')})" if isinstance(cell, dict) else f"{rec:.2f}"
            rows.append(row)
        out["tables"].append({"name": "recall by label provenance (argmax; n = lesions of the class)", "rows": rows})
        if prov.get("too_small"):
            out["too_small"] = [f"{t.get('group')} (n={t.get('n')})" for t in prov["too_small"] if isinstance(t, dict)]
    else:
        out["tables"] = _tables_in({k: v for k, v in prov.items() if k != "warnings"})
    return out


def _difference_text(t) -> str:
    if isinstance(t, str):
        return t
    if not isinstance(t, dict):
        return str(t)
    if "smd" in t and ("statistic" in t or "description" in t):
        means = (f" (reference {fmt_value(t['reference_mean'])} vs {fmt_value(t['other_mean'])})"
                 if "reference_mean" in t and "other_mean" in t else "")
        smd = as_number(t.get("smd"))
        return f"{t.get('description') or t.get('statistic')}: standardised difference " \
               f"{'–' if smd is None else f'{smd:+.2f}'}{means}"
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in t.items() if not isinstance(v, (dict, list)))


def covariate_shift_section(shift_json: Path | None, evaluation: dict | None = None, eval_src: list | None = None) -> dict:
    """shift.json (`dermfusion shift`: feature_sets {image_statistics, embeddings}: auc, ci, level;
    top_differences) — or the "shift" an evaluation ran (`evaluate --shift-reference`)."""
    if shift_json is not None:
        s = read_json(shift_json)
        if s is None:
            return {"available": False, "source": [source_ref(shift_json)], "note": f"{shift_json} is missing or not JSON"}
        src = [source_ref(shift_json, s.get("generated"), "written by `dermfusion shift`")]
    elif isinstance((evaluation or {}).get("shift"), dict):
        s, src = evaluation["shift"], list(eval_src or [])
    else:
        return {"available": False, "source": [],
                "note": "no covariate-shift check attached (run `dermfusion shift` and `dermfusion card --shift`)"}
    sets = dict(s.get("feature_sets") or {}) if isinstance(s.get("feature_sets"), dict) else {}
    for name in ("image_stats", "embeddings"):  # older / flat layout
        if isinstance(s.get(name), dict) and name not in sets:
            sets[name] = s[name]
    checks = {}
    for name, c in sets.items():
        if not isinstance(c, dict):
            continue
        ci = ci_pair(c.get("ci")) or ci_pair([c.get("ci_low"), c.get("ci_high")])
        checks[name] = {"auc": as_number(c.get("auc")), "ci": ci,
                        **{k: v for k, v in c.items() if k in ("level", "n_reference", "n_other", "n_features",
                                                                "classifier", "bundle", "dim")}}
        if c.get("top_differences"):
            checks[name]["top_differences"] = [_difference_text(t) for t in c["top_differences"]][:10]
    sides = {k: s[k].get("name") for k in ("reference", "other") if isinstance(s.get(k), dict) and s[k].get("name")}
    return {"available": bool(checks), "source": src, "checks": checks, "sides": sides,
            "top_differences": [_difference_text(t) for t in (s.get("top_differences") or [])][:10],
            "details": {k: s[k] for k in ("modality", "color_constancy", "classifier") if k in s and
                        not isinstance(s[k], (dict, list))},
            "reading": "AUC of a classifier trained to tell the reference (training) images from the other (target) "
                       "images: 0.5 = indistinguishable; well above 0.5 = the target images differ, so out-of-fold "
                       "figures may not transfer to them.",
            **({} if checks else {"note": "the shift result has no AUC (feature_sets / image_stats / embeddings)"})}


def calibration_section(b, perf: dict) -> dict:
    c = b.calibration or {}
    src = [source_ref(b.path / "calibration.json", what="fitted on out-of-fold predictions by `dermfusion train` / `calibrate`")]
    adj = c.get("prior_adjustment")
    out = {"source": src, "calibrated": bool(c) and not (
        (c.get("temperature") in (None, 1, 1.0)) and adj is None and c.get("cuts") is None
        and not any(c.get("bias") or [])),
           "temperature": as_number(c.get("temperature")) if c else None,
           "prior_adjustment": dict(zip(b.task.classes, adj)) if isinstance(adj, list) and len(adj) == b.task.num_classes else adj,
           "cuts": dict(zip(b.task.classes, c["cuts"])) if isinstance(c.get("cuts"), list) and len(c["cuts"]) == b.task.num_classes else c.get("cuts")}
    for key in ("evaluation", "out_of_fold"):
        blk = perf.get(key)
        row = next((r for r in (blk or {}).get("headline", []) if r["key"] == "ece"), None)
        if row:
            out["ece"] = {"value": row["value"], "ci": row["ci"], "from": blk["kind"], "source": blk["source"][:1]}
            break
    else:
        out["ece_note"] = "no expected calibration error available (needs an evaluation or the training manifest)"
    return out
