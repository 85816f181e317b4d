"""A model card as Markdown and as one self-contained HTML page; the evaluation report's link to it."""
from __future__ import annotations

import html
import re
from pathlib import Path

from ..evaluation.report_link import REPORT_LINK_ID, report_link_html
from .sources import fmt_value, METRIC_LABELS, as_number


def _f(v, d: int = 3) -> str:
    v = as_number(v)
    return "–" if v is None else f"{v:.{d}f}"


def _fci(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _by_dataset_blocks(by_ds: dict) -> list:
    """Class counts and label provenance per dataset of a manifest that combines several."""
    names = list(by_ds)
    classes = list(next(iter(by_ds.values()))["class_counts"])
    out = [("h3", "By dataset"),
           ("table", ["Class"] + [d + (" (train only)" if by_ds[d]["train_only"] else "") for d in names],
            [[c] + [str(by_ds[d]["class_counts"][c]) for d in names] for c in classes]
            + [["All"] + [str(by_ds[d]["n_lesions"]) for d in names]])]
    kinds = list(dict.fromkeys(k for d in names for k in (by_ds[d]["provenance"].get("counts") or {})))
    if kinds:
        out.append(("table", ["Dataset"] + kinds,
                    [[d] + [str((by_ds[d]["provenance"].get("counts") or {}).get(k, 0)) for k in kinds]
                     for d in names]))
    return out


def _pct(v) -> str:
    v = as_number(v)
    return "–" if v is None else f"{100 * v:.0f}%"


def _source_line(src) -> str:
    if not src:
        return "Source: none."
    items = []
    for s in src if isinstance(src, list) else [src]:
        if not isinstance(s, dict):
            continue
        items.append(f"{s.get('file') or '—'}" + (f" ({s['date']})" if s.get("date") else "")
                     + (f" — {s['what']}" if s.get("what") else ""))
    return "Source: " + "; ".join(items) + "."


def card_sections(card: dict) -> list[tuple[str, list]]:
    """The card as (title, blocks); a block is ("p", text) | ("ul", [text]) | ("table", head, rows) | ("src", src)."""
    md, iu, td = card["model_details"], card["intended_use"], card["training_data"]
    perf, cal, fm = card["performance"], card["calibration"], card["failure_modes"]
    S: list[tuple[str, list]] = []
    ens = md.get("ensemble")
    details = [
        ("Name", md["name"]), ("Kind / architecture", f"{md['kind']} — {md['architecture']}"),
        ("Encoder", md.get("encoder") or "—"), ("Pretrained weights", md["pretrained_weights"]),
        ("Inputs", "; ".join(f"{k.replace('_', ' ')}: {', '.join(v) if isinstance(v, list) else v}"
                             for k, v in md.get("inputs", {}).items() if v not in (None, [], 0)) or "—"),
        ("Task", f"{md['task']} — {md['task_description']} (official metric: {md['official_metric']})"),
        ("Classes", ", ".join(c["code"] + (" (malignant)" if c["malignant"] else "") for c in md["classes"])),
        ("Bundle", md["bundle_path"]), ("Bundle hash", md["bundle_hash"] or "—"), ("Version", md["version"]),
        ("Date", md.get("date") or "—"),
    ]
    if md.get("fold") is not None:
        details.append(("Fold", "full-data refit" if md["fold"] == -1 else str(md["fold"])))
    if md.get("training"):
        details.append(("Training", ", ".join(f"{k} {v}" for k, v in md["training"].items())))
    if md.get("preprocessing", {}).get("color_constancy") not in (None, "none"):
        details.append(("Colour normalisation", md["preprocessing"]["color_constancy"]))
    if ens:
        details.append(("Ensemble", f"{ens.get('n_members')} bundles — {ens.get('note', '')}"))
    S.append(("Model details", [("kv", details), ("src", md.get("source"))]))
    S.append(("Intended use", [("p", "<b>" + iu["regulatory_status"] + "</b>"), ("ul", iu["primary_uses"]),
                               ("p", "Users: " + "; ".join(iu["users"]) + "."),
                               ("p", "Expected input: " + iu["inputs_expected"] + "."),
                               ("h3", "Out of scope"), ("ul", iu["out_of_scope"])]))
    blocks: list = []
    if td.get("available"):
        n = max(td["n_lesions"], 1)
        blocks.append(("p", f"{td['n_lesions']} labelled lesions" + (f" from {', '.join(td['datasets'])}" if td.get("datasets") else "")
                       + (f", {td['n_patients']} patients" if td.get("n_patients") else "") + "."))
        tb = td.get("this_bundle")
        if tb:
            blocks.append(("p", f"This bundle: fold {tb['fold']}, trained on {tb['n_train']} lesions"
                           + (f", validated on {tb['n_validation']}" if "n_validation" in tb else "") + "."))
        blocks.append(("table", ["Class", "Lesions", "Share"],
                       [[c, str(k), f"{100 * k / n:.1f}%"] for c, k in td["class_counts"].items()]))
        prov = td.get("provenance") or {}
        if prov.get("available"):
            kinds = list(prov["counts"])
            blocks.append(("h3", "How labels were confirmed (dx_confirmation)"))
            blocks.append(("table", ["Class"] + kinds + ["All"],
                           [[c] + [str(v.get(k, 0)) for k in kinds] + [str(sum(v.values()))]
                            for c, v in prov.get("by_class", {}).items()]
                           + [["All"] + [str(prov["counts"][k]) for k in kinds] + [str(sum(prov["counts"].values()))]]))
        else:
            blocks.append(("p", "Label provenance: " + prov.get("note", "not recorded") + "."))
        if td.get("by_dataset"):
            blocks.extend(_by_dataset_blocks(td["by_dataset"]))
        if td.get("availability"):
            blocks.append(("h3", "Availability of inputs"))
            blocks.append(("table", ["Input", "Known for"], [[k, _pct(v)] for k, v in td["availability"].items()]))
    else:
        blocks.append(("p", td.get("note", "not available")))
    blocks.append(("src", td.get("source")))
    S.append(("Training data", blocks))
    blocks = []
    for key in ("evaluation", "out_of_fold"):
        blk = perf.get(key)
        if not blk:
            continue
        blocks.append(("h3", blk["kind"][:1].upper() + blk["kind"][1:] + (f" — {blk['n']} lesions" if blk.get("n") else "")))
        blocks.append(("table", ["Metric", "Value [95% CI]"],
                       [[r["label"], _f(r["value"]) + _fci(r["ci"])] for r in blk["headline"]]))
        if blk.get("per_class"):
            blocks.append(("table", ["Class", "n", "Recall [95% CI]", "F1 [95% CI]", "AUROC [95% CI]"],
                           [[r["class"], str(r.get("support", "–")), _f(r["recall"]) + _fci(r.get("recall_ci")),
                             _f(r["f1"]) + _fci(r.get("f1_ci")), _f(r["auroc"]) + _fci(r.get("auroc_ci"))]
                            for r in blk["per_class"]]))
        if blk.get("after_calibration"):
            blocks.append(("p", "After calibration: " + ", ".join(
                f"{METRIC_LABELS.get(k, k)} {_f(v)}" for k, v in blk["after_calibration"].items()) + "."))
        if blk.get("ci_method"):
            blocks.append(("p", "Intervals: " + blk["ci_method"] + "."))
        if blk.get("note"):
            blocks.append(("p", blk["note"]))
        blocks.append(("src", blk["source"]))
    if perf.get("evaluation_note"):
        blocks.append(("p", perf["evaluation_note"]))
    if perf.get("note"):
        blocks.append(("p", "<b>" + perf["note"] + "</b>"))
    bv = perf.get("bundle_validation")
    if bv:
        blocks.append(("p", "This bundle's own validation at save time: " + ", ".join(
            f"{METRIC_LABELS.get(k, k)} {_f(v)}" for k, v in bv["metrics"].items()) + "."))
        blocks.append(("src", bv["source"]))
    S.append(("Performance", blocks))
    sg = card["subgroups"]
    blocks = []
    if sg.get("available"):
        blocks.append(("table", ["Attribute", "Group", "n", "Malignant n", "Balanced acc.", "Malignant sens.",
                                 "Melanoma sens.", "Status"],
                       [[str(r["attribute"]), str(r["group"]), str(r["n"]), str(r.get("n_malignant", "–")),
                         _f(r.get("balanced_accuracy")), _f(r.get("malignant_sensitivity")),
                         _f(r.get("melanoma_sensitivity")),
                         str(r.get("status")) + (f": {r['reason']}" if r.get("status") == "flagged" else "")]
                        for r in sg["rows"]]))
        blocks.append(("p", "Rule: " + sg["rule"] + "."))
    else:
        blocks.append(("p", sg.get("note", "not available")))
    blocks.append(("src", sg.get("source")))
    S.append(("Subgroups (fairness)", blocks))
    pr = card["provenance_results"]
    blocks = []
    if pr.get("available"):
        if pr.get("warnings"):
            blocks.append(("ul", pr["warnings"]))
        else:
            blocks.append(("p", "No provenance warnings."))
        for t in pr.get("tables", []):
            cols = list(dict.fromkeys(k for r in t["rows"] for k in r))
            blocks.append(("h3", t["name"].replace("_", " ")))
            blocks.append(("table", cols, [[fmt_value(r.get(k, "")) if r.get(k, "") != "" else "" for k in cols]
                                           for r in t["rows"]]))
        if pr.get("too_small"):
            blocks.append(("p", "Groups too small to judge: " + ", ".join(pr["too_small"]) + "."))
    else:
        blocks.append(("p", pr.get("note", "not available")))
    blocks.append(("src", pr.get("source")))
    S.append(("Results by label provenance", blocks))
    cs = card["covariate_shift"]
    blocks = []
    if cs.get("available"):
        blocks.append(("p", cs["reading"]))
        if cs.get("sides"):
            blocks.append(("p", " vs ".join(f"{k}: {v}" for k, v in cs["sides"].items())))
        for name, c in cs["checks"].items():
            blocks.append(("p", f"<b>{name.replace('_', ' ')}</b>: AUC {_f(c.get('auc'))}{_fci(c.get('ci'))}"
                           + "".join(f", {k.replace('_', ' ')} {v}" for k, v in c.items()
                                     if k not in ("auc", "ci", "top_differences"))))
            if c.get("top_differences"):
                blocks.append(("ul", c["top_differences"]))
        if cs.get("top_differences"):
            blocks.append(("h3", "Largest differences"))
            blocks.append(("ul", cs["top_differences"]))
        if cs.get("details"):
            blocks.append(("p", ", ".join(f"{k}: {v}" for k, v in cs["details"].items())))
    else:
        blocks.append(("p", cs.get("note", "not available")))
    blocks.append(("src", cs.get("source")))
    S.append(("Covariate shift", blocks))
    blocks = [("kv", [("Calibrated", "yes" if cal.get("calibrated") else "no (identity)"),
                      ("Temperature", _f(cal.get("temperature"))),
                      ("Prior adjustment", ", ".join(f"{k} {_f(v, 2)}" for k, v in cal["prior_adjustment"].items())
                       if isinstance(cal.get("prior_adjustment"), dict) else "none"),
                      ("Per-class cuts (submission only)", ", ".join(f"{k} {_f(v, 2)}" for k, v in cal["cuts"].items())
                       if isinstance(cal.get("cuts"), dict) else "none")]
               + ([("Expected calibration error", _f(cal["ece"]["value"]) + _fci(cal["ece"]["ci"])
                    + f" ({cal['ece']['from']})")] if cal.get("ece") else []))]
    if cal.get("ece_note"):
        blocks.append(("p", cal["ece_note"] + "."))
    blocks.append(("src", cal.get("source")))
    S.append(("Calibration", blocks))
    blocks = [("h3", "Found in this model's data and results")]
    blocks.append(("ul", [f"<b>{d['kind']}</b>: {d['text']}" for d in fm["derived"]] or ["none found by the rules below"]))
    blocks.append(("p", "Rules: " + fm["rules"] + "."))
    blocks.append(("h3", "General caveats for dermoscopy models"))
    blocks.append(("ul", fm["general"]))
    S.append(("Known failure modes and caveats", blocks))
    return S


def render_markdown(card: dict) -> str:
    md = card["model_details"]
    out = [f"# Model card — {md['name']}", "",
           f"_Generated {card['generated']} by {card['generator']}. {card['intended_use']['regulatory_status']}_", ""]

    def clean(t: str) -> str:
        return str(t).replace("<b>", "**").replace("</b>", "**").replace("|", "\\|").replace("\n", " ")

    for title, blocks in card_sections(card):
        out += [f"## {title}", ""]
        for blk in blocks:
            kind = blk[0]
            if kind == "p":
                out += [clean(blk[1]), ""]
            elif kind == "h3":
                out += [f"### {blk[1]}", ""]
            elif kind == "ul":
                out += [f"- {clean(x)}" for x in blk[1]] + [""]
            elif kind == "kv":
                out += ["| | |", "|---|---|"] + [f"| {clean(k)} | {clean(v)} |" for k, v in blk[1]] + [""]
            elif kind == "table":
                head, rows = blk[1], blk[2]
                out += ["| " + " | ".join(clean(h) for h in head) + " |", "|" + "---|" * len(head)]
                out += ["| " + " | ".join(clean(c) for c in r) + " |" for r in rows] + [""]
            elif kind == "src":
                out += [f"_{clean(_source_line(blk[1]))}_", ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--accent:#2f6fbf;--warn:#fff4e5}
*{box-sizing:border-box}
body{font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--ink);
     margin:0;background:#fafbfc}
header{background:#fff;border-bottom:1px solid var(--line);padding:20px 32px}
header h1{margin:0 0 4px;font-size:22px}
.meta{color:var(--muted)}
.disclaimer{background:var(--warn);border:1px solid #f5c26b;border-radius:6px;padding:8px 12px;margin-top:10px}
main{max-width:1100px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:20px 0}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:14.5px;margin:14px 0 6px}
p.src{color:var(--muted);font-size:12.5px;margin:8px 0 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;margin:6px 0}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f5f7fa;font-weight:600}
table.kv th{width:220px}
.scroll{overflow-x:auto}
li{margin:2px 0}
code{font-size:12.5px;background:#f5f7fa;padding:0 3px;border-radius:3px}
"""


def render_html(card: dict) -> str:
    """One self-contained HTML page (inline CSS, no external resources)."""
    md = card["model_details"]
    e = html.escape

    def text(t) -> str:  # escape, then allow the <b> and `code` markup the card itself inserts
        t = e(str(t)).replace("&lt;b&gt;", "<b>").replace("&lt;/b&gt;", "</b>")
        return re.sub(r"`([^`<>]+)`", r"<code>\1</code>", t)

    parts = []
    for title, blocks in card_sections(card):
        body = []
        for blk in blocks:
            kind = blk[0]
            if kind == "p":
                body.append(f"<p>{text(blk[1])}</p>")
            elif kind == "h3":
                body.append(f"<h3>{e(blk[1])}</h3>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{text(x)}</li>" for x in blk[1]) + "</ul>")
            elif kind == "kv":
                body.append("<table class='kv'>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>"
                                                           for k, v in blk[1]) + "</table>")
            elif kind == "table":
                body.append("<div class='scroll'><table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in blk[1]) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
                            + "</table></div>")
            elif kind == "src":
                body.append(f"<p class='src'>{text(_source_line(blk[1]))}</p>")
        anchor = title.lower().split(" ")[0]
        parts.append(f"<section id='{e(anchor)}'><h2>{e(title)}</h2>{''.join(body)}</section>")
    served = card.get("served")
    served_line = f"<br>Served: {e(_source_line(served['origin']))}" if served else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Model card — {e(md['name'])}</title><style>{CSS}</style></head>
<body>
<header><h1>Model card — {e(md['name'])}</h1>
<div class="meta">{e(md['task'])} · {e(md['architecture'])} · hash {e((md.get('bundle_hash') or '—')[:16])} ·
{e(md['version'])} · generated {e(card['generated'])} by {e(card['generator'])}{served_line}</div>
<div class="disclaimer"><b>{e(card['intended_use']['regulatory_status'])}</b></div></header>
<main>{''.join(parts)}</main></body></html>
"""


def link_report(evaluation_dir) -> bool:
    """Add the model-card link to an existing report.html (rendered before the card existed); idempotent.
    True when the report links the card."""
    rep = Path(evaluation_dir) / "report.html"
    if not rep.exists():
        return False
    s = rep.read_text(encoding="utf-8")
    if REPORT_LINK_ID in s:
        return True
    link = report_link_html(evaluation_dir)
    if not link or "<main>" not in s:
        return False
    rep.write_text(s.replace("<main>", "<main>" + link, 1), encoding="utf-8")
    return True
