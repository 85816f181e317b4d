"""Model cards: written by `dermfusion train`, rewritten by `dermfusion card` with evaluation and shift results,
served at /v1/model-card, linked from the evaluation report; never part of the bundle's content hash."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service_fixtures import tiny_bundle, tiny_predictor  # noqa: F401

from dermfusion.card import CARD_FILES, build_model_card, render_html, render_markdown, write_model_card
from dermfusion.evaluation.report_link import REPORT_LINK_ID
from dermfusion.bundle import hash_dir, read_bundle

SECTIONS = ("model_details", "intended_use", "training_data", "performance", "subgroups", "provenance_results",
            "covariate_shift", "calibration", "failure_modes")
TITLES = ("Model details", "Intended use", "Training data", "Performance", "Subgroups", "label provenance",
          "Covariate shift", "Calibration", "Known failure modes")
SHIFT = {  # the layout `dermfusion shift` writes (evaluation.shift.check_shift → shift.json)
    "reference": {"name": "ham_train.parquet", "n_used": 300}, "other": {"name": "isic2018_test.parquet", "n_used": 300},
    "modality": "dermoscopic", "generated": "2030-01-02 03:04 UTC",
    "feature_sets": {"image_statistics": {"auc": 0.83, "ci": [0.79, 0.87], "level": "strong", "n_reference": 300,
                                          "n_other": 300}},
    "top_differences": [{"statistic": "mean_b", "description": "mean blue", "reference_mean": 0.41,
                         "other_mean": 0.52, "smd": 1.3}],
}


@pytest.fixture()
def run_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny training run (the shared fixture stays untouched)."""
    run = tiny_bundle.parent.parent
    if not (run / "summary.json").exists():
        pytest.skip("the tiny bundle was not trained with train_cv (training stack unavailable)")
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.fixture()
def manifest_file(ham_sample, tmp_path) -> Path:
    from dermfusion.data.manifest import save_manifest

    p = tmp_path / "ham_sample.csv"
    save_manifest(ham_sample, p)
    return p


@pytest.fixture()
def evaluation_dir(run_copy, ham_sample, tmp_path) -> Path:
    import pandas as pd

    from dermfusion.evaluation.report import evaluate_predictions
    from dermfusion.tasks import ISIC2018

    out = tmp_path / "eval"
    oof = pd.read_csv(run_copy / "oof.csv", dtype={"lesion_id": str}).drop(columns=["fold"])
    evaluate_predictions(oof, ham_sample, ISIC2018, out, n_bootstrap=20)
    return out


def _labelled(df):
    from dermfusion.tasks import ISIC2018

    return df[df[ISIC2018.label_columns()].notna().all(axis=1)]


def test_train_writes_a_card_into_each_bundle(tiny_bundle, ham_sample):
    if not (tiny_bundle.parent.parent / "summary.json").exists():
        pytest.skip("the tiny bundle was not trained with train_cv")
    for name in CARD_FILES:
        assert (tiny_bundle / name).is_file(), name
    card = json.loads((tiny_bundle / "model_card.json").read_text())
    assert all(s in card for s in SECTIONS)
    md = card["model_details"]
    assert md["bundle_hash"] == (tiny_bundle / "HASH").read_text().strip()
    assert md["task"] == "isic2018" and [c["code"] for c in md["classes"]] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert md["encoder"] == "timm:vit_tiny_patch16_224" and "randomly initialised" in md["pretrained_weights"]
    # training data from the manifest the run was trained on: counts and label provenance mix
    td = card["training_data"]
    lab = _labelled(ham_sample)
    assert td["available"] and td["n_lesions"] == len(lab)
    assert sum(td["class_counts"].values()) == len(lab)
    assert td["class_counts"]["NV"] == int(lab["label_NV"].sum())
    assert td["provenance"]["counts"] == {k: int(v) for k, v in lab["dx_confirmation"].value_counts().items()}
    assert td["this_bundle"]["fold"] == 0 and td["this_bundle"]["n_validation"] == int((lab["fold"] == 0).sum())
    # OOF metrics with bootstrap CIs, calibration, and no invented evaluation
    oof = card["performance"]["out_of_fold"]
    assert oof["n"] == int((lab["fold"] == 0).sum()) and oof["ci_method"].startswith("percentile bootstrap")
    assert any(r["key"] == "balanced_accuracy" and r["ci"] for r in oof["headline"])
    assert card["performance"]["evaluation"] is None
    assert card["calibration"]["temperature"] == pytest.approx(read_bundle(tiny_bundle).calibration["temperature"])
    assert not card["subgroups"]["available"] and not card["covariate_shift"]["available"]
    kinds = {d["kind"] for d in card["failure_modes"]["derived"]}
    assert "no held-out evaluation" in kinds and "label provenance shortcut" in kinds
    assert any("under-represented" in c for c in card["failure_modes"]["general"])


def test_rendered_card_has_every_section_and_names_its_sources(run_copy):
    bundle = run_copy / "fold_0" / "bundle"
    card = json.loads((bundle / "model_card.json").read_text())
    md, page = render_markdown(card), render_html(card)
    for t in TITLES:
        assert t in md and t in page, t
    trained_at = Path(card["model_details"]["bundle_path"])  # sources are recorded where they were read
    assert "Source: " in md and str(trained_at / "calibration.json") in md
    assert str(trained_at.parent.parent / "oof.csv") in md
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained, static
    assert "not a medical device" in page


def test_without_any_evaluation_the_card_says_so(tiny_bundle, tmp_path):
    lone = tmp_path / "bundle"  # the bundle alone: no run directory, no manifest, no previous card
    shutil.copytree(tiny_bundle, lone, ignore=shutil.ignore_patterns("model_card.*"))
    card = build_model_card(lone)
    perf = card["performance"]
    assert perf["evaluation"] is None and perf["out_of_fold"] is None
    assert "No performance figures available" in perf["note"]
    assert not card["training_data"]["available"] and "--manifest" in card["training_data"]["note"]
    assert "ece" not in card["calibration"] and "no expected calibration error" in card["calibration"]["ece_note"]
    assert any(d["kind"] == "no evidence" for d in card["failure_modes"]["derived"])
    md = render_markdown(card)
    assert "No performance figures available" in md and "Value [95% CI]" not in md


def test_evaluation_and_shift_results_enter_the_card(run_copy, evaluation_dir, tmp_path):
    bundle = run_copy / "fold_0" / "bundle"
    shift = tmp_path / "shift.json"
    shift.write_text(json.dumps(SHIFT))
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    card = build_model_card(bundle, evaluation_dir=evaluation_dir, shift_json=shift)
    ev = card["performance"]["evaluation"]
    assert ev["n"] == metrics["n"] and ev["source"][0]["file"] == str(evaluation_dir / "metrics.json")
    bacc = next(r for r in ev["headline"] if r["key"] == "balanced_accuracy")
    assert bacc["value"] == pytest.approx(metrics["metrics"]["balanced_accuracy"])
    assert bacc["ci"] == pytest.approx(metrics["ci"]["balanced_accuracy"])
    assert [r["class"] for r in ev["per_class"]] == list(metrics["per_class"])
    assert card["subgroups"]["available"] and len(card["subgroups"]["rows"]) == len(metrics["fairness"])
    prov = card["provenance_results"]
    if isinstance(metrics.get("provenance"), dict) and metrics["provenance"].get("available"):
        assert prov["available"] and prov["tables"]
        assert len(prov["warnings"]) == len(metrics["provenance"]["warnings"])
    else:
        assert not prov["available"] and prov["note"]
    cs = card["covariate_shift"]
    assert cs["available"] and cs["checks"]["image_statistics"]["auc"] == 0.83
    assert cs["source"][0]["date"] == "2030-01-02 03:04 UTC"
    assert any("AUC 0.83" in d["text"] for d in card["failure_modes"]["derived"] if d["kind"] == "covariate shift")
    md = render_markdown(card)
    assert "mean blue" in md and "held-out evaluation" in md.lower()
    # the flat layout (image_stats with ci_low / ci_high) is read too; an AUC near 0.5 is no failure mode
    shift.write_text(json.dumps({"image_stats": {"auc": 0.52, "ci_low": 0.45, "ci_high": 0.6,
                                                 "top_differences": ["contrast"]}, "embeddings": {"auc": 0.55}}))
    cs = build_model_card(bundle, shift_json=shift)["covariate_shift"]
    assert cs["checks"]["image_stats"]["ci"] == [0.45, 0.6] and cs["checks"]["embeddings"]["auc"] == 0.55


def test_writing_the_card_leaves_the_bundle_hash_alone(run_copy, evaluation_dir):
    bundle = run_copy / "fold_0" / "bundle"
    before = (bundle / "HASH").read_text().strip()
    assert hash_dir(bundle) == before
    write_model_card(bundle, evaluation_dir=evaluation_dir)
    (bundle / "model_card.md").write_text("edited by hand")
    assert hash_dir(bundle) == before and read_bundle(bundle).content_hash == before


def test_card_cli_writes_cards_and_links_the_report(run_copy, evaluation_dir, manifest_file, tmp_path):
    from typer.testing import CliRunner

    from dermfusion.cli import app

    bundle = run_copy / "fold_0" / "bundle"
    for name in CARD_FILES:
        (bundle / name).unlink()
    hash_before = (bundle / "HASH").read_text()
    assert REPORT_LINK_ID not in (evaluation_dir / "report.html").read_text()
    shift = tmp_path / "shift.json"
    shift.write_text(json.dumps(SHIFT))
    r = CliRunner().invoke(app, ["card", str(run_copy), "--manifest", str(manifest_file),
                                 "--evaluation", str(evaluation_dir), "--shift", str(shift)])
    assert r.exit_code == 0, r.output
    for name in CARD_FILES:
        assert (bundle / name).is_file()
        assert str(bundle) in r.output.replace("\n", "")
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["performance"]["evaluation"] and card["covariate_shift"]["available"]
    assert card["training_data"]["source"][0]["file"] == str(manifest_file)
    assert (bundle / "HASH").read_text() == hash_before
    # the evaluation directory gets a copy, and its report links it (patched in, or at render time)
    assert (evaluation_dir / "model_card.html").read_text() == (bundle / "model_card.html").read_text()
    assert "href='model_card.html'" in (evaluation_dir / "report.html").read_text()
    # rewriting with --shift only keeps the evaluation and training-data sections (same bundle hash)
    r = CliRunner().invoke(app, ["card", str(bundle), "--shift", str(shift)])
    assert r.exit_code == 0, r.output
    again = json.loads((bundle / "model_card.json").read_text())
    assert again["performance"]["evaluation"] == card["performance"]["evaluation"]
    assert again["training_data"] == card["training_data"]
    r = CliRunner().invoke(app, ["card", str(bundle), "--evaluation", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "metrics.json" in r.output


def test_report_links_the_card_only_when_it_exists(run_copy, ham_sample, tmp_path):
    import pandas as pd

    from dermfusion.evaluation.report import evaluate_predictions
    from dermfusion.tasks import ISIC2018

    oof = pd.read_csv(run_copy / "oof.csv", dtype={"lesion_id": str}).drop(columns=["fold"])
    out = tmp_path / "with_card"
    out.mkdir()
    (out / "model_card.html").write_text("<html></html>")
    evaluate_predictions(oof, ham_sample, ISIC2018, out, n_bootstrap=0)
    assert f"id='{REPORT_LINK_ID}'" in (out / "report.html").read_text()
    evaluate_predictions(oof, ham_sample, ISIC2018, tmp_path / "without", n_bootstrap=0)
    assert REPORT_LINK_ID not in (tmp_path / "without" / "report.html").read_text()


# ------------------------------------------------------------------------------------------ service
def _service_config(tmp_path, **over):
    from dermfusion.service.config import load_service_config

    return load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/audit.db"}, **over)


def test_service_serves_the_card(tiny_bundle, tiny_predictor, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app

    with TestClient(create_app(tiny_bundle, _service_config(tmp_path), predictor=tiny_predictor, warmup=False)) as c:
        r = c.get("/v1/model-card")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        card = r.json()
        assert all(s in card for s in SECTIONS)
        assert card["model_details"]["bundle_hash"] == (tiny_bundle / "HASH").read_text().strip()
        if (tiny_bundle / "model_card.json").exists():
            assert card["served"]["origin"]["what"] == "stored in the bundle"
        for url in ("/v1/model-card?format=html", "/v1/model-card.html"):
            h = c.get(url)
            assert h.status_code == 200 and h.headers["content-type"].startswith("text/html")
            assert "Model card" in h.text and "Intended use" in h.text
        assert c.get("/v1/model-card?format=md").text.startswith("# Model card")
        bad = c.get("/v1/model-card?format=xml")
        assert bad.status_code == 422 and "error" in bad.json()
        page = c.get("/").text
        assert 'href="/v1/model-card.html"' in page and "Model card" in page


def test_service_builds_a_card_on_the_fly_and_names_an_ensemble(tiny_bundle, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.inference import load_predictor
    from dermfusion.inference.predictor import AveragePredictor
    from dermfusion.service.app import create_app

    copies = []
    for i in range(2):
        d = tmp_path / f"fold_{i}" / "bundle"
        shutil.copytree(tiny_bundle, d, ignore=shutil.ignore_patterns("model_card.*"))
        copies.append(d)
    pred = AveragePredictor([load_predictor(d) for d in copies])
    cfg = _service_config(tmp_path, auth={"api_keys": ["card-key-123"]})
    with TestClient(create_app(None, cfg, predictor=pred, warmup=False)) as c:
        assert c.get("/v1/model-card").status_code == 401
        r = c.get("/v1/model-card", headers={"X-API-Key": "card-key-123"})
        assert r.status_code == 200, r.text
        card = r.json()
        assert "built on the fly" in card["served"]["origin"]["what"]
        assert card["model_details"]["ensemble"]["n_members"] == 2
        assert card["performance"]["evaluation"] is None
        h = c.get("/v1/model-card.html", headers={"X-API-Key": "card-key-123"})
        assert h.status_code == 200 and "2 bundles" in h.text


# ------------------------------------------------------------------------------------------ tabular
def test_tabular_training_writes_cards(tmp_path):
    pytest.importorskip("lightgbm")
    from tabular_helpers import FAST, synthetic_manifest

    from dermfusion.tabular.train import train_tabular_cv

    df, _ = synthetic_manifest(n=120)
    cfg = {"task": "milk10k", "model": {"kind": "tabular", "backend": "lightgbm", "params": FAST,
                                        "class_weight": "sqrt", "early_stopping_rounds": None}, "n_jobs": 1}
    s = train_tabular_cv(cfg, df, "milk10k", tmp_path, verbose=False)
    bundle = Path(s["bundle"])
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["model_details"]["kind"] == "tabular" and card["training_data"]["n_lesions"] == 120
    assert card["performance"]["out_of_fold"]["n"] == 120
    assert hash_dir(bundle) == (bundle / "HASH").read_text().strip()
    assert all((Path(f) / "model_card.json").exists() for f in s["fold_bundles"])


def test_run_cards_say_which_ensemble_a_fold_bundle_belongs_to(run_copy, manifest_file):
    from dermfusion.card import write_run_cards

    shutil.copytree(run_copy / "fold_0", run_copy / "fold_1")
    summary = json.loads((run_copy / "summary.json").read_text())
    summary["bundles"] = ["fold_0/bundle", "fold_1/bundle"]
    (run_copy / "summary.json").write_text(json.dumps(summary))
    written = write_run_cards(run_copy, manifest=manifest_file)
    assert [p.relative_to(run_copy).as_posix() for p in written] == summary["bundles"]
    for b in written:
        card = json.loads((b / "model_card.json").read_text())
        assert card["model_details"]["ensemble"]["n_members"] == 2
        assert card["performance"]["out_of_fold"]["ci_method"]
    # at the end of training a failure must never fail the run
    assert write_run_cards(run_copy / "missing", strict=False) == []
