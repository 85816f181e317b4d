"""Single-process training: exact resume after a crash mid-epoch, and a cross-validation smoke run."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from dermfusion.config import load_config
from dermfusion.tasks import ISIC2018


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Crash(RuntimeError):
    pass


def _trainer(cfg, df, out):
    from dermfusion.training.engine import FoldTrainer

    return FoldTrainer(cfg, ISIC2018, df, 0, out)


def test_resume_after_crash_mid_epoch_reproduces_uninterrupted_run(ham_sample, tmp_path):
    # the tiny config as it is (augmentation, dropout, modality dropout, class-balanced sampling all on)
    cfg = load_config("tiny_cpu", ["train.epochs=2", "train.ema=0.9"])
    straight = _trainer(cfg, ham_sample, tmp_path / "straight")
    straight.run()

    crashed = _trainer(cfg, ham_sample, tmp_path / "resumed")

    def crash(trainer, epoch, step):
        if epoch == 1 and step == 1:  # second epoch, after two steps: the epoch-1 checkpoint is on disk
            raise Crash("simulated crash")

    crashed.on_step_end = crash
    with pytest.raises(Crash):
        crashed.run()
    ck = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert ck["epoch"] == 0  # only epoch 1 finished

    resumed = _trainer(cfg, ham_sample, tmp_path / "resumed")
    resumed.run()

    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_train_cv_smoke_oof_and_loadable_bundles(ham_sample, tmp_path):
    from dermfusion.inference.bundle import load_predictor
    from dermfusion.training.cv import train_cv

    cfg = load_config("tiny_cpu", ["train.epochs=1", "train.max_steps_per_epoch=2"])
    out = tmp_path / "run"
    summary = train_cv(cfg, ham_sample, out, folds="all")
    assert summary["folds"] == [0, 1]
    oof = pd.read_csv(out / "oof.csv", dtype={"lesion_id": str})
    labelled = ham_sample[ham_sample[ISIC2018.label_columns()].notna().all(axis=1) & (ham_sample["fold"] >= 0)]
    assert oof["lesion_id"].is_unique
    assert sorted(oof["lesion_id"]) == sorted(labelled["lesion_id"].astype(str))
    assert set(oof["fold"]) == {0, 1}
    assert (out / "summary.json").exists()
    for b in summary["bundles"]:
        pred = load_predictor(out / b)
        p = pred.predict_proba(ham_sample.head(4))
        assert p.shape == (4, ISIC2018.num_classes)
        assert abs(float(p.sum(1).mean()) - 1.0) < 1e-4
    # no temporary bundle or checkpoint files left behind
    assert not list(out.rglob(".*tmp*"))


def test_progressive_resizing_trains_at_the_scheduled_size_and_evaluates_at_the_backbone_size(ham_sample, tmp_path):
    cfg = load_config("tiny_cpu", ["train.epochs=3", "train.max_steps_per_epoch=1", "train.epoch_sizes=[32,48]",
                                   "model.encoder.dynamic_img_size=true"])
    tr = _trainer(cfg, ham_sample, tmp_path / "run")
    tr.setup()
    seen = {}
    for epoch in range(3):
        batch = next(iter(tr._loader(tr.train_df, train=True, epoch=epoch)))
        seen[epoch] = tuple(batch["images"]["dermoscopic"].shape[-2:])
    assert seen == {0: (32, 32), 1: (48, 48), 2: (48, 48)}  # the last size repeats
    val = next(iter(tr._loader(tr.val_df, train=False)))
    assert tuple(val["images"]["dermoscopic"].shape[-2:]) == (64, 64)  # the backbone's size (tiny_cpu: 64)
    tr.run()
    log = [__import__("json").loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["train_size"] for r in log] == [32, 48, 48]


@pytest.mark.parametrize("every,expected", [(1, [1, 2, 3]), (2, [2, 3]), (0, [])])
def test_validate_every(ham_sample, tmp_path, every, expected):
    import json

    cfg = load_config("tiny_cpu", ["train.epochs=3", "train.max_steps_per_epoch=1", f"train.validate_every={every}"])
    result = _trainer(cfg, ham_sample, tmp_path / "run").run()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val_official" in r] == expected
    assert "official" in result.metrics  # the fold's final prediction is always scored


def test_precision_settings(monkeypatch):
    from dermfusion.training import runtime

    cpu = torch.device("cpu")
    assert runtime.autocast_dtype(cpu, "auto") is None and runtime.autocast_dtype(cpu, "fp32") is None
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})          # e.g. an AMD EPYC (Zen 3)
    assert runtime.autocast_dtype(cpu, "fast") is None
    with pytest.warns(UserWarning, match="emulated"):
        assert runtime.autocast_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})  # Sapphire Rapids
    assert runtime.autocast_dtype(cpu, "fast") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        runtime.autocast_dtype(cpu, "fp8")


def test_profile_separates_pipeline_start_up_from_steady_state_input_wait(ham_sample, tmp_path):
    from dermfusion.training.cv import train_cv

    cfg = load_config("tiny_cpu", ["train.epochs=2", "train.max_steps_per_epoch=3", f"data.cache_dir={tmp_path / 'cache'}"])
    summary = train_cv(cfg, ham_sample, tmp_path / "run", folds="0", profile=True)
    prof = summary["profile"][0]
    assert prof["startup_s"] > 0 and prof["compute_s"] > 0 and prof["data_wait_s"] >= 0
    assert prof["data_wait_frac"] == pytest.approx(prof["data_wait_s"] / (prof["data_wait_s"] + prof["compute_s"]))
    log = pd.read_json(tmp_path / "run" / "fold_0" / "log.jsonl", lines=True)
    assert (log["startup_s"] > 0).all()  # one start-up per epoch (a new loader each epoch), logged
    assert prof["startup_s"] == pytest.approx(log["startup_s"].sum())
