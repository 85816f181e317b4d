"""One backend policy for every path that predicts (``predict``, ``gate``, ``bench``, the service).

Backends come in two kinds:

- **exact**: fp32 eager and ONNX Runtime float32 — the same weights in float32, so the same numbers up to the order
  of additions (≤ 1e-5 here); nothing a decision can notice. ``auto`` always considers ONNX Runtime float32 (3–5×
  eager on these CPUs) and keeps it when it is faster and matches fp32 eager on the bundled real sample.
- **approximate**: bf16, int8, onnx-int8, onnx-qdq. They move probabilities by up to a few hundredths and can flip
  decisions: on all 1,512 ISIC 2018 test images bf16 and static int8 flipped 1.7 % of them — a check on 32 lesions
  cannot see that. ``auto`` considers an approximate backend **only** when the bundle carries an agreement record
  for this CPU measured on at least ``MIN_RECORD_LESIONS`` real lesions (``dermfusion bundle check-backends RUN
  --manifest M``: ``backend_check.json``) in which it changed at most ``MAX_FLIP_RATE`` of the decisions — the
  balanced-rule diagnosis, the triage action at the bundle's operating point and the conformal set. With 500
  lesions, a backend that flips 1 % of decisions shows ~5 flips and is refused (P(≤ 1 flip) = 4 %).

A name other than ``auto`` is used as given (the caller's explicit choice); ``trained`` is float32, the precision
of the out-of-fold predictions the bundle's calibration was fitted on (``training.out_of_fold``).
"""
from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timezone

import numpy as np
import torch

from ..evaluation.conformal import prediction_sets
from ..evaluation.decision_rules import triage_levels
from .backends import prepare_backend
from .criteria import criteria_probabilities, divide_label_prior
from ..runtime.device import cpu_name, native_bf16

EXACT = ("fp32", "onnx")
APPROXIMATE = ("bf16", "int8", "onnx-int8", "onnx-qdq")
MIN_RECORD_LESIONS = 500
MAX_FLIP_RATE = 0.002
RECORD_FILE = "backend_check.json"


def _onnx_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def approximate_candidates(device, model=None) -> list[str]:
    """Approximate backends worth measuring on this machine: bf16 only where it is native (emulated bf16 on an
    AVX2-only CPU is many times slower than fp32), int8, and with ONNX Runtime its int8 forms (static int8 for a
    convolutional encoder)."""
    device = torch.device(device)
    if device.type != "cpu":
        return ["bf16"]
    out = (["bf16"] if native_bf16(device) else []) + ["int8"]
    if _onnx_available():
        out.append("onnx-int8")
        if model is not None and sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 4:
            out.append("onnx-qdq")
    return out


def read_record(bundle_path) -> dict:
    """This CPU's entry of the bundle's ``backend_check.json`` ({} if none)."""
    try:
        data = json.loads((bundle_path / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data.get(cpu_name(), {}) if isinstance(data, dict) else {}


def _stable(rec: dict, rate: str) -> bool:
    """Measured on enough real lesions, and ``rate`` (of changed decisions, or criteria labels) within the limit."""
    return rec.get("lesions", 0) >= MIN_RECORD_LESIONS and rec.get(rate, 1.0) <= MAX_FLIP_RATE


def approved(record: dict) -> list[str]:
    """Approximate backends the agreement record lets ``auto`` use: measured on enough real lesions, few enough
    decisions changed."""
    return [name for name, rec in (record.get("agreement") or {}).items()
            if name in APPROXIMATE and _stable(rec, "decision_flip_rate")]


def criteria_approved(record: dict, name: str) -> bool:
    """Whether an approximate backend's dermoscopic-criteria output may be used: its agreement record measured the
    criteria heads too (``criteria_flip_rate``: lesions whose any criterion label changed) on enough lesions and
    found them as stable as the decisions must be. Otherwise the criteria come from the eager heads."""
    return name in APPROXIMATE and _stable((record.get("agreement") or {}).get(name) or {}, "criteria_flip_rate")


def policy_text(network) -> str:
    rec = read_record(network.bundle.path)
    ok = approved(rec)
    if not rec.get("agreement"):
        return ("exact backends only (no agreement record for this CPU: `dermfusion bundle check-backends` measures "
                f"the approximate ones on ≥ {MIN_RECORD_LESIONS} real lesions)")
    return f"exact backends + {', '.join(ok)} (agreement record)" if ok else \
        "exact backends only (the agreement record approves no approximate backend)"


# ------------------------------------------------------------------------------------------ the agreement record
def decision_flips(task, calibration, decisions: dict, ref_raw: np.ndarray, raw: np.ndarray, *, ref_criteria=None,
                   criteria=None, criteria_prior=None) -> dict:
    """How many lesions change decision between two backends' raw probabilities: the balanced-rule diagnosis, the
    triage action at the bundle's operating point, the conformal set (where the bundle has them). With the criteria
    heads' probabilities of both ({criterion: N×L}), also how many lesions change any criterion's label (as served:
    divided by ``criteria_prior``) — recorded beside, not counted in the decision flips."""
    n = len(ref_raw)
    pr, pa = calibration.posterior(ref_raw), calibration.posterior(raw)
    flips = calibration.balanced(ref_raw).argmax(1) != calibration.balanced(raw).argmax(1)
    out = {"diagnosis_flips": int(flips.sum())}
    op = decisions.get("triage")
    if op:
        t = triage_levels(task, pr, op) != triage_levels(task, pa, op)
        out["action_flips"] = int(t.sum())
        flips |= t
    conf = decisions.get("differential")
    if conf:
        s = (prediction_sets(task, pr, conf) != prediction_sets(task, pa, conf)).any(1)
        out["set_flips"] = int(s.sum())
        flips |= s
    out.update(lesions=n, decision_flips=int(flips.sum()), decision_flip_rate=float(flips.mean()) if n else 1.0,
               max_prob_diff=float(np.abs(pr - pa).max()) if n else 0.0,
               max_risk_diff=float(100 * np.abs(pr[:, list(task.malignant_indices)].sum(1)
                                                - pa[:, list(task.malignant_indices)].sum(1)).max()) if n else 0.0)
    if ref_criteria and criteria:
        cr, ca = divide_label_prior(ref_criteria, criteria_prior), divide_label_prior(criteria, criteria_prior)
        changed = np.zeros(n, dtype=bool)
        for name in cr:
            changed |= cr[name].argmax(1) != ca[name].argmax(1)
        out.update(criteria_flips=int(changed.sum()), criteria_flip_rate=float(changed.mean()) if n else 1.0,
                   max_criteria_prob_diff=float(max(np.abs(cr[k] - ca[k]).max() for k in cr)) if n else 0.0)
    return out


def check_backends(network, batches: list[dict], calibration, decisions: dict, candidates=None,
                   tta_views=None) -> dict:
    """Every approximate candidate against fp32 eager on ``batches`` (real lesions): decision flips, probability and
    risk differences. ``tta_views``: {modality: [view functions]} to average as prediction does."""
    model = network.model
    cands = list(candidates) if candidates is not None else approximate_candidates(network.device, model)

    def over(runner):
        """(probabilities, {criterion: probabilities} or None), each averaged over the views."""
        out, crit = [], {}
        n = len(next(iter(tta_views.values()))) if tta_views else 1
        for b in batches:
            acc, cacc = None, {}
            for v in range(n):
                bv = dict(b, images={m: tta_views[m][v](x) for m, x in b["images"].items()}) if tta_views else b
                res = runner(bv)
                p = torch.softmax(res["logits"].float(), -1).cpu().numpy()
                acc = p if acc is None else acc + p
                for k, q in criteria_probabilities(res.get("criteria") or {}).items():
                    cacc[k] = cacc.get(k, 0) + q / n
            out.append(acc / n)
            for k, q in cacc.items():
                crit.setdefault(k, []).append(q)
        return np.concatenate(out), ({k: np.concatenate(v) for k, v in crit.items()} or None)

    ref, ref_crit = over(prepare_backend(model, "fp32", device=network.device))
    prior = network.bundle.config.get("criteria_prior")
    result = {}
    for name in cands:
        try:
            runner = prepare_backend(model, name, device=network.device, sample_batch=batches[0])
            raw, crit = over(runner)
            result[name] = decision_flips(network.task, calibration, decisions, ref, raw, ref_criteria=ref_crit,
                                          criteria=crit, criteria_prior=prior)
        except Exception as e:  # noqa: BLE001 — a backend that cannot run here is recorded, not fatal
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "lesions": 0}
    return result


def write_record(bundle_path, agreement: dict, lesions: int, source: str) -> None:
    """Store the agreement record under this CPU's name in the bundle's ``backend_check.json`` (documentation-class
    file: not covered by the hash; one bundle served on two machines keeps both)."""
    path = bundle_path / RECORD_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    entry = data.setdefault(cpu_name(), {})
    entry["agreement"] = agreement
    entry["agreement_meta"] = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "lesions": lesions, "source": source,
                               "rule": f"approved when ≥ {MIN_RECORD_LESIONS} lesions and decision flip rate ≤ "
                                       f"{MAX_FLIP_RATE:g}"}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
