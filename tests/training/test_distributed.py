"""Multi-process training and prediction under torchrun (2 CPU processes, gloo) on the bundled fixture.

Every torchrun launch goes through ``python -m torch.distributed.run --standalone`` (a free port per launch)
with OMP_NUM_THREADS=1. The launchers written to tmp are the ``dermfusion`` console script, optionally with
augmentation switched off for the weight-equivalence check (``data.aug_strength=0`` still draws random
crops' aspect ratios and flips, so the launcher swaps in the evaluation transform).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cli_helpers import squash

from dermfusion.data.samplers import DistributedWeightedSampler, ShardedEvalSampler, shard_bounds
from dermfusion.tasks import ISIC2018

NPROC = 2
DETERMINISTIC = ["--set", "model.dropout=0", "--set", "model.modality_dropout=0"]
SHORT = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2"]
# the DDP run: 3 micro-steps of 8 lesions, 2 accumulated per update (exercises DDP's no_sync)
DDP_SETS = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3", "--set", "optim.accumulate=2",
            *DETERMINISTIC]

LAUNCHER = """
import sys
from dermfusion.cli import main
sys.argv = ["dermfusion", *sys.argv[1:]]
main()
"""
LAUNCHER_NOAUG = """
import sys
import dermfusion.data.dataset as ds
from dermfusion.data.transforms import eval_transform
ds.train_transform = lambda modality, pre, strength=1.0: eval_transform(pre)
from dermfusion.cli import main
sys.argv = ["dermfusion", *sys.argv[1:]]
main()
"""

HELPER = """
import json, os, sys
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from dermfusion.config import load_config
from dermfusion.data.dataset import class_balanced_sampler
from dermfusion.data.manifest import load_manifest
from dermfusion.inference.predict_loop import predict_frame_sharded
from dermfusion.tasks import ISIC2018
from dermfusion.runtime.distributed import DistributedError, distributed_session
from dermfusion.training.engine import FoldTrainer
from dermfusion.training.epoch_log import NullProgress

manifest, out = sys.argv[1], sys.argv[2]
df = load_manifest(manifest)


class Stop(Exception):
    pass


with distributed_session("cpu") as ctx:
    rec = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend}
    cfg = load_config("tiny_cpu", ["train.batch_size=8"])
    tr = FoldTrainer(cfg, ISIC2018, df, 0, os.path.join(out, "fold_0"), dist=ctx)
    tr.setup()
    rec["ddp"] = type(tr.step_model).__name__
    rec["batch_per_rank"] = tr.batch_per_rank
    # 1. this rank's share of epoch 3, through the trainer's own loader, next to the single-process draw
    loader = tr.train_loader(range(3, 4))
    rec["indices"] = list(loader.batch_sampler.make_sampler(3))
    rec["global"] = loader.batch_sampler.make_sampler(3).global_indices()
    rec["single_process"] = list(class_balanced_sampler(loader.dataset.targets, cfg.train.sampler_power,
                                                         seed=tr._seed(3)))
    rec["batched"] = [i for b in loader.batch_sampler for _, i in b]
    rec["batch_sizes"] = [len(b["lesion_id"]) for b in loader]
    # 2. gradients after the all-reduce of the first optimiser step: max - min over ranks, per parameter
    spread, nonzero = {}, 0

    def check(trainer, epoch, step):
        global nonzero
        for name, p in trainer.model.named_parameters():
            if p.grad is None or p.grad.numel() == 0:
                continue
            hi, lo = p.grad.detach().clone(), p.grad.detach().clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            spread[name] = float((hi - lo).abs().max())
            nonzero += int(p.grad.abs().sum() > 0)

    def stop(trainer, epoch, step):
        raise Stop()

    tr.on_before_optimizer_step, tr.on_step_end = check, stop
    try:
        tr.train_epoch(0, NullProgress())
    except Stop:
        pass
    rec["grad_spread"], rec["grad_nonzero"] = spread, nonzero
    # 3. a failure on one rank is reported on every rank, no rank left waiting
    def predict(part):
        if ctx.rank == 1:
            raise ValueError("injected failure on this rank")
        return np.ones((len(part), 7))
    try:
        predict_frame_sharded(predict, df, ctx, what="injected prediction")
        rec["failure"] = None
    except DistributedError as e:
        rec["failure"] = str(e)
    with open(os.path.join(out, f"rank{ctx.rank}.json"), "w") as fh:
        json.dump(rec, fh)
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def torchrun(script: Path, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DERMFUSION_PROGRESS": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(NPROC),
           str(script), *map(str, args)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    res.seconds = time.perf_counter() - t0
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def manifest(ham_sample, tmp_path_factory) -> Path:
    from dermfusion.data.manifest import save_manifest

    path = tmp_path_factory.mktemp("dist_manifest") / "train.parquet"
    save_manifest(ham_sample, path)
    return path


@pytest.fixture(scope="module")
def ddp_run(manifest, tmp_path_factory) -> Path:
    """`dermfusion train tiny_cpu` under torchrun, 2 processes, both folds, deterministic data and model."""
    work = tmp_path_factory.mktemp("ddp_run")
    script = _write(work / "launch_noaug.py", LAUNCHER_NOAUG)
    torchrun(script, ["train", "tiny_cpu", "--manifest", manifest, "--out", work / "run", *DDP_SETS], cwd=work)
    return work / "run"


# ---- samplers (in process) --------------------------------------------------------------------------------
def test_distributed_sampler_world_of_one_is_the_single_process_sampler():
    from dermfusion.data.dataset import class_balanced_sampler

    y = np.eye(4, dtype=np.float32)[np.random.default_rng(0).integers(0, 4, 37)]
    single = class_balanced_sampler(y, 0.5, seed=123)
    assert type(single).__name__ == "WeightedRandomSampler"  # the single-process path is untouched
    w = single.weights
    assert list(DistributedWeightedSampler(w, 37, seed=123)) == list(single)


@pytest.mark.parametrize("n,world", [(37, 2), (36, 4), (5, 3), (48, 8)])
def test_distributed_sampler_shares_are_disjoint_slices_of_one_epoch(n, world):
    w = np.random.default_rng(1).random(n)
    shares = [list(DistributedWeightedSampler(w, rank=r, world_size=world, seed=7, epoch=2)) for r in range(world)]
    full = DistributedWeightedSampler(w, world_size=world, seed=7, epoch=2).global_indices()
    assert len({len(s) for s in shares}) == 1 and len(full) % world == 0 and len(full) - n < world
    for r, s in enumerate(shares):  # disjoint positions of the same draw, together the whole (padded) epoch
        assert s == full[r::world]
    assert sorted(sum(shares, [])) == sorted(full)
    # the first B/world of every rank together are the first B of the single-process epoch
    b = world * 2
    assert sorted(sum((s[:2] for s in shares), [])) == sorted(full[:b])
    other = DistributedWeightedSampler(w, world_size=world, seed=7, epoch=3).global_indices()
    assert other != full  # a new epoch draws anew


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (47, 2), (48, 5), (3, 8)])
def test_sharded_eval_sampler_covers_each_index_once(n, world):
    got = [i for r in range(world) for i in ShardedEvalSampler(n, r, world)]
    assert got == list(range(n))
    assert sum(shard_bounds(n, r, world)[1] - shard_bounds(n, r, world)[0] for r in range(world)) == n


def test_gather_indexed_keeps_each_row_once():
    from dermfusion.runtime.distributed import DistContext, gather_indexed

    class Fake(DistContext):
        def all_gather_object(self, obj):
            return [([0, 1, 2], np.full((3, 2), 1.0)), ([2, 3], np.full((2, 2), 2.0))]

    out = gather_indexed(Fake(), [], np.zeros((0, 2)), 4)
    assert out[:, 0].tolist() == [1.0, 1.0, 1.0, 2.0]


def test_unused_parameter_probe_finds_idle_aux_heads(ham_sample, tmp_path):
    from dermfusion.config import load_config
    from dermfusion.training.engine import FoldTrainer

    used = FoldTrainer(load_config("tiny_cpu"), ISIC2018, ham_sample, 0, tmp_path / "a")
    used.setup()
    assert used._probe_unused() == []
    idle = FoldTrainer(load_config("tiny_cpu", ["loss.aux_weight=0"]), ISIC2018, ham_sample, 0, tmp_path / "b")
    idle.setup()
    before = {k: v.clone() for k, v in idle.model.state_dict().items()}
    names = idle._probe_unused()
    assert names and all(n.startswith("aux_heads.") for n in names)
    assert all(torch.equal(before[k], v) for k, v in idle.model.state_dict().items())  # probing changes nothing


def test_sync_batchnorm_conversion_keeps_state_dict_keys():
    from dermfusion.training.ddp import convert_sync_batchnorm, has_batchnorm

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    assert has_batchnorm(net)
    conv = convert_sync_batchnorm(net)
    assert isinstance(conv[1], torch.nn.SyncBatchNorm)
    assert list(conv.state_dict()) == list(net.state_dict())


# ---- torchrun, 2 processes ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_sampler_shares_gradients_and_failure_reporting(manifest, tmp_path):
    script = _write(tmp_path / "helper.py", HELPER)
    torchrun(script, [manifest, tmp_path], cwd=tmp_path)
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(NPROC)]
    assert [r["rank"] for r in recs] == [0, 1] and {r["backend"] for r in recs} == {"gloo"}
    assert {r["ddp"] for r in recs} == {"DistributedDataParallel"} and {r["batch_per_rank"] for r in recs} == {4}
    # the same global epoch on both ranks = the single-process epoch; each rank a disjoint interleaved share
    glob = recs[0]["global"]
    assert recs[1]["global"] == glob
    assert glob[:len(recs[0]["single_process"])] == recs[0]["single_process"]
    for r, rec in enumerate(recs):
        assert rec["indices"] == glob[r::NPROC]
        assert set(rec["batch_sizes"]) == {4}
        assert rec["batched"] == rec["indices"][:len(rec["batched"])] and rec["batched"]  # the loader's batches
    assert sorted(recs[0]["indices"] + recs[1]["indices"]) == sorted(glob)
    # gradients identical on both ranks after the all-reduce
    spread = recs[0]["grad_spread"]
    assert spread and recs[1]["grad_spread"].keys() == spread.keys()
    assert max(spread.values()) == 0.0
    assert recs[0]["grad_nonzero"] > 0
    # rank 1's failure is reported on both ranks, with the rank and the message
    for rec in recs:
        assert rec["failure"] and "rank 1" in rec["failure"] and "injected failure" in rec["failure"]


@pytest.mark.slow
def test_ddp_oof_has_every_lesion_exactly_once(ddp_run, ham_sample):
    oof = pd.read_csv(ddp_run / "oof.csv", dtype={"lesion_id": str})
    assert oof["lesion_id"].is_unique
    assert sorted(oof["lesion_id"]) == sorted(ham_sample["lesion_id"].astype(str))
    for f in (0, 1):  # and each in its own fold
        want = set(ham_sample.loc[ham_sample["fold"] == f, "lesion_id"].astype(str))
        assert set(oof.loc[oof["fold"] == f, "lesion_id"]) == want
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["mode"] == "data_parallel" and summary["oof"]["n"] == len(oof)
    assert not list(ddp_run.rglob(".*tmp*"))  # checkpoints and bundles renamed into place


def test_ddp_weights_match_single_process_same_global_batch(ddp_run, ham_sample, tmp_path, monkeypatch):
    import dermfusion.data.dataset as ds
    from dermfusion.config import load_config
    from dermfusion.data.transforms import eval_transform
    from dermfusion.training.engine import FoldTrainer

    monkeypatch.setattr(ds, "train_transform", lambda modality, pre, strength=1.0: eval_transform(pre))
    sets = [a for a in DDP_SETS if a != "--set"]
    FoldTrainer(load_config("tiny_cpu", sets), ISIC2018, ham_sample, 0, tmp_path / "single").run()
    single = torch.load(tmp_path / "single" / "last.ckpt", weights_only=False)
    ddp = torch.load(ddp_run / "fold_0" / "last.ckpt", weights_only=False)
    assert single["model"].keys() == ddp["model"].keys()
    diff = max(float((single["model"][k].float() - ddp["model"][k].float()).abs().max())
               for k in single["model"] if single["model"][k].numel())
    start = FoldTrainer(load_config("tiny_cpu", sets), ISIC2018, ham_sample, 0, tmp_path / "init")
    start.setup()
    moved = max(float((single["model"][k].float() - v.float()).abs().max())
                for k, v in start.model.state_dict().items() if v.numel())
    assert moved > 1e-3        # training did move the weights …
    assert diff < 1e-4, diff   # … and 2 processes × 4 lesions moved them as 1 process × 8 lesions did
    assert single["history"][0]["loss"] == pytest.approx(ddp["history"][0]["loss"], abs=1e-5)


def test_checkpoint_from_two_processes_resumes_in_one(ddp_run, ham_sample, tmp_path):
    import shutil

    from dermfusion.config import load_config
    from dermfusion.training.engine import FoldTrainer

    run = tmp_path / "fold_0"
    shutil.copytree(ddp_run / "fold_0", run)
    sets = [a for a in DDP_SETS if a != "--set"] + ["train.epochs=2"]
    res = FoldTrainer(load_config("tiny_cpu", sets), ISIC2018, ham_sample, 0, run).run()
    assert [h["epoch"] for h in res.history] == [1, 2]


@pytest.mark.slow
def test_distributed_predict_matches_single_process(ddp_run, manifest, tmp_path):
    from typer.testing import CliRunner

    from dermfusion.cli import app

    script = _write(tmp_path / "launch.py", LAUNCHER)
    # a pinned backend: `auto` chooses by timing, which may differ between two separate runs
    res = torchrun(script, ["predict", ddp_run, "--manifest", manifest, "--out", tmp_path / "p2.csv",
                            "--backend", "fp32"], cwd=tmp_path)
    assert "from 2 processes" in squash(res.stdout)
    one = CliRunner().invoke(app, ["predict", str(ddp_run), "--manifest", str(manifest),
                                   "--out", str(tmp_path / "p1.csv"), "--backend", "fp32"])
    assert one.exit_code == 0, one.output
    p1 = pd.read_csv(tmp_path / "p1.csv", dtype={"image": str})  # ISIC 2018 files are headed `image`
    p2 = pd.read_csv(tmp_path / "p2.csv", dtype={"image": str})
    assert p2["image"].tolist() == p1["image"].tolist()  # one merged file, manifest order
    np.testing.assert_allclose(p2[list(ISIC2018.classes)].to_numpy(), p1[list(ISIC2018.classes)].to_numpy(),
                               atol=2e-6)


@pytest.mark.slow
def test_fold_parallel_gathers_oof_once_and_matches_sequential(manifest, ham_sample, tmp_path):
    from dermfusion.config import load_config
    from dermfusion.training.cv import train_cv

    script = _write(tmp_path / "launch.py", LAUNCHER)
    res = torchrun(script, ["train", "tiny_cpu", "--manifest", manifest, "--out", tmp_path / "fp", *SHORT,
                            "--fold-parallel"], cwd=tmp_path)
    assert "fold 0 (rank 0)" in squash(res.stdout) and "fold 1 (rank 1)" in squash(res.stdout)
    oof = pd.read_csv(tmp_path / "fp" / "oof.csv", dtype={"lesion_id": str})
    assert oof["lesion_id"].is_unique and sorted(oof["lesion_id"]) == sorted(ham_sample["lesion_id"].astype(str))
    summary = json.loads((tmp_path / "fp" / "summary.json").read_text())
    assert summary["mode"] == "fold_parallel" and "calibration" in summary
    # each rank ran its fold exactly as the sequential single-process run does (same seeds per fold)
    seq = train_cv(load_config("tiny_cpu", [a for a in SHORT if a != "--set"]), ham_sample, tmp_path / "seq")
    assert seq["folds"] == [0, 1]
    ref = pd.read_csv(tmp_path / "seq" / "oof.csv", dtype={"lesion_id": str})
    assert ref["lesion_id"].tolist() == oof["lesion_id"].tolist()
    np.testing.assert_allclose(oof[list(ISIC2018.classes)].to_numpy(), ref[list(ISIC2018.classes)].to_numpy(),
                               atol=1e-5)
