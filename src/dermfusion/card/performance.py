"""Performance sections of a model card: held-out evaluation, out-of-fold metrics with bootstrap CIs, point
estimates from a run's summary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.manifest import targets
from ..evaluation.calibration import Calibration
from ..evaluation.metrics import bootstrap_metrics, compute_metrics
from .sections import load_manifest_source
from .sources import CARD_METRICS, METRIC_LABELS, N_BOOTSTRAP, as_number, ci_pair, jsonable, read_json, source_ref


def metric_block(kind: str, source: list, n, headline: dict, ci: dict, per_class: dict | None,
                  ci_method: str | None, note: str = "") -> dict:
    rows = []
    for k in CARD_METRICS + ("official_raw", "nested_cut_score"):
        v = as_number(headline.get(k))
        if v is None:
            continue
        rows.append({"key": k, "label": METRIC_LABELS.get(k, k), "value": v, "ci": ci_pair((ci or {}).get(k))})
    pcs = []
    for c, pc in (per_class or {}).items():
        if not isinstance(pc, dict):
            continue
        pci = pc.get("ci") or {}
        pcs.append({"class": c, "support": pc.get("support"), "precision": as_number(pc.get("precision")),
                    "recall": as_number(pc.get("recall")), "recall_ci": ci_pair(pci.get("recall")),
                    "f1": as_number(pc.get("f1")), "f1_ci": ci_pair(pci.get("f1")),
                    "auroc": as_number(pc.get("auroc")), "auroc_ci": ci_pair(pci.get("auroc"))})
    return {"kind": kind, "source": source, "n": n, "headline": rows, "per_class": pcs,
            "ci_method": ci_method, "note": note}


def evaluation_block(eval_dir: Path) -> tuple[dict | None, dict]:
    path = eval_dir / "metrics.json"
    m = read_json(path)
    if m is None:
        return None, {}
    src = [source_ref(path, m.get("generated"), "written by `dermfusion evaluate`")]
    nb = m.get("n_bootstrap")
    block = metric_block(
        "held-out evaluation", src, m.get("n"), m.get("metrics") or {}, m.get("ci") or {}, m.get("per_class"),
        f"percentile bootstrap over lesions ({nb} resamples)" if nb else None,
        "The card cannot verify that the evaluated predictions came from this bundle: check the evaluation "
        "directory belongs to it.")
    block["task"] = m.get("task")
    return block, m


def oof_metrics(run_dir: Path, task, manifest, calibration: dict | None, n_bootstrap: int = N_BOOTSTRAP) -> dict | None:
    """Metrics with bootstrap CIs of a run's calibrated out-of-fold predictions (oof.csv) against the labelled
    manifest; None when either is missing."""
    oof_path = Path(run_dir) / "oof.csv"
    if manifest is None or not oof_path.exists():
        return None
    df, msrc = load_manifest_source(manifest)
    oof = pd.read_csv(oof_path, dtype={"lesion_id": str})
    if oof.empty or not all(c in oof.columns for c in task.classes):
        return None
    man = df.assign(lesion_id=df["lesion_id"].astype(str)).drop_duplicates("lesion_id").set_index("lesion_id")
    oof = oof[oof["lesion_id"].isin(man.index)].reset_index(drop=True)
    if oof.empty:
        return None
    y = targets(man.loc[oof["lesion_id"]], task).astype(float)
    keep = np.isfinite(y).all(1)
    y, p = y[keep], oof.loc[keep, list(task.classes)].to_numpy(float)
    if not len(y):
        return None
    # the diagnosis as the balanced rule makes it; calibration figures (ECE, Brier, log-loss) of the posteriors
    cal = Calibration.from_dict(calibration)
    p, post = cal.balanced(p), cal.posterior(p)
    m = compute_metrics(task, y, p)
    ci = bootstrap_metrics(task, y, p, n=n_bootstrap) if n_bootstrap > 0 else {"headline": {}, "per_class": {}}
    m_post = compute_metrics(task, y, post)
    ci_post = bootstrap_metrics(task, y, post, n=n_bootstrap) if n_bootstrap > 0 else {"headline": {}}
    for k in ("ece", "brier", "log_loss"):
        m[k] = m_post[k]
        if k in ci_post["headline"]:
            ci["headline"][k] = ci_post["headline"][k]
    pcs = {c: {**m["per_class"][c], "ci": ci["per_class"].get(c, {})} for c in task.classes}
    return jsonable(metric_block(
        "out-of-fold (cross-validation on the training data)", [source_ref(oof_path, what="out-of-fold predictions"), msrc],
        int(len(y)), m, ci["headline"], pcs,
        f"percentile bootstrap over lesions ({n_bootstrap} resamples)" if n_bootstrap > 0 else None,
        "Out-of-fold predictions of the run's fold models, with this bundle's calibration applied (fitted on the "
        "same predictions, so calibration figures are slightly optimistic). Same population as the training "
        "data: not evidence of performance elsewhere."))


def summary_block(run_dir: Path) -> dict | None:
    """Point estimates from a run's summary.json (no CIs)."""
    path = run_dir / "summary.json"
    s = read_json(path)
    if not s:
        return None
    m = s.get("oof") if isinstance(s.get("oof"), dict) else s.get("metrics") if isinstance(s.get("metrics"), dict) else None
    if not m:
        return None
    head = {k: v for k, v in m.items() if as_number(v) is not None and k != "n"}
    after = ((s.get("calibration") or {}).get("oof_after_calibration") or {}) if isinstance(s.get("calibration"), dict) else {}
    block = metric_block("out-of-fold (cross-validation on the training data), point estimates",
                          [source_ref(path, what="written by `dermfusion train`")], m.get("n"), head, {}, None, None,
                          "Point estimates only (no confidence intervals): rewrite the card with "
                          "`dermfusion card RUN --manifest TRAINING_MANIFEST` for bootstrap CIs.")
    if after:
        block["after_calibration"] = {k: v for k, v in after.items() if as_number(v) is not None}
    return block
