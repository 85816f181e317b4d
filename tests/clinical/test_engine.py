"""The clinical engine: one path from lesion to decision for `predict`, the API, `gate` and `explain`.

The same bundle and lesion give the same posteriors through `dermfusion predict --clinical` and `POST /v1/analyze`;
the run's decisions (operating point, conformal calibration) live in the bundle, covered by its hash, and are what
the service answers with; a deployment prior re-weights the shown posteriors only; `gate` and `explain` do not load
the web service's package."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermfusion.bundle import read_bundle, resolve_run, verify_bundle
from dermfusion.cli import app
from dermfusion.clinical import Engine, lesion_from_row
from dermfusion.clinical.settings import ClinicalSettings, load_clinical_settings
from dermfusion.evaluation.calibration import Calibration
from dermfusion.inference import load_run
from dermfusion.tasks import ISIC2018

CLASSES = list(ISIC2018.classes)


def test_a_run_keeps_posteriors_and_decisions_apart(network_run):
    """calibration.json: posteriors (temperature, bias, the prior they assume); decisions.json: the operating point
    and the conformal calibration — fitted on the out-of-fold predictions, hashed with the bundle."""
    b = read_bundle(resolve_run(network_run)[0])
    cal = Calibration.from_dict(b.calibration)
    assert cal.prior is not None and len(cal.bias) == len(CLASSES) and abs(sum(cal.prior) - 1) < 1e-6
    assert {"triage", "differential"} <= set(b.decisions)
    assert b.decisions["differential"]["level"] == 0.95
    assert "decisions.json" in (b.path / "SHA256SUMS").read_text()
    verify_bundle(b.path)
    raw = pd.read_csv(network_run / "oof.csv")
    post = pd.read_csv(network_run / "oof_calibrated.csv")
    bal = pd.read_csv(network_run / "oof_balanced.csv")
    np.testing.assert_allclose(post[CLASSES].to_numpy(), cal.posterior(raw[CLASSES].to_numpy()), atol=2e-6)
    np.testing.assert_allclose(bal[CLASSES].to_numpy(), cal.balanced(raw[CLASSES].to_numpy()), atol=2e-6)
    np.testing.assert_allclose(post[CLASSES].sum(axis=1), 1.0, atol=1e-5)


def test_predict_and_the_api_answer_the_same_numbers(tmp_path, network_run, ham_sample, ham_manifest, fixture_dir):
    """The same lesion through `dermfusion predict --clinical` and `POST /v1/analyze` (both on exact fp32): equal
    posteriors, action and prediction set."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    clinical = tmp_path / "clinical.csv"
    res = CliRunner().invoke(app, ["predict", str(network_run), "--manifest", str(ham_manifest), "--out",
                                   str(tmp_path / "official.csv"), "--clinical", str(clinical), "--backend", "fp32"])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(clinical)
    cfg = load_service_config(None, env={}, backend="fp32", audit={"db_url": f"sqlite:///{tmp_path}/a.db"})
    with TestClient(create_app(network_run, cfg)) as c:
        for i in range(3):
            row = ham_sample.iloc[i]
            meta = {k: row[k] for k in ("age", "sex", "site") if isinstance(row[k], str) and row[k] or
                    isinstance(row[k], float) and np.isfinite(row[k])}  # the model reads them: send what predict read
            with open(row["image_dermoscopic"], "rb") as fh:
                r = c.post("/v1/analyze?explain=false", files={"dermoscopic": ("d.jpg", fh.read(), "image/jpeg")},
                           data={"metadata": json.dumps(meta)})
            assert r.status_code == 200, r.text
            body = r.json()
            api = {d["code"]: d["probability"] for d in body["differential"]}
            line = got[got["image"] == row["lesion_id"]].iloc[0]
            np.testing.assert_allclose([api[k] for k in CLASSES], line[CLASSES].to_numpy(float), atol=1e-6)
            assert body["action"] == line["action"]
            assert "|".join(body["prediction_set"]["classes"]) == line["differential"]
            assert body["prior"]["name"] == "training" and body["operating_point"]["source"] == "bundle"


def test_the_engine_applies_the_bundle_operating_point_and_an_override(network_run, ham_sample):
    pred = load_run(network_run, backend="fp32")
    engine = Engine(pred)
    op = read_bundle(resolve_run(network_run)[0]).decisions["triage"]
    assert engine.rules.operating_point_source == "bundle"
    assert engine.rules.operating_point["routine_risk"] == op["routine_risk"]
    lesions = [lesion_from_row(r, ("dermoscopic",)) for r in ham_sample.head(8).to_dict("records")]
    a = engine.assess(lesions, quality_gate=False)
    # an override that refers everyone (risk ≥ 0): every action a referral, the cut-offs stated as the config's
    everyone = Engine(pred, ClinicalSettings.model_validate({"triage": {"routine_risk": 0.0}}))
    b = everyone.assess(lesions, quality_gate=False)
    assert everyone.rules.operating_point_source == "service config (override)"
    assert all(x.action in ("routine_referral", "urgent_referral") for x in b)
    np.testing.assert_allclose([x.posterior for x in a], [x.posterior for x in b])


def test_a_deployment_prior_reweights_what_is_shown_not_what_is_decided(network_run, ham_sample):
    pred = load_run(network_run, backend="fp32")
    nv_heavy = {c: (0.9 if c == "NV" else 0.1 / 6) for c in CLASSES}
    base = Engine(pred).assess([lesion_from_row(ham_sample.iloc[0].to_dict(), ("dermoscopic",))], quality_gate=False)[0]
    eng = Engine(pred, ClinicalSettings.model_validate({"prior": {"deployment": nv_heavy}}))
    a = eng.assess([lesion_from_row(ham_sample.iloc[0].to_dict(), ("dermoscopic",))], quality_gate=False)[0]
    np.testing.assert_allclose(a.posterior, base.posterior)          # decisions: the training-prior posterior
    assert a.action == base.action and a.prediction_set == base.prediction_set
    train = np.asarray(eng.rules.training_prior)
    expect = base.posterior * np.array([nv_heavy[c] for c in CLASSES]) / train
    np.testing.assert_allclose(a.shown, expect / expect.sum(), atol=1e-9)   # Bayes' rule, shown
    assert a.shown[CLASSES.index("NV")] > base.shown[CLASSES.index("NV")]
    assert eng.rules.prior_info()["name"] == "deployment"
    with pytest.raises(ValueError, match="does not predict"):
        Engine(pred, ClinicalSettings.model_validate({"prior": {"deployment": {"XYZ": 1.0}}}))


def test_expected_rates_under_a_deployment_prior_start_from_the_kept_lesions_own_mix(tmp_path, network_run):
    """The rates a clinic should see are read off the lesions the operating point was chosen on, re-weighted to the
    clinic's case mix. Those lesions need not have the training prior's mix (a local sample chosen with
    `operating-point --local` has its own): the weights start from their own mix, so the expected referral rate is
    the per-class referral rates averaged with the deployment prior's weights."""
    import shutil

    from dermfusion.bundle import update_files
    from dermfusion.evaluation.decision_rules import EVIDENCE_FILE, read_evidence, triage_levels, write_evidence

    run = shutil.copytree(network_run, tmp_path / "run")
    b = resolve_run(run)[0]
    post, y = read_evidence(b / EVIDENCE_FILE)
    # a sample unlike the training mix: its melanomas three times over
    idx = np.r_[np.arange(len(y)), np.repeat(np.flatnonzero(y == CLASSES.index("MEL")), 2)]
    assert (y == CLASSES.index("MEL")).any()
    update_files(b, {EVIDENCE_FILE: lambda f: write_evidence(f, post[idx], y[idx], np.zeros(len(idx)))})
    deploy = {c: (0.4 if c == "MEL" else 0.1) for c in CLASSES}
    eng = Engine(load_run(run, backend="fp32"), ClinicalSettings.model_validate({"prior": {"deployment": deploy}}))
    got = eng.rules.expected_rates([b])
    post16, ys = read_evidence(b / EVIDENCE_FILE)
    referred = triage_levels(ISIC2018, post16, eng.rules.operating_point) >= 1
    present = sorted(set(ys.tolist()))
    d = np.array([list(deploy.values())[c] for c in present])
    per_class = np.array([referred[ys == c].mean() for c in present])
    assert got["referral_rate"] == pytest.approx(float((d * per_class).sum() / d.sum()), abs=1e-9)


def test_operating_point_verb_writes_into_every_bundle_and_reseals(tmp_path, network_run, ham_manifest):
    import shutil

    run = shutil.copytree(network_run, tmp_path / "run")
    res = CliRunner().invoke(app, ["operating-point", str(run), "--manifest", str(ham_manifest),
                                   "--melanoma-sensitivity", "1.0", "--max-urgent-rate", "0.2", "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    assert (run / "operating_point.png").stat().st_size > 5_000
    for b in resolve_run(run):
        verify_bundle(b)  # re-sealed: the new decisions are covered by the hash
        op = read_bundle(b).decisions["triage"]
        assert op["targets"]["melanoma_sensitivity"] == 1.0
        assert op["out_of_fold"]["in_sample"]["melanoma_sensitivity"] == 1.0  # every OOF melanoma referred
    written = json.loads((run / "operating_point.json").read_text())
    assert written["routine_class_probability"] == op["routine_class_probability"]
    # an older run whose calibration gives no posteriors is refused with what to do
    b0 = resolve_run(run)[0]
    from dermfusion.bundle import update_calibration
    for b in resolve_run(run):
        update_calibration(b, {"temperature": 1.0})
    res = CliRunner().invoke(app, ["operating-point", str(run), "--manifest", str(ham_manifest)])
    assert res.exit_code == 2 and "dermfusion calibrate" in " ".join(res.output.split()), res.output
    assert b0.exists()


def test_clinical_settings_come_from_service_yaml_without_the_service(tmp_path):
    f = tmp_path / "service.yaml"
    f.write_text("triage: {routine_risk: 20}\nprior: {deployment: {NV: 0.7, MEL: 0.3}}\nworkers: {workers: 4}\n")
    s = load_clinical_settings(f)
    assert s.triage.routine_risk == 20 and s.prior.deployment == {"NV": 0.7, "MEL": 0.3}
    f.write_text("triage: {routine_rsk: 20}\n")
    with pytest.raises(Exception, match="routine_rsk"):
        load_clinical_settings(f)


def test_gate_and_explain_do_not_import_the_service_package(tmp_path, network_run, ham_manifest):
    """What `gate` certifies and what `explain` shows come from the engine, not from the web app's package."""
    crit = tmp_path / "gate.yaml"
    crit.write_text("balanced_accuracy_min: 0.0\nbootstrap: 50\n")
    code = f"""
import sys
from typer.testing import CliRunner
from dermfusion.cli import app
r = CliRunner().invoke(app, ["gate", {str(network_run)!r}, "--manifest", {str(ham_manifest)!r}, "--criteria",
                             {str(crit)!r}, "--out", {str(tmp_path / 'gate')!r}, "--backend", "fp32"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(app, ["explain", {str(network_run)!r}, "--manifest", {str(ham_manifest)!r}, "--ids",
                             "HAM_0006588", "--out", {str(tmp_path / 'explain')!r}])
assert r.exit_code == 0, r.output
loaded = sorted(m for m in sys.modules if m.startswith("dermfusion.service"))
assert not loaded, loaded
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "explain" / "HAM_0006588.json").read_text())
    assert out["prediction_set"]["level"] == 0.95 and out["operating_point"]["source"] == "bundle"
    record = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert record["operating_point"]["source"] == "bundle"


def test_an_operating_point_override_states_its_out_of_fold_consequences(tmp_path, network_run, caplog):
    """service.yaml cut-offs override the bundle's operating point; the service says at start what they do on the
    bundle's out-of-fold lesions (kept in the bundle: oof_posteriors.npz), and /v1/model shows it."""
    import logging

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    assert (resolve_run(network_run)[0] / "oof_posteriors.npz").is_file()
    cfg = load_service_config(None, env={}, backend="fp32", triage={"routine_risk": 0.0},
                              audit={"db_url": f"sqlite:///{tmp_path}/a.db"})
    with caplog.at_level(logging.INFO), TestClient(create_app(network_run, cfg, warmup=False)) as c:
        info = c.get("/v1/model").json()
    th = info["thresholds"]
    assert th["source"] == "service config (override)" and th["routine_risk"] == 0.0
    assert th["override_out_of_fold"]["referral_rate"] == 1.0   # risk ≥ 0 refers every out-of-fold lesion
    assert any("override the bundle's operating point" in r.getMessage() and "benign referred 100.0%" in r.getMessage()
               for r in caplog.records)


def test_the_service_exports_the_referral_rate_its_operating_point_expects(tmp_path, network_run):
    """dermfusion_expected_rate{rate}: the operating point in force on the bundle's out-of-fold lesions — what an alert
    (DermfusionReferralRateAboveOperatingPoint) compares the live referral share with; re-weighted to a deployment
    prior when one is set."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.evaluation.decision_rules import read_evidence, triage_levels, triage_rates
    from dermfusion.evaluation.posterior import prior_weights
    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    def exported(**settings):
        cfg = load_service_config(None, env={}, backend="fp32", audit={"db_url": f"sqlite:///{tmp_path}/a.db"},
                                  **settings)
        with TestClient(create_app(network_run, cfg, warmup=False)) as c:
            text = c.get("/metrics").text
        return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("dermfusion_expected_rate{")}

    post, y = read_evidence(resolve_run(network_run)[0] / "oof_posteriors.npz")
    op = json.loads((resolve_run(network_run)[0] / "decisions.json").read_text())["triage"]
    want = triage_rates(ISIC2018, y, triage_levels(ISIC2018, post, op))
    got = exported()
    assert got["referral"] == pytest.approx(want["referral_rate"]) and got["urgent"] == pytest.approx(want["urgent_rate"])
    assert exported(triage={"routine_risk": 0.0})["referral"] == 1.0        # an override refers every lesion there
    deploy = {c: (0.4 if c == "MEL" else 0.1) for c in CLASSES}             # a melanoma-heavy clinic
    train = Calibration.from_dict(json.loads((resolve_run(network_run)[0] / "calibration.json").read_text())).prior
    w = prior_weights(y, train, [deploy[c] for c in CLASSES])
    weighted = triage_rates(ISIC2018, y, triage_levels(ISIC2018, post, op), w)["referral_rate"]
    assert exported(prior={"deployment": deploy})["referral"] == pytest.approx(weighted)
    assert weighted != pytest.approx(want["referral_rate"])


def test_a_tabular_run_honours_the_calibration_settings(tmp_path, ham_sample):
    """A tabular run's config keys for the posterior and the balanced rule are honoured (they were once read and
    ignored): the same run calibration as a network run, into its fold bundles and its refit."""
    from dermfusion.config import load_config
    from dermfusion.training.cv import train_cv

    out = tmp_path / "tab"
    cfg = load_config("milk10k_logreg", ["task=isic2018", "name=ham_logreg", "calibration.eval_size=null",
                                         "calibration.prior_adjustment=training_prior",
                                         "calibration.prior_strength=0.5"])
    train_cv(cfg, ham_sample, out)
    for b in [out / "bundle", *sorted((out / "folds").iterdir())]:
        cal = Calibration.from_dict(read_bundle(b).calibration)
        assert cal.prior is not None and cal.prior_strength == 0.5
        assert "differential" in read_bundle(b).decisions
    assert (out / "oof_balanced.csv").is_file()


def test_the_audit_row_records_what_decided(tmp_path, network_run, ham_sample):
    pytest.importorskip("fastapi")
    import sqlalchemy
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    db = tmp_path / "a.db"
    cfg = load_service_config(None, env={}, backend="fp32", audit={"db_url": f"sqlite:///{db}"})
    with TestClient(create_app(network_run, cfg, warmup=False)) as c:
        with open(ham_sample.iloc[0]["image_dermoscopic"], "rb") as fh:
            r = c.post("/v1/analyze?explain=false", files={"dermoscopic": ("d.jpg", fh.read(), "image/jpeg")})
        assert r.status_code == 200, r.text
    with sqlalchemy.create_engine(f"sqlite:///{db}").connect() as conn:
        row = conn.execute(sqlalchemy.text("select decisions from dermfusion_audit")).fetchone()
    dec = json.loads(row[0])
    assert dec["prior"] == "training" and dec["operating_point"]["source"] == "bundle"
    assert dec["prediction_set"] == r.json()["prediction_set"]["classes"] and dec["level"] == 0.95
