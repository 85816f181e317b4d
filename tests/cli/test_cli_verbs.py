"""Every `dermfusion` verb through the CLI (typer's CliRunner) on the bundled HAM10000 sample, checking the files it
writes. `serve` is covered by tests/service (the real command in a subprocess).

One module-scoped run trained by `dermfusion train` feeds the verbs that need a trained model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli_helpers import squash

from dermfusion.cli import app
from dermfusion.tasks import ISIC2018, MILK10K

CLASSES = list(ISIC2018.classes)


def run(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"dermfusion {' '.join(map(str, args))} → {res.exit_code}\n{res.output}"
    return squash(res.output)  # prose compared whatever the console's width wrapped


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_verbs")


@pytest.fixture(scope="module")
def manifest(work, fixture_dir) -> str:
    """`import isic` + `folds` on the bundled sample: the manifest every other verb reads."""
    out = work / "ham.parquet"
    run("import", "isic", fixture_dir / "train.csv", "--images", fixture_dir / "images", "--task", "isic2018",
        "--dataset", "ham10000_sample", "--out", out)
    run("folds", out, "--k", "2", "--seed", "0")
    return str(out)


@pytest.fixture(scope="module")
def trained(work, manifest) -> str:
    out = work / "run"
    text = run("train", "tiny_cpu", "--manifest", manifest, "--out", out, "--set", "train.epochs=1",
               "--set", "train.device=cpu")
    assert "out-of-fold" in text
    return str(out)


# ------------------------------------------------------------------------------------------------ data
def test_import_isic_and_folds(manifest):
    from dermfusion.data.manifest import load_manifest

    df = load_manifest(manifest)
    assert len(df) == 48 and sorted(df["fold"].unique()) == [0, 1]
    assert all(f"label_{c}" in df.columns for c in CLASSES)


def test_import_milk10k(tmp_path):
    monet = ["MONET_ulceration_crust", "MONET_hair", "MONET_vasculature_vessels", "MONET_erythema",
             "MONET_pigmented", "MONET_gel_water_drop_fluid_dermoscopy_liquid", "MONET_skin_markings_pen_ink_purple_pen"]
    rows = []
    for lesion, (age, sex) in {"IL_1": ("55", "female"), "IL_2": ("70", "male")}.items():
        for kind, iid in (("clinical: close-up", f"ISIC_{lesion}c"), ("dermoscopic", f"ISIC_{lesion}d")):
            rows.append({"lesion_id": lesion, "image_type": kind, "isic_id": iid, "age_approx": age, "sex": sex,
                         "skin_tone_class": "2", "site": "trunk", **{m: 0.3 for m in monet}})
    pd.DataFrame(rows).to_csv(tmp_path / "meta.csv", index=False)
    gt = pd.DataFrame(0.0, index=["IL_1", "IL_2"], columns=list(MILK10K.classes))
    gt.loc["IL_1", "MEL"], gt.loc["IL_2", "NV"] = 1.0, 1.0
    gt.rename_axis("lesion_id").reset_index().to_csv(tmp_path / "gt.csv", index=False)
    out = tmp_path / "milk.parquet"
    run("import", "milk10k", "--metadata", tmp_path / "meta.csv", "--groundtruth", tmp_path / "gt.csv", "--out", out)
    df = pd.read_parquet(out)
    assert len([c for c in df.columns if c.startswith("concept_")]) == 14 and df["label_MEL"].tolist() == [1.0, 0.0]


def test_import_derm7pt(tmp_path):
    pd.DataFrame({"case_num": [1, 2], "image": ["a.jpg", "b.jpg"], "split": ["train", "test"],
                  "diagnosis": ["clark nevus", ""], "pigment_network": ["typical", "absent"],
                  "location": ["back", "acral"], "sex": ["female", "male"]}).to_csv(tmp_path / "meta.csv", index=False)
    out = tmp_path / "derm7pt.csv"
    run("import", "derm7pt", tmp_path / "meta.csv", "--out", out)
    df = pd.read_csv(out)
    assert list(df["split"]) == ["train", "test"] and df.loc[0, "label_NEV"] == 1


def test_data_check(manifest):
    assert "no errors" in run("data", "check", manifest, "--no-decode")


# ------------------------------------------------------------------------------------------------ train / predict
def test_train_writes_a_run(trained):
    from pathlib import Path

    run_dir = Path(trained)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bundles"] == ["fold_0/bundle", "fold_1/bundle"]
    for f in ("oof.csv", "oof_calibrated.csv", "config.yaml"):
        assert (run_dir / f).exists(), f
    for b in summary["bundles"]:
        for f in ("model.safetensors", "config.yaml", "calibration.json", "HASH", "model_card.json", "drift_reference.json"):
            assert (run_dir / b / f).exists(), (b, f)


def test_predict_from_a_run(work, trained, manifest):
    out = work / "predictions.csv"
    run("predict", trained, "--manifest", manifest, "--out", out, "--backend", "fp32", "--tta", "2")
    df = pd.read_csv(out)
    assert list(df.columns) == ["image", *CLASSES] and len(df) == 48  # the ISIC 2018 submission header
    np.testing.assert_allclose(df[CLASSES].sum(axis=1), 1, atol=1e-4)


def test_evaluate(work, trained, manifest):
    out = work / "report"
    run("evaluate", "--predictions", f"{trained}/oof_calibrated.csv", "--manifest", manifest, "--out", out,
        "--bootstrap", "20")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 48 and "balanced_accuracy" in metrics["metrics"]
    assert "<html" in (out / "report.html").read_text()


def test_calibrate(trained, manifest):
    from pathlib import Path

    cal = Path(trained) / "fold_0" / "bundle" / "calibration.json"
    cal.write_text("{}")
    run("calibrate", trained, "--manifest", manifest)
    assert json.loads(cal.read_text())["temperature"] > 0, "the refit is written into every bundle of the run"
    assert json.loads((Path(trained) / "summary.json").read_text())["calibration"]["fitted"]


def test_a_full_data_refit_is_calibrated_on_a_cross_validated_run(work, trained, manifest):
    """A full-data refit has no out-of-fold predictions: `calibrate --evidence` fits its posteriors, operating point
    and conformal set on a cross-validated run of the same recipe, so its predictions carry actions and sets."""
    from pathlib import Path

    refit = work / "refit"
    text = run("train", "tiny_cpu", "--manifest", manifest, "--out", refit, "--folds", "full",
               "--set", "train.epochs=1", "--set", "train.device=cpu")
    assert "--evidence" in text  # the end of a refit says how to give it decisions
    bundle = refit / "full" / "bundle"
    assert not (bundle / "decisions.json").exists()
    assert "--evidence RUN_CV" in run("calibrate", refit, "--manifest", manifest, code=2)
    assert "not a full-data refit" in run("calibrate", refit, "--manifest", manifest, "--evidence", refit, code=2)
    run("calibrate", refit, "--manifest", manifest, "--evidence", trained)
    decisions = json.loads((bundle / "decisions.json").read_text())
    assert decisions["fitted_on"].startswith(f"48 out-of-fold posteriors of {trained}")
    assert decisions["triage"]["chosen_on"] == decisions["fitted_on"] and decisions["differential"]["level"] == 0.95
    fold_cal = json.loads((Path(trained) / "fold_0" / "bundle" / "calibration.json").read_text())
    refit_cal = json.loads((bundle / "calibration.json").read_text())
    # the evidence's folds together trained on the refit's class mix: the same calibration (a different mix shifts
    # the bias by Bayes' rule: tests/evaluation/test_calibration.py); fitted again from oof.csv's six decimals
    assert refit_cal.keys() == fold_cal.keys() and refit_cal["prior"] == fold_cal["prior"]
    np.testing.assert_allclose(refit_cal["bias"], fold_cal["bias"], atol=1e-5)
    np.testing.assert_allclose(refit_cal["temperature"], fold_cal["temperature"], rtol=1e-5)
    card = json.loads((bundle / "model_card.json").read_text())["calibration"]   # the card follows the refit
    assert card["calibrated"] and card["temperature"] == pytest.approx(refit_cal["temperature"])
    clinical = work / "refit_clinical.csv"
    run("predict", refit, "--manifest", manifest, "--out", work / "refit_predictions.csv", "--backend", "fp32",
        "--clinical", clinical)
    rows = pd.read_csv(clinical)
    assert rows["differential"].notna().any() and set(rows["action"]) <= {"monitor", "routine_referral",
                                                                           "urgent_referral", "cannot_assess"}
    # a new operating point for the refit is chosen on the evidence its bundle keeps
    text = run("operating-point", refit, "--manifest", manifest, "--melanoma-sensitivity", "0.5", "--dry-run",
               "--n-boot", "20")
    assert f"48 out-of-fold posteriors of {trained}" in text
    # or on a labelled local sample, predicted now by the refit — never on lesions it trained on (in-sample
    # posteriors: too sure, cut-offs too lax); the run keeps their ids
    assert set((refit / "training_lesions.txt").read_text().split()) == set(pd.read_parquet(manifest)["lesion_id"])
    text = run("operating-point", refit, "--manifest", manifest, "--local", code=2)
    assert "48 of the 48 lesions" in text and "trained this run's models" in text
    # the fixture has no lesion the refit did not see: the same images under other ids stand in for a clinic's
    local = work / "local_sample.parquet"
    pd.read_parquet(manifest).assign(lesion_id=lambda d: "LOCAL_" + d["lesion_id"]).to_parquet(local)
    text = run("operating-point", refit, "--manifest", local, "--local", "--melanoma-sensitivity", "0.5",
               "--n-boot", "20")
    assert "on the local sample" in text and "operating point in force, on the same local lesions" in text
    chosen = json.loads((bundle / "decisions.json").read_text())["triage"]["chosen_on"]
    from dermfusion.evaluation.decision_rules import EVIDENCE_FILE, read_evidence

    n = len(read_evidence(bundle / EVIDENCE_FILE)[1])
    assert chosen == f"{n} lesions of the local sample {local}" and 0 < n <= 48
    # a sample without a melanoma cannot carry a melanoma target (the cut would vanish, not fail)
    no_mel = work / "local_no_melanoma.parquet"
    pd.read_parquet(local).query("label_MEL != 1").to_parquet(no_mel)
    text = run("operating-point", refit, "--manifest", no_mel, "--local", "--dry-run", code=2)
    assert "no melanomas among the" in text and "95% sensitivity target cannot be chosen" in text
    # and the answer says so (the clinician page words it: "on this clinic's labelled local sample")
    from dermfusion.clinical import Engine
    from dermfusion.inference import load_run

    assert Engine(load_run(refit)).rules.describe()["operating_point"]["evidence"] == "local_sample"
    assert Engine(load_run(trained)).rules.describe()["operating_point"]["evidence"] == "out_of_fold"


def test_stack_and_ensemble(work, trained, tabular_run, manifest):
    stack = work / "stack"
    run("stack", trained, tabular_run, "--manifest", manifest, "--out", stack)
    assert (stack / "meta.json").exists() and (stack / "members.json").exists() and (stack / "oof.csv").exists()
    ens = work / "ensemble"
    run("ensemble", trained, tabular_run, "--manifest", manifest, "--out", ens)
    members = json.loads((ens / "members.json").read_text())
    assert len(members) == 2 and abs(sum(m["weight"] for m in members) - 1) < 1e-6
    out, clinical = work / "ensemble_predictions.csv", work / "ensemble_clinical.csv"
    run("predict", ens, "--manifest", manifest, "--out", out, "--backend", "fp32", "--clinical", clinical)
    assert len(pd.read_csv(out)) == 48
    # a combined bundle carries decision rules fitted on its own out-of-fold posteriors, like a run's bundles
    for bundle in (stack, ens):
        decisions = json.loads((bundle / "decisions.json").read_text())
        assert decisions["triage"]["out_of_fold"] and decisions["differential"]["level"] == 0.95, bundle
        assert decisions["fitted_on"] == "48 out-of-fold posteriors"
        # and the lesions its members trained on (their records' union): what `operating-point --local` refuses
        assert set((bundle / "training_lesions.txt").read_text().split()) == set(pd.read_parquet(manifest)["lesion_id"])
    rows = pd.read_csv(clinical)
    assert set(rows["action"]) <= {"monitor", "routine_referral", "urgent_referral", "cannot_assess"}
    sets = [set(str(d).split("|")) for d in rows["differential"].dropna()]
    assert sets and all(s <= set(ISIC2018.classes) for s in sets)  # the conformal sets, as class codes
    # RUN/bundle (the average bundle stack wrote) follows a later refit of the run's calibration
    from pathlib import Path

    average, fold = Path(trained) / "bundle" / "calibration.json", Path(trained) / "fold_0" / "bundle" / "calibration.json"
    average.write_text(json.dumps({"temperature": 9.0}))
    run("calibrate", trained, "--manifest", manifest)
    assert json.loads(average.read_text()) == json.loads(fold.read_text())


def _close(a, b, path="calibration"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, float, int)) and not isinstance(a, bool):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4, atol=1e-6, err_msg=path)
    else:
        assert a == b, path


def test_an_ensemble_of_network_runs_is_calibrated_as_one_run_is(work, trained, manifest):
    """Network runs' raw output is under their samplers' class prior, so their blend gets a run's calibration
    (posteriors, the balanced rule, the decision rules), not a bare temperature: a run blended with itself is that
    run — the same calibration, the same out-of-fold files, the same predictions."""
    from pathlib import Path

    from dermfusion.bundle import write_average_bundle

    # RUN/bundle as an earlier `ensemble` left it before the run had its second fold: rewritten, not reused
    write_average_bundle(Path(trained), [Path(trained) / "fold_0" / "bundle"])
    ens = work / "ensemble_self"
    text = run("ensemble", trained, trained, "--manifest", manifest, "--out", ens, "--objective", "equal")
    assert len(json.loads((Path(trained) / "bundle" / "members.json").read_text())) == 2
    assert "balanced rule" in text and "weights (equal): run 0.500, run 0.500" in text
    own = json.loads((Path(trained) / "fold_0" / "bundle" / "calibration.json").read_text())
    assert own.get("prior"), "a network run's posteriors say which prior they assume"
    _close(json.loads((ens / "calibration.json").read_text()), own)
    for name in ("oof_calibrated.csv", "oof_balanced.csv"):
        a, b = (pd.read_csv(d / name).sort_values("lesion_id", ignore_index=True) for d in (ens, Path(trained)))
        pd.testing.assert_frame_equal(a[["lesion_id", *CLASSES]], b[["lesion_id", *CLASSES]], rtol=1e-4)
    decisions = json.loads((ens / "decisions.json").read_text())
    assert decisions["fitted_on"] == "48 out-of-fold posteriors" and decisions["differential"]["level"] == 0.95
    run("bundle", "verify", ens)  # the out-of-fold files and the report beside the model change no prediction
    run("operating-point", ens, "--manifest", manifest, "--malignant-sensitivity", "0.9", "--n-boot", "20")
    assert json.loads((ens / "decisions.json").read_text())["triage"]["targets"]["malignant_sensitivity"] == 0.9
    # every cancer by default, not melanoma alone; 0 asks for melanoma alone
    assert decisions["triage"]["targets"]["malignant_sensitivity"] == 0.95       # what `ensemble` chose by default
    run("operating-point", ens, "--manifest", manifest, "--malignant-sensitivity", "0", "--n-boot", "20", "--dry-run")
    run("bundle", "verify", ens)  # re-sealed with the new cut-offs; its report and plot lie beside them, unhashed
    files = [work / f"self_{k}.csv" for k in ("ensemble", "run")]
    for bundle, out in zip((ens, trained), files):
        run("predict", bundle, "--manifest", manifest, "--out", out, "--backend", "fp32")
    a, b = (pd.read_csv(f) for f in files)
    np.testing.assert_allclose(a[CLASSES].to_numpy(), b[CLASSES].to_numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ documents
def test_card(work, trained, manifest):
    from pathlib import Path

    evaluation = work / "report_for_card"
    run("evaluate", "--predictions", f"{trained}/oof_calibrated.csv", "--manifest", manifest, "--out", evaluation,
        "--bootstrap", "10")
    run("card", trained, "--manifest", manifest, "--evaluation", evaluation)
    card = json.loads((Path(trained) / "fold_0" / "bundle" / "model_card.json").read_text())
    assert card["performance"]["evaluation"] and card["training_data"]["n_lesions"] == 48
    assert (evaluation / "model_card.html").exists() and "model_card.html" in (evaluation / "report.html").read_text()


def test_shift(work, manifest):
    from dermfusion.data.manifest import load_manifest, save_manifest

    df = load_manifest(manifest, resolve_paths=False)
    a, b = save_manifest(df.iloc[:24], work / "a.parquet"), save_manifest(df.iloc[24:], work / "b.parquet")
    out = work / "shift"
    run("shift", a, b, "--out", out, "--max-images", "12")
    summary = json.loads((out / "shift.json").read_text())
    assert 0 <= summary["feature_sets"]["image_statistics"]["auc"] <= 1 and (out / "shift.html").exists()


# ------------------------------------------------------------------------------------------------ serving stage
def test_explain(work, trained, manifest):
    from dermfusion.data.manifest import load_manifest

    lesion = str(load_manifest(manifest)["lesion_id"].iloc[0])
    out = work / "explain"
    run("explain", trained, "--manifest", manifest, "--ids", lesion, "--out", out)  # a run: its folds, averaged
    body = json.loads((out / f"{lesion}.json").read_text())
    assert body["lesion_id"] == lesion and (out / f"{lesion}_dermoscopic.png").exists()


def test_drift(work, trained):
    pytest.importorskip("sqlalchemy")
    from dermfusion.service.audit import AuditStore

    db = f"sqlite:///{work}/audit.db"
    AuditStore(db).close()
    out = work / "drift.json"
    run("drift", "--db", db, "--bundle", trained, "--json", out)
    assert json.loads(out.read_text())["analyses"] == 0


# ------------------------------------------------------------------------------------------------ deployment
@pytest.mark.slow
def test_export(work, trained):
    pytest.importorskip("onnxruntime")
    out = work / "onnx"
    run("export", f"{trained}/fold_0/bundle", "--out", out)
    assert (out / "model.onnx").stat().st_size > 0
    assert json.loads((out / "export.json").read_text())["max_abs_prob_diff"] <= 1e-4


def test_export_refuses_a_run_of_several_bundles(work, trained):
    text = run("export", trained, "--out", work / "onnx_run", code=2)
    assert "export needs one bundle" in text


@pytest.mark.slow
def test_bench(work, trained):
    out = work / "bench.json"
    run("bench", f"{trained}/fold_0/bundle", "--batch-sizes", "1", "--backends", "fp32", "--accuracy-n", "0",
        "--repeats", "1", "--budget", "5", "--json", out)
    result = json.loads(out.read_text())
    assert result["backends"]["fp32"]["ok"] and result["backends"]["fp32"]["batches"]["1"]["p50_ms"] > 0


@pytest.mark.slow
def test_demo(tmp_path):
    text = run("demo", "--out", tmp_path / "demo", "--epochs", "1")
    assert "out-of-fold balanced accuracy" in text
    for f in ("manifest.parquet", "predictions.csv", "report/report.html", "run/summary.json"):
        assert (tmp_path / "demo" / f).exists(), f
