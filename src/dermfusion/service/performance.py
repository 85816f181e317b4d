"""The performance report from the audit trail joined with clinicians' confirmed diagnoses (``GET /v1/performance``,
``dermfusion performance``): per version n, per-class sensitivity, melanoma sensitivity (referred), accuracy and
one-vs-rest AUROC; and the A/B comparison of two versions on the *same* cases — McNemar's exact test on paired
correctness with a sample-size caveat (``evaluation.ab_compare``).

Every prediction counts under the version that made it: the answer's row (``registry_version``) and the
predictions made but not returned (``dermfusion_audit_shadow``). Without a registry a row's version is
``hash:<first 12 characters of the model hash>``.

Each case counts with the confirmed diagnosis that counts by the feedback rules (``audit.resolve_feedback``: the
strongest confirmation, or an explicit amendment); ``feedback`` says how the diagnoses were confirmed and flags the
cases whose confirmations disagree (``conflicts``) — read those before trusting a figure.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..evaluation.ab_compare import correct_of, mcnemar_exact, sample_size_note, version_performance
from ..tasks import get_task

REFERRALS = ("urgent_referral", "routine_referral")


def version_of(row: dict) -> str:
    return row.get("registry_version") or f"hash:{(row.get('model_hash') or '')[:12]}"


def _predictions(cases: list[dict]) -> dict[str, dict[str, dict]]:
    """{version: {request_id: {outputs, action, diagnosis, task}}} over every confirmed case."""
    out: dict[str, dict[str, dict]] = {}
    for case in cases:
        row = case["row"]
        for pred in [row, *case["shadows"]]:
            out.setdefault(version_of(pred), {})[row["request_id"]] = {
                "outputs": pred["outputs"], "action": pred["action"], "diagnosis": case["diagnosis"],
                "task": pred["task"]}
    return out


def _arrays(task, preds: dict[str, dict], ids: list[str]):
    truth = [preds[i]["diagnosis"] for i in ids]
    probs = np.array([[float(preds[i]["outputs"].get(c, 0.0)) for c in task.classes] for i in ids]).reshape(
        len(ids), len(task.classes))
    referred = np.array([preds[i]["action"] in REFERRALS for i in ids], dtype=bool)
    return truth, probs, referred


def performance_report(store, version_a: str | None = None, version_b: str | None = None,
                       delta: float = 0.05) -> dict:
    """The report. ``version_a`` / ``version_b`` default to the version that answered most confirmed cases and the
    one with the most unreturned predictions on them (the service passes its promoted and shadow versions)."""
    cases = store.confirmed_cases()
    preds = _predictions(cases)
    answered = Counter(version_of(c["row"]) for c in cases)
    shadowed = Counter(version_of(s) for c in cases for s in c["shadows"])
    a = version_a or (answered.most_common(1)[0][0] if answered else None)
    b = version_b or next((v for v, _ in shadowed.most_common() if v != a), None)
    report: dict = {"confirmed_cases": len(cases), "version_a": a, "version_b": b, "versions": {},
                    "comparison": None, "definitions": {
                        "sensitivity": "share of the confirmed cases of a class whose top class (argmax) is that class",
                        "melanoma_sensitivity": "share of confirmed melanomas the version's triage referred (urgent or "
                                                "routine; cannot_assess is not a referral)",
                        "auroc": "one-vs-rest, for classes with both positive and negative confirmed cases",
                        "mcnemar": "exact two-sided binomial test on the discordant pairs of paired correctness"}}
    conflicting = sorted(c["row"]["request_id"] for c in cases if c.get("conflict"))
    report["feedback"] = {
        "by_confirmation": dict(Counter(c.get("confirmation") for c in cases)),
        "amended": sum(1 for c in cases if c.get("amended")),
        "conflicts": len(conflicting), "conflicting_request_ids": conflicting[:100],
        "rule": "the strongest confirmation counts (histology > confocal > follow_up > consensus) unless an explicit "
                "amendment replaced it; a conflict is a confirmation of another diagnosis that was not amended"}
    for v in [x for x in (a, b) if x]:
        p = preds.get(v, {})
        ids = sorted(p)
        if not ids:
            report["versions"][v] = {"n": 0}
            continue
        task = get_task(p[ids[0]]["task"])
        report["versions"][v] = {"task": task.name, **version_performance(task, *_arrays(task, p, ids))}
    if a and b and a in preds and b in preds:
        pa, pb = preds[a], preds[b]
        ids = sorted(i for i in set(pa) & set(pb) if pa[i]["task"] == pb[i]["task"])
        comp: dict = {"n_pairs": len(ids), "same_cases": {}}
        if ids:
            task = get_task(pa[ids[0]]["task"])
            ids = [i for i in ids if pa[i]["task"] == task.name]
            ta, xa, ra = _arrays(task, pa, ids)
            tb, xb, rb = _arrays(task, pb, ids)
            comp["same_cases"] = {a: version_performance(task, ta, xa, ra), b: version_performance(task, tb, xb, rb)}
            test = mcnemar_exact(correct_of(task, ta, xa), correct_of(task, tb, xb))
        else:
            test = mcnemar_exact([], [])
        comp["mcnemar"] = test
        comp["note"] = sample_size_note(test, delta=delta)
        report["comparison"] = comp
    return report


def format_report(report: dict) -> list[str]:
    """Plain-text lines for the CLI."""
    lines = [f"confirmed cases: {report['confirmed_cases']}"]
    fb = report.get("feedback") or {}
    if fb.get("conflicts"):
        lines.append(f"WARNING: {fb['conflicts']} case(s) with conflicting confirmations (not amended): "
                     + ", ".join(fb["conflicting_request_ids"][:10]) + (" …" if fb["conflicts"] > 10 else ""))
    if fb.get("amended"):
        lines.append(f"{fb['amended']} case(s) with an amended diagnosis")
    f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    for v, p in report["versions"].items():
        if not p.get("n"):
            lines.append(f"version {v}: no confirmed cases")
            continue
        lines.append(f"version {v}: n={p['n']}  accuracy={f(p['accuracy'])}  melanoma sensitivity (referred)="
                     f"{f(p['melanoma_sensitivity'])}  macro AUROC={f(p['auroc_macro'])}")
        lines.append("   sensitivity: " + "  ".join(f"{c}={f(d['sensitivity'])} (n={d['n']})"
                                                     for c, d in p["per_class"].items() if d["n"]))
    comp = report.get("comparison")
    if comp:
        t = comp["mcnemar"]
        lines.append(f"A/B {report['version_a']} vs {report['version_b']} on {comp['n_pairs']} same cases: "
                     f"{report['version_a']} right / {report['version_b']} wrong = {t['a_right_b_wrong']}, "
                     f"the reverse = {t['a_wrong_b_right']}; McNemar exact p = {t['p_value']:.4g}")
        lines.append(comp["note"])
    return lines
