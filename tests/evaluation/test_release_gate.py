"""The release gate (``dermfusion gate``, ``evaluation.release_gate``): a tiny trained bundle passes lenient
criteria (exit 0, gate.json + the evaluate report in BUNDLE/gate) and fails strict ones (exit 1, the table names the
failing criterion); a misspelt key is a one-line error. Without a model: a minimum is judged on the interval's
lower bound (a good point estimate on few lesions fails), the skin-tone spread on the upper bound, and melanoma
detection is the triage referral, not the argmax."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli_helpers import squash
from service_fixtures import tiny_bundle  # noqa: F401

from dermfusion.bundle import read_bundle
from dermfusion.cli import app
from dermfusion.evaluation.release_gate import GateCriteria, GateCriteriaError, load_criteria, run_gate
from dermfusion.tasks import ISIC2018

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENIENT = {"balanced_accuracy_min": 0.0, "melanoma_sensitivity_min": 0.0, "skin_tone_sensitivity_spread_max": 100,
           "calibration_error_max": 1.0, "latency_ms_max": 60000, "bootstrap": 100, "latency_lesions": 3}
STRICT = {**LENIENT, "balanced_accuracy_min": 0.99, "calibration_error_max": 0.001}


def gate(*args, code: int):
    res = CliRunner().invoke(app, ["gate", *map(str, args)])
    assert res.exit_code == code, f"exit {res.exit_code}\n{res.output}"
    return squash(res.output)


def write(path, criteria: dict):
    path.write_text(json.dumps(criteria))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory, tiny_bundle):
    """A copy of the session's tiny trained bundle (the gate writes BUNDLE/gate by default)."""
    return shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("gate") / "bundle")


def test_lenient_criteria_pass_and_write_the_record_and_report(tmp_path, bundle_copy, ham_manifest):
    text = gate(bundle_copy, "--manifest", ham_manifest, "--criteria", write(tmp_path / "gate.yaml", LENIENT), code=0)
    assert "RELEASE GATE PASSED" in text and "Balanced accuracy" in text
    out = bundle_copy / "gate"
    record = json.loads((out / "gate.json").read_text())
    assert record["passed"] is True and record["failed"] == [] and record["n"] == 48
    by = {r["criterion"]: r for r in record["criteria"]}
    assert set(by) == {k for k in LENIENT if k.endswith(("_min", "_max"))}
    # HAM10000 records no skin tone: skipped with a note, which does not fail the gate
    assert by["skin_tone_sensitivity_spread_max"]["status"] == "skipped"
    assert "no skin tone" in by["skin_tone_sensitivity_spread_max"]["note"]
    assert by["latency_ms_max"]["status"] == "pass" and len(record["latencies_ms"]) == 3
    assert by["latency_ms_max"]["value"] == pytest.approx(np.percentile(record["latencies_ms"], 95), rel=1e-3)
    for name in ("balanced_accuracy_min", "melanoma_sensitivity_min", "calibration_error_max"):
        lo, hi = by[name]["ci"]
        assert by[name]["status"] == "pass" and lo <= by[name]["value"] <= hi, by[name]
    # the bootstrap draws are the evaluate report's: the same intervals for the metrics both compute
    metrics = json.loads((out / "metrics.json").read_text())
    assert by["balanced_accuracy_min"]["value"] == pytest.approx(metrics["metrics"]["balanced_accuracy"])
    assert by["balanced_accuracy_min"]["ci"] == pytest.approx(metrics["ci"]["balanced_accuracy"])
    assert by["calibration_error_max"]["ci"] == pytest.approx(metrics["ci"]["ece"])
    # what was released: the bundle's verified content hash; the operating point: the bundle's own (chosen on its
    # out-of-fold posteriors), as the service would apply it
    assert record["model"]["bundles"][0]["hash"] == (bundle_copy / "HASH").read_text().strip()
    op = record["operating_point"]
    assert op["source"] == "bundle"
    assert op["urgent_class_probability"] == read_bundle(bundle_copy).decisions["triage"]["urgent_class_probability"]
    assert record["operating_point"]["melanoma_lesions"] == 8
    page = (out / "report.html").read_text()
    assert "Release gate: PASSED" in page and "Headline metrics" in page


def test_strict_criteria_fail_with_exit_1_naming_the_criterion(tmp_path, bundle_copy, ham_manifest):
    out = tmp_path / "strict"
    text = gate(bundle_copy, "--manifest", ham_manifest, "--criteria", write(tmp_path / "gate.yaml", STRICT),
                "--out", out, code=1)
    assert "RELEASE GATE FAILED" in text and "FAIL" in text
    failed_line = text.split("RELEASE GATE FAILED", 1)[1]
    assert "Balanced accuracy" in failed_line and "Calibration error (ECE)" in failed_line
    record = json.loads((out / "gate.json").read_text())
    assert record["passed"] is False
    assert set(record["failed"]) == {"balanced_accuracy_min", "calibration_error_max"}
    assert "Release gate: FAILED" in (out / "report.html").read_text()
    assert "--local" not in text  # the operating point held: no advice about choosing it again
    # a failed operating point (here: specificity) points to choosing it on a labelled local sample
    text = gate(bundle_copy, "--manifest", ham_manifest, "--criteria",
                write(tmp_path / "op.yaml", {**LENIENT, "specificity_min": 0.999}), "--out", tmp_path / "op", code=1)
    assert "did not hold on these lesions" in text and "operating-point RUN --manifest LOCAL --local" in text
    assert "override" not in text
    # under a service config's triage override, choosing the bundle's cut-offs again would not be enough
    service = tmp_path / "service.yaml"
    service.write_text("triage: {routine_risk: 5, urgent_risk: 50}\n")
    text = gate(bundle_copy, "--manifest", ham_manifest, "--criteria", tmp_path / "op.yaml", "--service-config",
                service, "--out", tmp_path / "op2", code=1)
    assert "did not hold on these lesions" in text and "remove the service config's triage override" in text


def test_a_misspelt_criterion_is_a_one_line_error(tmp_path, bundle_copy, ham_manifest):
    bad = write(tmp_path / "gate.yaml", {"balanced_acuracy_min": 0.7})
    res = CliRunner().invoke(app, ["gate", str(bundle_copy), "--manifest", str(ham_manifest), "--criteria", str(bad)])
    assert res.exit_code == 2, res.output
    assert "unknown key balanced_acuracy_min — did you mean 'balanced_accuracy_min'?" in squash(res.output)
    assert "Traceback" not in res.output
    with pytest.raises(GateCriteriaError, match="no criterion set"):
        load_criteria(write(tmp_path / "empty.yaml", {"bootstrap": 200}))
    with pytest.raises(GateCriteriaError, match="melanoma_sensitivity_min"):
        load_criteria(write(tmp_path / "range.yaml", {"melanoma_sensitivity_min": 90}))


def test_an_unreadable_held_out_image_is_an_error_not_an_absent_image(tmp_path, bundle_copy, ham_manifest):
    """A held-out lesion whose file cannot be read is refused by name (as `predict` refuses it), never judged with
    its image blanked."""
    df = pd.read_parquet(ham_manifest)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    df.loc[df.index[5], "image_dermoscopic"] = str(broken)
    df.to_parquet(tmp_path / "m.parquet", index=False)
    text = gate(bundle_copy, "--manifest", tmp_path / "m.parquet", "--criteria", write(tmp_path / "g.yaml", LENIENT),
                "--out", tmp_path / "gate", code=2)
    assert "broken.jpg" in text and "not an image" in text


def test_the_documented_example_criteria_load():
    from pathlib import Path

    example = load_criteria(Path(__file__).resolve().parents[2] / "docs" / "gate_example.yaml")
    assert example.balanced_accuracy_min == 0.70 and example.bootstrap == 1000 and example.confidence == 0.95


# --------------------------------------------------------------------------------------- without a model
def _synthetic(n_per_class: int, correct: int, seed: int = 0):
    """Manifest + predictions for ISIC 2018: ``correct`` of every ``n_per_class`` lesions per class right."""
    rng = np.random.default_rng(seed)
    C = ISIC2018.num_classes
    truth = np.repeat(np.arange(C), n_per_class)
    pred = truth.copy()
    for c in range(C):
        wrong = np.flatnonzero(truth == c)[correct:]
        pred[wrong] = (c + 1) % C
    probs = np.full((len(truth), C), 0.02) + rng.uniform(0, 0.01, (len(truth), C))
    probs[np.arange(len(truth)), pred] = 0.8
    probs /= probs.sum(1, keepdims=True)
    ids = [f"L{i:04d}" for i in range(len(truth))]
    manifest = pd.DataFrame({"lesion_id": ids, **{f"label_{c}": (truth == j).astype(float)
                                                   for j, c in enumerate(ISIC2018.classes)}})
    predictions = pd.DataFrame(probs, columns=list(ISIC2018.classes))
    predictions.insert(0, "lesion_id", ids)
    return manifest, predictions, truth


def _refer_argmax_malignant(probs):
    return np.isin(probs.argmax(1), ISIC2018.malignant_indices)


def test_a_minimum_is_judged_on_the_interval_lower_bound(tmp_path):
    # 4 of 5 right per class: balanced accuracy 0.80 ≥ 0.70, but on 35 lesions the interval reaches well below
    small_manifest, small_pred, _ = _synthetic(5, 4)
    crit = GateCriteria(balanced_accuracy_min=0.70, bootstrap=300)
    rec = run_gate(small_pred, small_manifest, ISIC2018, crit, tmp_path / "small", refer=_refer_argmax_malignant)
    row = rec["criteria"][0]
    assert row["value"] == pytest.approx(0.8) and row["ci"][0] < 0.70 and row["status"] == "fail"
    assert rec["passed"] is False and row["bound"] == row["ci"][0]
    # the same 80 % on 700 lesions: the interval clears 0.70
    big_manifest, big_pred, _ = _synthetic(100, 80)
    rec = run_gate(big_pred, big_manifest, ISIC2018, crit, tmp_path / "big", refer=_refer_argmax_malignant)
    assert rec["criteria"][0]["ci"][0] > 0.70 and rec["passed"] is True


def test_skin_tone_spread_uses_the_upper_bound_and_the_referral(tmp_path):
    manifest, predictions, truth = _synthetic(40, 40)
    malignant = np.isin(truth, ISIC2018.malignant_indices)
    manifest["skin_tone"] = np.where(np.arange(len(truth)) % 2 == 0, 1, 5)
    # tone 1: every malignant lesion referred; tone 5: every other one missed → spread 50 points
    missed = malignant & (manifest["skin_tone"].to_numpy() == 5) & (np.arange(len(truth)) % 4 == 1)
    refer = lambda probs: malignant & ~missed  # noqa: E731 — rows are in manifest order here
    crit = GateCriteria(skin_tone_sensitivity_spread_max=10, bootstrap=200)
    rec = run_gate(predictions, manifest, ISIC2018, crit, tmp_path / "tone", refer=refer)
    row = rec["criteria"][0]
    assert row["value"] == pytest.approx(50.0) and row["ci"][1] >= 50 and row["status"] == "fail"
    assert "tone 1 (60)" in row["note"] and "tone 5 (60)" in row["note"]
    # too few malignant lesions per group → skipped with a note, not failed
    rec = run_gate(predictions, manifest, ISIC2018, GateCriteria(skin_tone_sensitivity_spread_max=10, bootstrap=50,
                                                                 skin_tone_min_malignant=100),
                   tmp_path / "few", refer=refer)
    assert rec["criteria"][0]["status"] == "skipped" and rec["passed"] is True


def test_melanoma_detection_is_the_triage_referral_not_the_argmax(tmp_path):
    from dermfusion.clinical.settings import TriageConfig
    from dermfusion.evaluation.decision_rules import triage_levels

    def referral_rule(task, triage):  # what `dermfusion gate` passes: the engine's operating point
        return lambda p: triage_levels(task, p, triage.cut_offs()) >= 1

    manifest, predictions, truth = _synthetic(20, 20)
    mel, nv = ISIC2018.index("MEL"), ISIC2018.index("NV")
    probs = predictions[list(ISIC2018.classes)].to_numpy(copy=True)
    # every melanoma: P(MEL) 0.32 (≥ the urgent cut 0.30), argmax NV 0.40 → argmax recall 0, referred all
    probs[truth == mel] = 0.28 / 5
    probs[truth == mel, mel], probs[truth == mel, nv] = 0.32, 0.40
    predictions[list(ISIC2018.classes)] = probs
    refer = referral_rule(ISIC2018, TriageConfig())  # the built-in cut-offs: urgent at P(MEL) ≥ 0.30
    crit = GateCriteria(melanoma_sensitivity_min=0.9, bootstrap=100)
    rec = run_gate(predictions, manifest, ISIC2018, crit, tmp_path / "mel", refer=refer)
    assert rec["criteria"][0]["value"] == 1.0 and rec["passed"] is True
    metrics = json.loads((tmp_path / "mel" / "metrics.json").read_text())
    assert metrics["metrics"]["melanoma_sensitivity"] == 0.0  # the report's argmax figure, for contrast
    # a stricter service config (MEL cut 0.5, urgent risk above this lesion's) refers none of them
    strict = TriageConfig(urgent_class_probability={"MEL": 0.5}, urgent_risk=60, routine_risk=60)
    rec = run_gate(predictions, manifest, ISIC2018, crit, tmp_path / "mel2", refer=referral_rule(ISIC2018, strict))
    assert rec["criteria"][0]["value"] == 0.0 and rec["passed"] is False
