"""Experiment tracking (``training/tracking.py``): off by default, a misspelt key is an error, and — when mlflow is
installed — a tiny training run logs its config, fold metrics, OOF figures and bundle to a local file store under
the run directory without opening a network connection."""
from __future__ import annotations

import json
import socket

import pytest

from dermfusion.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tracking_is_off_by_default_and_keys_are_checked():
    assert load_config("tiny_cpu").tracking.mlflow is False
    with pytest.raises(ConfigError, match="mlfow"):
        load_config("tiny_cpu", ["tracking.mlfow=true"])


def test_tracking_without_mlflow_is_a_one_line_error():
    try:
        import mlflow  # noqa: F401
        pytest.skip("mlflow is installed: the missing-package error cannot be shown here")
    except ImportError:
        pass
    from dermfusion.training.tracking import check_tracking

    with pytest.raises(ConfigError, match=r"pip install 'dermfusion\[tracking\]'"):
        check_tracking(load_config("tiny_cpu", ["tracking.mlflow=true"]))


def test_a_tiny_run_is_logged_to_a_local_file_store(tmp_path, ham_sample, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'dermfusion[tracking]')")
    from dermfusion.training.cv import train_cv

    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):  # any connection other than a local (unix) socket counts as a network call
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled in this test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    out = tmp_path / "run"
    cfg = load_config("tiny_cpu", ["train.epochs=1", "train.device=cpu", "tracking.mlflow=true"])
    train_cv(cfg, ham_sample, out, folds="0")
    assert not attempts, attempts
    rec = json.loads((out / "mlflow_run.json").read_text())
    assert rec["tracking_uri"] == (out / "mlruns").resolve().as_uri() and (out / "mlruns").is_dir()
    client = mlflow.MlflowClient(tracking_uri=rec["tracking_uri"])
    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.params["model.name"] == cfg.model.name
    assert any(k.startswith("fold_0.") for k in run.data.metrics), run.data.metrics
    assert any(k.startswith("oof.") for k in run.data.metrics)

    def walk(path=None):
        for f in client.list_artifacts(rec["run_id"], path):
            yield from walk(f.path) if f.is_dir else [f.path]

    arts = set(walk())
    assert {"summary.json", "oof.csv", "figures/oof_roc.png", "figures/oof_reliability.png",
            "bundles/fold_0/bundle/HASH"} <= arts, sorted(arts)
    assert run.data.tags["bundle_hash.fold_0/bundle"] == (out / "fold_0" / "bundle" / "HASH").read_text().strip()
