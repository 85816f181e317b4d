"""Single-process training: exact resume after a crash mid-epoch, and a cross-validation smoke run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dermfusion.config import load_config
from dermfusion.tasks import ISIC2018


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    from dermfusion.inference import load_predictor
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


def test_the_out_of_fold_pass_on_onnx_runtime_matches_eager_and_auto_skips_small_passes(ham_sample, tmp_path):
    """`train.oof_backend`: onnx gives the eager numbers (an fp32 graph of the same weights); auto exports only for a
    pass of at least ONNX_MIN_IMAGES images, where the export repays itself (a 24-lesion fold is predicted eagerly)."""
    pytest.importorskip("onnxruntime")
    from dermfusion.training.out_of_fold import ONNX_MIN_IMAGES, predict_out_of_fold, uses_onnx

    tr = _trainer(load_config("tiny_cpu", ["train.oof_backend=onnx"]), ham_sample, tmp_path / "onnx")
    tr.setup()
    model = tr.model.eval()
    assert uses_onnx(tr) and len(tr.val_df) * 2 < ONNX_MIN_IMAGES
    exported = predict_out_of_fold(tr, model, tta=2)
    eager = tr.predict(tr.val_df, model, tta=2)
    np.testing.assert_allclose(exported, eager, atol=1e-5)
    for choice, expected in (("auto", False), ("eager", False), ("trained", False)):
        tr.cfg = load_config("tiny_cpu", [f"train.oof_backend={choice}"])
        assert uses_onnx(tr, tta=2) is expected
    tr.cfg = load_config("tiny_cpu")
    tr.val_df = pd.concat([tr.val_df] * (ONNX_MIN_IMAGES // len(tr.val_df) + 1))  # a pass large enough to export
    assert uses_onnx(tr)


def test_the_eager_out_of_fold_pass_is_float32_whatever_the_training_precision(ham_sample, tmp_path):
    """The calibration is fitted on the out-of-fold numbers and applied to the engine's float32 ones: a model trained
    under bf16 autocast (a GPU, a bf16 CPU) still gets a float32 out-of-fold pass."""
    import torch

    from dermfusion.training.out_of_fold import predict_out_of_fold

    tr = _trainer(load_config("tiny_cpu", ["train.oof_backend=eager"]), ham_sample, tmp_path / "bf16")
    tr.setup()
    model = tr.model.eval()
    tr.amp = torch.bfloat16  # as `precision: bf16` / `fast` on such a machine sets it
    out_of_fold = predict_out_of_fold(tr, model, tta=1)
    assert np.array_equal(out_of_fold, tr.predict(tr.val_df, model, tta=1, exact=True))
    validation = tr.predict(tr.val_df, model, tta=1)  # per-epoch validation keeps the training precision
    assert np.abs(validation - out_of_fold).max() > 1e-4  # before: the out-of-fold pass was this one


def test_progressive_resizing_trains_at_the_scheduled_size_and_evaluates_at_the_backbone_size(ham_sample, tmp_path):
    cfg = load_config("tiny_cpu", ["train.epochs=3", "train.max_steps_per_epoch=1", "train.epoch_sizes=[32,48]",
                                   "model.encoder.dynamic_img_size=true"])
    tr = _trainer(cfg, ham_sample, tmp_path / "run")
    tr.setup()
    seen = {}
    for epoch in range(3):
        batch = next(iter(tr.train_loader(range(epoch, epoch + 1))))
        seen[epoch] = tuple(batch["images"]["dermoscopic"].shape[-2:])
    assert seen == {0: (32, 32), 1: (48, 48), 2: (48, 48)}  # the last size repeats
    val = next(iter(tr._loader(tr.val_df)))
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
    from dermfusion.runtime import device as runtime

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


def test_train_threads_must_not_be_negative():
    from dermfusion.config import ConfigError

    with pytest.raises(ConfigError, match="threads"):
        load_config("tiny_cpu", ["train.threads=-1"])


def test_profile_separates_pipeline_start_up_from_steady_state_input_wait(ham_sample, tmp_path):
    from dermfusion.training.cv import train_cv

    cfg = load_config("tiny_cpu", ["train.epochs=2", "train.max_steps_per_epoch=3", f"data.cache_dir={tmp_path / 'cache'}",
                                   "train.threads=2"])
    summary = train_cv(cfg, ham_sample, tmp_path / "run", folds="0", profile=True)
    prof = summary["profile"][0]
    assert (prof["compute_threads"], prof["loader_workers"]) == (2, 0)  # train.threads applied during the run …
    assert torch.get_num_threads() == 1  # … and the caller's setting restored afterwards
    assert prof["startup_s"] > 0 and prof["compute_s"] > 0 and prof["data_wait_s"] >= 0
    assert prof["data_wait_frac"] == pytest.approx(prof["data_wait_s"] / (prof["data_wait_s"] + prof["compute_s"]))
    log = pd.read_json(tmp_path / "run" / "fold_0" / "log.jsonl", lines=True)
    assert log["startup_s"].iloc[0] > 0  # the fold's first batch: loader built, first images decoded
    assert prof["startup_s"] == pytest.approx(log["startup_s"].sum())


def _fold_batches(cfg, df, out, epochs=3):
    """Every training batch of ``epochs`` epochs through the trainer's loader, per epoch, and the worker pids."""
    tr = _trainer(cfg, df, out)
    tr.setup()
    it = iter(tr.train_loader(range(epochs)))
    batches = {e: [next(it) for _ in range(tr.steps_per_epoch())] for e in range(epochs)}
    with pytest.raises(StopIteration):
        next(it)
    return batches, sorted(w.pid for w in getattr(it, "_workers", []))


def test_one_training_loader_streams_every_epoch_at_its_scheduled_size(ham_sample, tmp_path):
    cfg = load_config("tiny_cpu", ["data.num_workers=1", "train.epoch_sizes=[32,48]",
                                   "model.encoder.dynamic_img_size=true"])
    batches, pids = _fold_batches(cfg, ham_sample, tmp_path / "run")
    assert len(pids) == 1  # one worker process for the whole fold
    assert {e: {tuple(b["images"]["dermoscopic"].shape[-2:]) for b in bs} for e, bs in batches.items()} == \
        {0: {(32, 32)}, 1: {(48, 48)}, 2: {(48, 48)}}
    assert all(len(b["lesion_id"]) == cfg.train.batch_size for bs in batches.values() for b in bs)


def test_only_the_first_epoch_of_a_fold_pays_pipeline_start_up(ham_sample, tmp_path):
    cfg = load_config("tiny_cpu", ["train.epochs=3", "train.max_steps_per_epoch=2", "data.num_workers=1",
                                   f"data.cache_dir={tmp_path / 'cache'}"])
    tr = _trainer(cfg, ham_sample, tmp_path / "run")
    tr.run()
    log = pd.read_json(tmp_path / "run" / "log.jsonl", lines=True)
    assert log["startup_s"].iloc[0] > 0 and (log["startup_s"].iloc[1:] == 0).all()
    assert (log["steps"] == 2).all()


def test_augmented_batches_do_not_depend_on_the_number_of_loader_workers(ham_sample, tmp_path):
    base = ["train.epoch_sizes=[32,48]", "model.encoder.dynamic_img_size=true"]
    b0, _ = _fold_batches(load_config("tiny_cpu", base + ["data.num_workers=0"]), ham_sample, tmp_path / "w0", 2)
    b2, _ = _fold_batches(load_config("tiny_cpu", base + ["data.num_workers=2"]), ham_sample, tmp_path / "w2", 2)
    for epoch in (0, 1):
        for x, y in zip(b0[epoch], b2[epoch], strict=True):
            assert x["lesion_id"] == y["lesion_id"]
            assert torch.equal(x["images"]["dermoscopic"], y["images"]["dermoscopic"])
    # each (epoch, lesion) key has its own fixed augmentation: repeatable, and different in another epoch
    tr = _trainer(load_config("tiny_cpu"), ham_sample, tmp_path / "ds")
    tr.setup()
    data = tr.train_loader(range(2)).dataset
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, again, other = data[(0, 3)], data[(0, 3)], data[(1, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left untouched
    assert torch.equal(a["images"]["dermoscopic"], again["images"]["dermoscopic"])
    assert not torch.equal(a["images"]["dermoscopic"], other["images"]["dermoscopic"])


class _Items(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"images": {"dermoscopic": torch.full((3, 8, 8), float(i)), "clinical": torch.zeros(3, 300, 300)},
                "numeric": torch.tensor([i, -i], dtype=torch.float32), "present": torch.tensor([i % 2 == 0]),
                "lesion_id": f"L{i}"}


def test_batch_loader_hands_over_the_batches_collate_made():
    from dermfusion.data.dataset import collate
    from dermfusion.data.loading import BatchLoader

    plain = list(torch.utils.data.DataLoader(_Items(), batch_size=4, collate_fn=collate))
    packed = list(BatchLoader(_Items(), batch_size=4, collate_fn=collate, num_workers=1))
    assert len(plain) == len(packed) == 2
    for a, b in zip(plain, packed):
        assert a["lesion_id"] == b["lesion_id"]
        for key in ("numeric", "present"):
            assert isinstance(b[key], torch.Tensor) and b[key].dtype == a[key].dtype and torch.equal(a[key], b[key])
        for m in ("dermoscopic", "clinical"):  # small (pickled) and large (shared memory) image batches alike
            assert isinstance(b["images"][m], torch.Tensor) and torch.equal(a["images"][m], b["images"][m])


def test_an_ensemble_recipe_trains_every_member_and_calibrates_their_average(ham_sample, tmp_path):
    """`members:` trains one model per entry into one run; the OOF file is the members' average (what
    `predict RUN` outputs before calibration) and every bundle carries the one calibration fitted on it."""
    import json

    from dermfusion.inference import load_run
    from dermfusion.training.cv import train_cv

    cfg = load_config("tiny_cpu", ["train.epochs=1", "train.max_steps_per_epoch=2",
                                   "members=[{}, {train.seed: 1, data.aug_strength: 0.5}]"])
    out = tmp_path / "run"
    summary = train_cv(cfg, ham_sample, out, folds="all")
    assert sorted(summary["bundles"]) == sorted(f"member_{i}/fold_{f}/bundle" for i in (0, 1) for f in (0, 1))
    assert not any((out / f"member_{i}" / "oof.csv").exists() for i in (0, 1))  # one run, one set of run files
    oof = pd.read_csv(out / "oof.csv", dtype={"lesion_id": str}).set_index("lesion_id")
    members = [load_run(out / f"member_{i}" / f"fold_{f}" / "bundle") for i in (0, 1) for f in (0, 1)]
    rows = ham_sample[ham_sample["fold"] == 0].head(3)
    raw = np.mean([m.predict_raw(rows) for m in members if m.bundle.config["fold"] == 0], axis=0)
    assert np.allclose(oof.loc[rows["lesion_id"].astype(str), list(ISIC2018.classes)].to_numpy(), raw, atol=1e-4)
    calibrations = {json.dumps(json.loads((out / b / "calibration.json").read_text()), sort_keys=True)
                    for b in summary["bundles"]}
    assert len(calibrations) == 1 and "temperature" in calibrations.pop()
    assert (out / "oof_calibrated.csv").exists()


def test_the_run_records_which_lesions_its_models_trained_on(tmp_path):
    """training_lesions.txt: what `operating-point --local` must refuse. Fold model f trains on the labelled lesions
    of the other folds and the train-only rows, so only a single-fold run leaves main-dataset lesions out; folds a
    resumed run trained before count too; without the record, an older run's out-of-fold lesions stand in only where
    two or more folds trained (a single fold's out-of-fold lesions are exactly the ones it never saw)."""
    from dermfusion.tasks import ISIC2018
    from dermfusion.training.lesion_record import read_training_lesions, write_training_lesions

    df = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(9)], "fold": [0, 0, 1, 1, 2, 2, -1, 0, -1],
                       "train_only": [False] * 6 + [True, False, False]})
    for c in ISIC2018.label_columns():
        df[c] = 0.0
    df.loc[7, ISIC2018.label_columns()] = np.nan          # unlabelled: never trained on
    # L8: fold -1 but not train-only (a test row): never trained on
    write_training_lesions(tmp_path, df, ISIC2018, [0])
    assert read_training_lesions(tmp_path) == {"L2", "L3", "L4", "L5", "L6"}   # fold 0 unseen, train-only row seen
    write_training_lesions(tmp_path, df, ISIC2018, [1])                         # resumed with fold 1
    assert read_training_lesions(tmp_path) == {f"L{i}" for i in range(7)}
    refit = tmp_path / "refit"
    refit.mkdir()
    write_training_lesions(refit, df, ISIC2018, [-1])                           # a full-data refit
    assert read_training_lesions(refit) == {f"L{i}" for i in range(7)}
    older = tmp_path / "older"                          # trained folds 0-1 before the record existed, resumed with 2
    for f in (0, 1):
        (older / f"fold_{f}" / "bundle").mkdir(parents=True)
    write_training_lesions(older, df, ISIC2018, [2])
    assert read_training_lesions(older) == {f"L{i}" for i in range(7)}          # fold 2 trained the older folds
    oof_only = tmp_path / "oof_only"
    oof_only.mkdir()
    pd.DataFrame({"lesion_id": ["L0", "L1"], "fold": [0, 0]}).to_csv(oof_only / "oof.csv", index=False)
    assert read_training_lesions(oof_only) is None
    pd.DataFrame({"lesion_id": ["L0", "L2"], "fold": [0, 1]}).to_csv(oof_only / "oof.csv", index=False)
    assert read_training_lesions(oof_only) == {"L0", "L2"}
