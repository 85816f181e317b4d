"""Derm7pt multi-task: 7-point criteria heads trained beside the diagnosis, end to end through `dermfusion
train`, `predict` (criteria labels, the 7-point score, probabilities) and `evaluate` (criteria metrics)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dermfusion.cli import app
from dermfusion.criteria import SEVEN_POINT, seven_point_score
from dermfusion.models.criteria_heads import CriteriaHeads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIAGNOSIS = {"MEL": "melanoma", "NV": "clark nevus", "BCC": "basal cell carcinoma", "BKL": "seborrheic keratosis"}


def run(*args, code: int = 0) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"dermfusion {' '.join(map(str, args))} → {res.exit_code}\n{res.output}"
    return res.output


def test_criteria_loss_uses_only_annotated_rows():
    heads = CriteriaHeads("seven_point", dim=8)
    feats = torch.randn(4, 8, requires_grad=True)
    logits = heads(feats)
    none = torch.full((4, len(SEVEN_POINT)), -1)
    loss = heads.loss(logits, none)
    assert float(loss.detach()) == 0.0 and torch.autograd.grad(loss, feats)[0].abs().sum() == 0
    one = none.clone()
    one[2] = 0  # one annotated lesion: only its features get a gradient
    grad = torch.autograd.grad(heads.loss(heads(feats), one), feats)[0]
    assert grad[2].abs().sum() > 0 and grad[[0, 1, 3]].abs().sum() == 0


@pytest.fixture(scope="module")
def derm7pt_like(tmp_path_factory, fixture_dir):
    """The bundled images written as a Derm7pt meta.csv: 5 groups, criteria that follow the diagnosis."""
    src = pd.read_csv(fixture_dir / "train.csv")
    rng = np.random.default_rng(0)
    rows = []
    for i, r in src.iterrows():
        mel = r["dx"] == "MEL"
        rows.append({
            "case_num": i + 1, "image": str(fixture_dir / r["image"]),
            "split": ["train", "train", "valid", "test"][i % 4],
            "diagnosis": DIAGNOSIS.get(r["dx"], "lentigo"),
            "pigment_network": "atypical" if mel else rng.choice(["absent", "typical"]),
            "streaks": rng.choice(["absent", "regular", "irregular"]),
            "pigmentation": rng.choice(["absent", "diffuse regular", "localized irregular"]),
            "regression_structures": rng.choice(["absent", "blue areas"]),
            "dots_and_globules": rng.choice(["absent", "regular", "irregular"]),
            "blue_whitish_veil": "present" if mel else "absent",
            "vascular_structures": rng.choice(["absent", "dotted", "comma"]),
            "location": "back", "sex": rng.choice(["male", "female"])})
    meta = pd.DataFrame(rows)
    meta.loc[meta["split"] == "test", ["diagnosis", *[c.name for c in SEVEN_POINT]]] = ""
    d = tmp_path_factory.mktemp("derm7pt_like")
    meta.to_csv(d / "meta.csv", index=False)
    return d


def test_multitask_trains_predicts_and_evaluates(derm7pt_like, tmp_path):
    d = derm7pt_like
    run("import", "derm7pt", d / "meta.csv", "--split", "train,valid", "--out", d / "trainval.parquet")
    tiny = ["model.encoder.name=timm:resnet18", "model.encoder.pretrained_path=null", "model.encoder.input_size=32",
            "model.freeze_blocks=0", "train.epochs=2", "train.epoch_sizes=null", "train.batch_size=8",
            "train.tta=0", "data.cache_dir=null"]
    args = ["train", "derm7pt_multitask", "--manifest", d / "trainval.parquet", "--folds", "0"]
    run(*args, "--out", tmp_path / "run", *[x for s in tiny for x in ("--set", s)])
    log = [json.loads(line) for line in (tmp_path / "run" / "fold_0" / "log.jsonl").read_text().splitlines()]
    assert all(e["loss_parts"]["criteria"] > 0 for e in log if "loss_parts" in e) and "loss_parts" in log[0]
    config = yaml.safe_load((tmp_path / "run" / "fold_0" / "bundle" / "config.yaml").read_text())
    assert set(config["criteria_prior"]) == {c.name for c in SEVEN_POINT}
    out = tmp_path / "pred.csv"
    text = run("predict", tmp_path / "run", "--manifest", d / "trainval.parquet", "--out", out, "--backend", "fp32",
               "--clinical", tmp_path / "clinical.csv")
    pred = pd.read_csv(out)
    # the clinical file's sets are the diagnosis classes only (the criteria columns ride beside them in the rows)
    sizes = pd.read_csv(tmp_path / "clinical.csv")["differential"].map(lambda v: len(str(v).split("|")))
    assert f"mean size {sizes.mean():.2f}" in " ".join(text.split()) and sizes.max() <= 5
    for c in SEVEN_POINT:
        assert set(pred[c.name]) <= set(c.labels)
        probs = pred[[f"{c.name}:{label}" for label in c.labels]].to_numpy()
        assert np.allclose(probs.sum(1), 1, atol=1e-4)
        assert (np.array(c.labels)[probs.argmax(1)] == pred[c.name]).all()  # the label is the likeliest
    recomputed = [seven_point_score({c.name: r[c.name] for c in SEVEN_POINT}) for _, r in pred.iterrows()]
    assert pred["seven_point_score"].tolist() == recomputed
    # the criteria ride in the ONNX graph beside the diagnosis: the same columns on ONNX Runtime as in PyTorch
    prob_cols = [f"{c.name}:{label}" for c in SEVEN_POINT for label in c.labels]
    run("predict", tmp_path / "run", "--manifest", d / "trainval.parquet", "--out", tmp_path / "onnx.csv",
        "--backend", "onnx")
    on = pd.read_csv(tmp_path / "onnx.csv")
    assert np.abs(on[prob_cols].to_numpy() - pred[prob_cols].to_numpy()).max() < 1e-4
    assert (on[[c.name for c in SEVEN_POINT]] == pred[[c.name for c in SEVEN_POINT]]).all().all()
    # without an agreement record that measured the criteria heads, an approximate backend's criteria come from
    # the eager heads
    run("predict", tmp_path / "run", "--manifest", d / "trainval.parquet", "--out", tmp_path / "bf16.csv",
        "--backend", "bf16")
    assert np.abs(pd.read_csv(tmp_path / "bf16.csv")[prob_cols].to_numpy() - pred[prob_cols].to_numpy()).max() < 2e-6
    # check-backends measures the criteria heads too; where a record approves them, bf16's own criteria are served
    from dermfusion.inference.backend_policy import read_record, write_record

    text = run("bundle", "check-backends", tmp_path / "run", "--manifest", d / "trainval.parquet", "--backends",
               "bf16", "--lesions", "40")
    assert "criteria" in text
    bundle = tmp_path / "run" / "fold_0" / "bundle"
    rec = read_record(bundle)["agreement"]["bf16"]
    assert 0 <= rec["criteria_flips"] <= rec["lesions"] and rec["max_criteria_prob_diff"] > 0
    write_record(bundle, {"bf16": {**rec, "lesions": 500, "criteria_flip_rate": 0.0}}, 500, "a test's approval")
    run("predict", tmp_path / "run", "--manifest", d / "trainval.parquet", "--out", tmp_path / "bf16_approved.csv",
        "--backend", "bf16")
    diff = np.abs(pd.read_csv(tmp_path / "bf16_approved.csv")[prob_cols].to_numpy() - pred[prob_cols].to_numpy()).max()
    assert 2e-6 < diff < 0.05, diff  # bf16's own heads now: near fp32's, not equal to them
    run("evaluate", "--predictions", out, "--manifest", d / "trainval.parquet", "--out", tmp_path / "eval", "--bootstrap", "0")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    crit = metrics["criteria"]["criteria"]
    assert set(crit) == {c.name for c in SEVEN_POINT}
    assert crit["blue_whitish_veil"]["chance"] == 0.5 and 0 <= crit["blue_whitish_veil"]["balanced_accuracy"] <= 1
    assert "Dermoscopic criteria" in (tmp_path / "eval" / "report.html").read_text()
    # served: /v1/analyze answers the diagnosis with the criteria and the 7-point score, and explains it
    _serve_and_check(tmp_path / "run" / "fold_0" / "bundle", d, pred, pd.read_parquet(d / "trainval.parquet"))
    # the single-task variant (same config, no heads) writes no criteria columns
    run(*args, "--out", tmp_path / "single", *[x for s in [*tiny, "model.criteria=null"] for x in ("--set", s)])
    run("predict", tmp_path / "single", "--manifest", d / "trainval.parquet", "--out", tmp_path / "single.csv",
        "--backend", "fp32")
    assert "pigment_network" not in pd.read_csv(tmp_path / "single.csv").columns


def _serve_and_check(bundle, d, pred, manifest):
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    cfg = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{d / 'audit.db'}"},
                              quality={"enabled": False})
    meta = pd.read_csv(d / "meta.csv")
    with TestClient(create_app(bundle, cfg, warmup=False)) as c:
        img = meta["image"].iloc[0]
        r = c.post("/v1/analyze", files={"dermoscopic": ("x.jpg", open(img, "rb").read(), "image/jpeg")},
                   params={"explain": "true"})
        assert r.status_code == 200, r.text
        body = r.json()
    crit = body["criteria"]
    assert crit["set"] == "seven_point" and [i["criterion"] for i in crit["items"]] == [c.name for c in SEVEN_POINT]
    for item in crit["items"]:
        assert abs(sum(item["probabilities"].values()) - 1) < 1e-4
        assert item["label"] == max(item["probabilities"], key=item["probabilities"].get)
    assert crit["seven_point_score"] == seven_point_score({i["criterion"]: i["label"] for i in crit["items"]})
    # what /v1/analyze says of the lesion is what `predict` wrote for it (one engine, one pass for both)
    row = pred.iloc[int(np.flatnonzero(manifest["image_dermoscopic"].astype(str).to_numpy() == str(img))[0])]
    for item in crit["items"]:
        for label, v in item["probabilities"].items():
            assert abs(v - row[f"{item['criterion']}:{label}"]) < 1e-5, (item["criterion"], label)
    assert body["explanations"]["heatmaps"] and body["explanations"]["heatmaps"][0]["method"] == "grad_cam"


def test_criteria_labels_are_chosen_for_balanced_accuracy():
    """The bundle keeps each criterion's label prior under the sampler; prediction divides it out, so a head that
    only echoes the prior (says nothing about the lesion) gives every label the same probability."""
    from dermfusion.criteria import label_prior
    from dermfusion.inference.criteria import divide_label_prior

    crit = SEVEN_POINT[:2]  # pigment network (3 labels), streaks (3 labels)
    codes = np.array([[0, 0], [0, 0], [0, -1], [2, 1], [1, 0]])
    weights = np.array([1, 1, 1, 3, 1], float)  # the sampler draws lesion 3 three times as often
    prior = label_prior(codes, weights, crit)
    assert np.allclose(prior["pigment_network"], [3 / 7, 1 / 7, 3 / 7])
    assert np.allclose(prior["streaks"], [0.5, 0.5, 0.5])  # "irregular" unseen: the smallest seen share
    echo = {name: np.asarray(p)[None] / np.sum(p) for name, p in prior.items()}
    out = divide_label_prior(echo, prior)
    assert np.allclose(out["pigment_network"], 1 / 3) and np.allclose(out["streaks"], 1 / 3)
    assert divide_label_prior(echo, None) is echo
