"""Known failure modes, derived from the card's own figures by stated screening rules."""
from __future__ import annotations


LOW_RECALL = 0.5
WIDE_CI = 0.3
FEW_CASES = 30
LOW_SENSITIVITY = 0.8
HIGH_ECE = 0.1
SHIFT_AUC = 0.6
GENERAL_CAVEATS = [
    "Dark skin (Fitzpatrick V–VI) is under-represented in public dermoscopy datasets; performance on darker "
    "skin is largely unmeasured.",
    "Public dermoscopy datasets come from specialist referral centres: the case mix and the prevalence of "
    "malignancy differ from primary care, so predictive values will differ there.",
    "Acquisition artefacts (ink markings, rulers, hair, gel bubbles, vignetting, colour cast of a device) can "
    "act as shortcuts that do not transfer to other clinics.",
    "Labels not confirmed by histopathology (follow-up, expert consensus, confocal microscopy) are noisier, and "
    "how a label was confirmed can itself be learnt as a shortcut.",
    "Retrospective evaluation only; no prospective or reader study is behind these figures.",
]


def failure_modes_section(card: dict, b) -> dict:
    task = b.task
    derived: list[dict] = []

    def add(kind, text, source=None):
        derived.append({"kind": kind, "text": text, **({"source": source} if source else {})})

    perf = card["performance"]
    blk = perf.get("evaluation") or perf.get("out_of_fold")
    if blk and blk.get("per_class"):
        where = blk["kind"]
        for r in blk["per_class"]:
            rec, ci, n = r.get("recall"), r.get("recall_ci") or r.get("f1_ci"), r.get("support")
            if rec is not None and rec < LOW_RECALL and (n or 0) > 0:
                desc = task.class_descriptions.get(r["class"], "")
                add("low recall", f"{r['class']}" + (f" ({desc})" if desc else "") + f": recall {rec:.2f}"
                    + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f", n={n} ({where})")
            elif ci and ci[1] - ci[0] > WIDE_CI:
                add("uncertain", f"{r['class']}: wide 95% CI ({ci[0]:.2f}–{ci[1]:.2f}, n={n}) — too few cases to "
                    f"judge this class ({where})")
        for r in blk.get("headline", []):
            if r["key"] in ("melanoma_sensitivity", "malignant_sensitivity") and r["value"] < LOW_SENSITIVITY:
                add("missed cancers", f"{r['label']} {r['value']:.2f}" + (
                    f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else "") + f" ({where}): about "
                    f"{round(100 * (1 - r['value']))} in 100 "
                    + ("melanomas" if r["key"].startswith("melanoma") else "malignant lesions") + " are missed")
            if r["key"] == "ece" and r["value"] > HIGH_ECE:
                add("calibration", f"expected calibration error {r['value']:.3f} ({where}): stated probabilities "
                    "are off by more than 0.1 on average")
    elif not blk:
        add("no evidence", "no performance figures are attached to this card (no evaluation, no out-of-fold "
            "predictions): the model's accuracy is unknown")
    if not perf.get("evaluation"):
        add("no held-out evaluation", "no held-out evaluation attached: figures (if any) are cross-validated on the "
            "training data, which overstates performance on other clinics' images")
    td = card["training_data"]
    if td.get("available"):
        n = max(td.get("n_lesions", 0), 1)
        for c, k in td.get("class_counts", {}).items():
            if k < FEW_CASES:
                add("rare class", f"{c}: only {k} training lesions ({100 * k / n:.1f}%)")
        prov = td.get("provenance") or {}
        if prov.get("available") and len(prov.get("counts", {})) > 1:
            dom = {c: max(v, key=v.get) for c, v in prov.get("by_class", {}).items() if v}
            if len(set(dom.values())) > 1:
                parts = ", ".join(f"{c}: mostly {d} ({100 * prov['by_class'][c][d] / sum(prov['by_class'][c].values()):.0f}%)"
                                  for c, d in dom.items())
                add("label provenance shortcut", "how labels were confirmed differs by class (" + parts + "); "
                    "a model can learn the acquisition of, e.g., follow-up nevi rather than the lesion — check "
                    "recall by provenance")
        av = td.get("availability", {})
        if "skin_tone" in av and av["skin_tone"] < 0.5:
            add("skin tone", f"skin tone recorded for {100 * av['skin_tone']:.0f}% of training lesions: "
                "performance by skin tone cannot be assessed from the training data")
    meta = card["model_details"]["inputs"].get("metadata") or []
    if meta:
        av = td.get("availability", {}) if td.get("available") else {}
        known = ", ".join(f"{k} {100 * av[k]:.0f}%" for k in meta if k in av)
        add("missing metadata", f"the model uses {', '.join(meta)}; missing values are masked at test time, but "
            "accuracy without them may be lower than the figures above" + (f" (known in training: {known})" if known else ""))
    sg = card["subgroups"]
    for r in sg.get("rows", []) if sg.get("available") else []:
        if r.get("status") == "flagged":
            add("subgroup", f"{r['attribute']}={r['group']} (n={r['n']}): {r.get('reason')}")
    if sg.get("available") and "skin_tone" not in sg.get("attributes", []):
        add("skin tone", "the evaluation data record no skin tone: fairness by skin tone is unmeasured")
    for w in card["provenance_results"].get("warnings", []):
        add("provenance", w)
    for name, c in (card["covariate_shift"].get("checks") or {}).items():
        if c.get("auc") is not None and c["auc"] > SHIFT_AUC and not (c.get("ci") and c["ci"][0] <= 0.5):
            add("covariate shift", f"{name.replace('_', ' ')}: training and target images are separable with AUC "
                f"{c['auc']:.2f}" + (f" [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" if c.get("ci") else "")
                + " — the target images differ; out-of-fold figures may not hold there")
    caveats = list(GENERAL_CAVEATS)
    kinds = card["model_details"]["inputs"].get("image_types")
    if kinds == ["dermoscopic"]:
        caveats.insert(1, "Trained on dermoscopic images only: clinical (non-dermoscopic) and smartphone photos are "
                          "outside its training distribution.")
    elif kinds == ["clinical"]:
        caveats.insert(1, "Trained on clinical close-up photos only: dermoscopic images are outside its training data.")
    return {"derived": derived, "general": caveats,
            "rules": f"low recall < {LOW_RECALL}; wide CI > {WIDE_CI}; rare class < {FEW_CASES} lesions; "
                     f"cancer sensitivity < {LOW_SENSITIVITY}; ECE > {HIGH_ECE}; shift AUC > {SHIFT_AUC}"}
