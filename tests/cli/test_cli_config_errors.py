"""A misspelt key in any section of a config fails before training, through the CLI, as one line naming the key and
the nearest valid one — never a traceback, never a run that trains something else than what was asked."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from dermfusion.cli import app
from dermfusion.config import load_raw


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, ham_sample):
    from dermfusion.data.manifest import save_manifest

    return save_manifest(ham_sample, tmp_path_factory.mktemp("cfg_errors") / "ham.parquet")


def _train(tmp_path, manifest, raw: dict, *extra: str):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(cfg), "--manifest", str(manifest), "--out", str(out), *extra])
    return res, out


def _one_line_error(res, *words):
    text = res.output
    assert res.exit_code == 2, text
    assert "Traceback" not in text and res.exception is None or isinstance(res.exception, SystemExit), text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for w in words:
        assert w in lines[0], text
    return lines[0]


def _tiny(**changes) -> dict:
    raw = load_raw("tiny_cpu")
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = raw
        for p in path:
            node = node.setdefault(p, {})
        node[key] = value
    return raw


@pytest.mark.parametrize("section, typo, nearest", [
    ("data", "num_wokers", "num_workers"),
    ("loss", "gama", "gamma"),
    ("optim", "weight_decy", "weight_decay"),
    ("train", "epochz", "epochs"),
    ("cv", "kk", "k"),
    ("calibration", "temprature", "temperature"),
])
def test_misspelt_key_in_a_section(tmp_path, manifest, section, typo, nearest):
    res, out = _train(tmp_path, manifest, _tiny(**{f"{section}__{typo}": 1}))
    _one_line_error(res, f"{section}.{typo}", repr(nearest))
    assert not out.exists(), "nothing may be written before the config is valid"


def test_misspelt_top_level_section(tmp_path, manifest):
    raw = _tiny()
    raw["trian"] = raw.pop("train")
    res, out = _train(tmp_path, manifest, raw)
    _one_line_error(res, "trian", "'train'")
    assert not out.exists()


def test_misspelt_network_model_setting(tmp_path, manifest):
    res, out = _train(tmp_path, manifest, _tiny(model__fusion_dmi=48))
    _one_line_error(res, "model.fusion_dmi", "'fusion_dim'")
    assert not out.exists(), "model settings are checked before the run directory is written"


def test_misspelt_encoder_setting(tmp_path, manifest):
    raw = _tiny()
    raw["model"]["encoder"]["dpeth"] = 2
    res, out = _train(tmp_path, manifest, raw)
    _one_line_error(res, "dpeth", "'depth'")
    assert not (out / "fold_0" / "last.ckpt").exists(), "no epoch may run"


def test_misspelt_key_through_set(tmp_path, manifest):
    res, out = _train(tmp_path, manifest, _tiny(), "--set", "train.batchsize=4")
    _one_line_error(res, "train.batchsize", "'batch_size'")
    assert not out.exists()


def test_misspelt_tabular_model_key(tmp_path, manifest):
    raw = load_raw("milk10k_logreg")
    raw["model"]["class_wieght"] = None
    res, out = _train(tmp_path, manifest, raw)
    _one_line_error(res, "model.class_wieght", "'class_weight'")
    raw = load_raw("milk10k_logreg")
    raw["model"]["features"]["derivd"] = True
    res, out = _train(tmp_path, manifest, raw)
    _one_line_error(res, "model.features.derivd", "'derived'")
    assert not out.exists()


def test_unknown_model_name(tmp_path, manifest):
    res, out = _train(tmp_path, manifest, _tiny(model__name="trimodal_fussion"))
    _one_line_error(res, "trimodal_fussion", "'trimodal_fusion'")
    assert not out.exists()


def test_misspelt_service_config_key(tmp_path):
    bad = tmp_path / "service.yaml"
    bad.write_text("workers: {workerz: 2}\n")
    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--config", str(bad)])
    assert res.exit_code == 2 and "workerz" in res.output and "Traceback" not in res.output, res.output
