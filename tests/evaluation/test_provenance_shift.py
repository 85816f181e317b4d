"""Evidence that predicts the test: recall by label provenance (shortcut warnings) and the covariate-shift
check (domain classifier on image statistics / embeddings), through the API and the CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cli_helpers import squash

from dermfusion.evaluation.provenance import provenance_recall, provenance_section_html
from dermfusion.evaluation.shift import ShiftConfig, ShiftError, check_shift
from dermfusion.tasks import ISIC2018


# ---------------------------------------------------------------------------- provenance
def _provenance_frame(recall_histo: float, recall_follow: float, n: int = 40, seed: int = 0):
    """NV lesions confirmed by histology or follow-up, recalled at the given rates; a few MEL lesions."""
    rng = np.random.default_rng(seed)
    task = ISIC2018
    nv, mel = task.index("NV"), task.index("MEL")
    true, pred, group = [], [], []
    for g, rate in (("histo", recall_histo), ("follow_up", recall_follow)):
        hits = int(round(rate * n))
        true += [nv] * n
        pred += [nv] * hits + [mel] * (n - hits)
        group += [g] * n
    true += [mel] * 12
    pred += [mel] * 12
    group += ["histo"] * 12
    order = rng.permutation(len(true))
    C = task.num_classes
    y_true = np.eye(C)[np.array(true)[order]]
    y_prob = 0.9 * np.eye(C)[np.array(pred)[order]] + 0.1 / C
    rows = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(len(true))],
                         "dx_confirmation": np.array(group)[order]})
    return task, y_true, y_prob, rows


def test_provenance_warns_on_a_recall_gap_and_names_the_class():
    task, y_true, y_prob, rows = _provenance_frame(0.1, 0.9)
    prov = provenance_recall(task, y_true, y_prob, rows)
    assert prov["available"]
    groups = {g["group"]: g for g in prov["groups"]}
    nv = groups["follow_up"]["per_class"]["NV"]
    assert nv["n"] == 40 and nv["recall"] == pytest.approx(0.9)
    lo, hi = nv["ci"]
    assert lo < 0.9 < hi
    assert groups["histo"]["per_class"]["NV"]["recall"] == pytest.approx(0.1)
    assert groups["histo"]["per_class"]["MEL"]["n"] == 12
    assert [w["class"] for w in prov["warnings"]] == ["NV"]  # MEL has no lesions on the follow-up side
    w = prov["warnings"][0]
    assert (w["high_group"], w["low_group"]) == ("follow_up", "histo") and w["difference"] == pytest.approx(0.8)
    assert "NV" in w["message"]
    page = provenance_section_html(task, prov)
    assert "class='flagged'" in page and "shortcut?" in page and "NV" in page
    # the arguments move the rule: a wider margin or a higher minimum count silences it
    assert not provenance_recall(task, y_true, y_prob, rows, margin=0.85)["warnings"]
    assert not provenance_recall(task, y_true, y_prob, rows, min_class_lesions=41)["warnings"]


def test_provenance_no_warning_when_recall_is_equal_and_absent_column_is_said():
    task, y_true, y_prob, rows = _provenance_frame(0.6, 0.6)
    prov = provenance_recall(task, y_true, y_prob, rows)
    assert prov["available"] and not prov["warnings"]
    assert "no warning" in provenance_section_html(task, prov)
    none = provenance_recall(task, y_true, y_prob, rows.drop(columns="dx_confirmation"))
    assert not none["available"] and not none["groups"]
    assert "carries no label provenance" in provenance_section_html(task, none)


# ---------------------------------------------------------------------------- shift
def _images(folder: Path, n: int, seed: int, red: float = 0.0) -> pd.DataFrame:
    """n small PNGs of skin-coloured noise (optionally with a red cast) as a manifest."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = np.array([170.0, 130.0, 120.0]) + rng.normal(0, 20, (32, 32, 3))
        arr[..., 0] += red
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return pd.DataFrame({"lesion_id": [f"{folder.name}_{i}" for i in range(n)], "image_dermoscopic": paths})


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shift_images")
    return {"ref": _images(root / "ref", 30, 1), "same": _images(root / "same", 30, 2),
            "red": _images(root / "red", 30, 3, red=30.0)}


def test_shift_detects_a_colour_cast_and_lists_red_mean_first(image_sets):
    res = check_shift(image_sets["ref"], image_sets["red"], ShiftConfig(n_bootstrap=200))
    fs = res.summary["feature_sets"]["image_statistics"]
    assert fs["auc"] > 0.95 and fs["ci"][0] > 0.9 and fs["level"] == "strong"
    top = res.summary["top_differences"][0]
    assert top["statistic"] == "red_mean"
    assert top["other_mean"] - top["reference_mean"] == pytest.approx(30, abs=3)
    assert res.summary["reference"]["n_used"] == 30 and len(res.thumbnails["other"]) > 0


def test_shift_same_distribution_ci_covers_half(image_sets):
    fs = check_shift(image_sets["ref"], image_sets["same"], ShiftConfig(n_bootstrap=200)).summary["feature_sets"]
    lo, hi = fs["image_statistics"]["ci"]
    assert lo <= 0.5 <= hi and fs["image_statistics"]["level"] == "none detected"


def test_shift_subsamples_skips_unreadable_and_explains_bad_input(image_sets, tmp_path):
    ref = image_sets["ref"].copy()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    ref.loc[len(ref)] = ["broken", str(bad)]
    res = check_shift(ref, image_sets["same"], ShiftConfig(max_images=20, n_bootstrap=50))
    assert res.summary["other"]["n_sampled"] == 20
    assert res.summary["reference"]["n_with_image"] == 31
    assert res.summary["reference"]["n_used"] + res.summary["reference"]["n_unreadable"] == 20
    with pytest.raises(ShiftError, match="no clinical images"):
        check_shift(ref, image_sets["same"], ShiftConfig(modality="clinical"))
    with pytest.raises(ShiftError, match="shades_of_gray"):
        check_shift(ref, image_sets["same"], ShiftConfig(color_constancy="grey_world_typo"))


def test_shift_embeddings_from_a_bundle(image_sets, tmp_path, ham_sample):
    """An untrained tiny_cpu network bundle: the embedding feature set runs end to end."""
    import torch
    from safetensors.torch import save_file

    from dermfusion.config import load_config
    from dermfusion.bundle import write_bundle
    from dermfusion.tasks import get_task
    from dermfusion.models.factory import build_model, feature_spec_for, preprocess_of

    cfg = load_config("tiny_cpu", ["train.device=cpu"])
    task = get_task(cfg.task)
    spec = feature_spec_for(cfg, task, ham_sample)
    torch.manual_seed(0)
    model = build_model(cfg, task, spec).eval()
    pre = preprocess_of(model, spec)
    config = {"kind": "network", "task": task.name, "name": "shift_test", "model": {"name": cfg.model.name, **cfg.model_kwargs()},
              "feature_spec": spec.to_dict(), "preprocess": {m: p.to_dict() for m, p in pre.items()},
              "experiment": cfg.model_dump(), "fold": 0}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bundle = write_bundle(tmp_path / "bundle", config=config, metrics={},
                          write_model=lambda d: save_file(state, str(d / "model.safetensors"))).path
    from dermfusion.inference.embeddings import bundle_embedder

    res = check_shift(image_sets["ref"], image_sets["red"], ShiftConfig(bundle=bundle, embed=bundle_embedder(bundle),
                                                                          n_bootstrap=50, max_images=20))
    emb = res.summary["feature_sets"]["embeddings"]
    assert emb["dim"] > 0 and emb["n_reference"] == 20 and 0.0 <= emb["auc"] <= 1.0


# ---------------------------------------------------------------------------- CLI
def _self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page), "the page must not load external resources"


def test_shift_cli_writes_json_and_html(image_sets, tmp_path):
    from typer.testing import CliRunner

    from dermfusion.cli import app

    ref, red = tmp_path / "train.csv", tmp_path / "test.csv"
    image_sets["ref"].to_csv(ref, index=False)
    image_sets["red"].to_csv(red, index=False)
    out = tmp_path / "shift"
    res = CliRunner().invoke(app, ["shift", str(ref), str(red), "--out", str(out), "--max-images", "25",
                                   "--color-constancy", "shades_of_gray"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "shift.json").read_text())
    assert summary["color_constancy"] == "shades_of_gray" and summary["reference"]["n_sampled"] == 25
    assert summary["reference"]["name"] == "train.csv" and "image_statistics" in summary["feature_sets"]
    page = (out / "shift.html").read_text()
    assert "Domain AUC" in page and "data:image/png;base64," in page and "red_mean" in page
    _self_contained(page)
    assert "domain AUC" in squash(res.output)
    bad = CliRunner().invoke(app, ["shift", str(ref), str(red), "--out", str(out), "--color-constancy", "grey"])
    assert bad.exit_code == 2 and "shades_of_gray" in squash(bad.output)


def test_evaluate_with_shift_reference_and_provenance(ham_sample, tmp_path):
    from typer.testing import CliRunner

    from dermfusion.cli import app
    from dermfusion.data.manifest import save_manifest

    task = ISIC2018
    man = tmp_path / "ham.parquet"
    save_manifest(ham_sample, man)
    train = tmp_path / "train_fold0.parquet"
    save_manifest(ham_sample[ham_sample["fold"] == 0], train)
    held = ham_sample[ham_sample["fold"] == 1].reset_index(drop=True)
    rng = np.random.default_rng(0)
    y = held[task.label_columns()].to_numpy(float)
    p = 0.6 * y + 0.4 * rng.dirichlet(np.ones(task.num_classes), len(held))
    pred = pd.DataFrame(p, columns=list(task.classes))
    pred.insert(0, "lesion_id", held["lesion_id"])
    pred.to_csv(tmp_path / "pred.csv", index=False)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["evaluate", "--predictions", str(tmp_path / "pred.csv"), "--manifest", str(man),
                                   "--out", str(out), "--bootstrap", "20", "--shift-reference", str(train)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["available"] == ("dx_confirmation" in ham_sample.columns)
    assert metrics["shift"]["reference"]["name"] == "train_fold0.parquet"
    assert metrics["shift"]["other"]["n_used"] == len(held)
    page = (out / "report.html").read_text()
    assert "Recall by label provenance" in page and "Covariate shift" in page and "Domain AUC" in page
    _self_contained(page)
