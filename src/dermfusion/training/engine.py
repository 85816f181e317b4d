"""Training one fold: data loaders, model, optimiser, the epoch loop, checkpoint/resume (the fold bundle:
``fold_bundle``; the epoch log: ``epoch_log``).

Determinism: every epoch re-seeds all RNGs from (seed, fold, epoch), so an epoch's augmentations,
sampling and dropout depend only on those numbers. Resuming from the checkpoint of epoch e then
replays epoch e+1 exactly as the uninterrupted run would have.

Under torchrun (see ``runtime.distributed`` and ``training.ddp``) the same loop runs on every rank with a DDP-wrapped model:
``train.batch_size`` stays the global batch (``batch_size / world`` per rank, drawn from one shared weighted
epoch), the loss is computed on the gathered global batch, validation is sharded and gathered, and only
rank 0 writes logs, checkpoints and the bundle. A single process takes exactly the code path it always did.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, ExperimentConfig
from ..console import console, make_progress
from ..data.dataset import LesionDataset, class_balanced_sampler, collate, hard_case_factors, scheduled_size
from ..data.loading import BatchLoader
from ..data.manifest import targets, train_only_mask
from ..data.samplers import EpochBatchSampler, ShardedEvalSampler
from ..inference.predict_loop import predict_probs
from ..models.factory import build_model, feature_spec_for, preprocess_of
from ..runtime.device import (autocast, autocast_dtype, default_num_workers, move_batch, resolve_device,
                              seed_everything)
from ..runtime.distributed import RANK_SEED_STRIDE, DistContext, current, gather_indexed
from ..tasks import TaskSpec
from .checkpoint import save_atomic
from .ddp import (convert_sync_batchnorm, find_unused_setting, gather_for_loss, has_batchnorm,
                  load_checkpoint_everywhere, unused_parameters, wrap_ddp)
from .ema import ModelEMA
from .epoch_log import NullProgress, epoch_line, tensorboard_writer
from .fold_bundle import write_fold_bundle
from .losses import build_loss
from .optim import build_param_groups, build_scheduler
from .out_of_fold import predict_out_of_fold
from .val_metrics import epoch_metrics


@dataclass
class FoldResult:
    fold: int
    oof: pd.DataFrame               # lesion_id + class probabilities for the validation fold
    metrics: dict
    bundle: Path
    history: list = field(default_factory=list)


class FoldTrainer:
    """One fold's training. ``dist``: the torchrun context (default: the current session's, a plain single
    process outside torchrun). Hooks for tests and tools: ``on_before_optimizer_step(trainer, epoch, step)``
    runs after the (all-reduced) backward of an optimiser step, ``on_step_end(trainer, epoch, step)`` after
    every step."""

    def __init__(self, cfg: ExperimentConfig, task: TaskSpec, df: pd.DataFrame, fold: int, out: Path,
                 profile: bool = False, dist: DistContext | None = None):
        self.cfg, self.task, self.fold, self.out, self.profile = cfg, task, fold, Path(out), profile
        self.dist = dist if dist is not None else current()
        self.world = self.dist.world_size if self.dist.distributed else 1
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must divide evenly "
                              f"over {self.world} processes (per-process batch = batch_size / world size)")
        self.batch_per_rank = cfg.train.batch_size // self.world
        self.on_before_optimizer_step = None
        self.on_step_end = None
        self._train_iter, self._train_iter_epoch = None, None
        self.device = self.dist.device(cfg.train.device) if self.dist.launched else resolve_device(cfg.train.device)
        self.amp = autocast_dtype(self.device, cfg.train.precision)
        self.channels_last = cfg.train.channels_last and self.device.type in {"cuda", "cpu"}
        # rows of a dataset added for training only (``dermfusion data combine``) train every fold, validate none
        extra = train_only_mask(df)
        if fold >= 0:
            self.train_df = df[((df["fold"] >= 0) & (df["fold"] != fold)) | extra].reset_index(drop=True)
            self.val_df = df[(df["fold"] == fold) & ~extra].reset_index(drop=True)
        else:  # full-data refit: no validation fold
            self.train_df, self.val_df = df[(df["fold"] >= 0) | extra].reset_index(drop=True), df.iloc[:0]
        if len(self.train_df) == 0:
            raise ValueError(f"fold {fold}: no training lesions (does the manifest have folds? run `dermfusion folds`)")
        self.spec = feature_spec_for(cfg, task, df)

    # ---- construction -------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict:
        workers = default_num_workers(self.device) if self.cfg.data.num_workers < 0 else self.cfg.data.num_workers
        kw = dict(num_workers=workers, collate_fn=collate, pin_memory=self.device.type == "cuda")
        if workers > 0:
            kw["prefetch_factor"] = 4
        return kw

    def _cache_dir(self) -> str | None:
        return str(Path(self.cfg.data.cache_dir).expanduser()) if self.cfg.data.cache_dir else None

    def train_loader(self, epochs: range) -> DataLoader:
        """A training loader over ``epochs`` (one stream of ``steps_per_epoch()`` batches per epoch): its worker
        processes, if any, are forked once and prefetch across epoch boundaries. The class-balanced draw,
        the progressive-resizing input size and the augmentation seeds follow from each batch's epoch."""
        cfg = self.cfg
        ds = LesionDataset(self.train_df, self.task, self.spec, self.preprocess, train=True,
                           cache_dir=self._cache_dir(), aug_strength=cfg.data.aug_strength,
                           epoch_sizes=cfg.train.epoch_sizes, seed=self._seed(-1))
        hard = hard_case_factors(ds.df, cfg.train.hard_cases)  # atypical lesions drawn more often, within class
        batches = EpochBatchSampler(lambda e: class_balanced_sampler(
            ds.targets, cfg.train.sampler_power, seed=self._seed(e), rank=self.dist.rank, world_size=self.world,
            within_class=hard), self.batch_per_rank, self.steps_per_epoch(), epochs)
        return BatchLoader(ds, batch_sampler=batches, **self._loader_kwargs())

    def _epoch_batches(self, epoch: int):
        """(batch iterator positioned at ``epoch``'s first batch, seconds spent starting it — forking the
        workers — or None when the fold's stream simply continues)."""
        fork_s = None
        if self._train_iter is None or self._train_iter_epoch != epoch:  # first epoch, resume, or out of order
            self.close_loaders()
            loader = self.train_loader(range(epoch, max(epoch + 1, self.cfg.train.epochs)))
            t0 = time.perf_counter()
            self._train_iter = iter(loader)  # forks the worker processes
            fork_s = time.perf_counter() - t0
        self._train_iter_epoch = epoch + 1
        return self._train_iter, fork_s

    def close_loaders(self) -> None:
        """Stop the training loader's worker processes."""
        self._train_iter, self._train_iter_epoch = None, None

    def _loader(self, frame: pd.DataFrame) -> DataLoader:
        """An evaluation / prediction loader over ``frame`` (no augmentation, in order)."""
        cfg = self.cfg
        ds = LesionDataset(frame, self.task, self.spec, self.preprocess, train=False, cache_dir=self._cache_dir())
        kw = self._loader_kwargs()
        if self.world > 1:  # contiguous, non-padded shard: every lesion is predicted by exactly one rank

            return BatchLoader(ds, batch_size=cfg.train.eval_batch_size,
                              sampler=ShardedEvalSampler(len(ds), self.dist.rank, self.world), **kw)
        return BatchLoader(ds, batch_size=cfg.train.eval_batch_size, shuffle=False, **kw)

    def _seed(self, epoch: int) -> int:
        return self.cfg.train.seed * 1_000_003 + (self.fold + 1) * 10_007 + epoch

    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(self._seed(-1))
        self.model = build_model(cfg, self.task, self.spec).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = preprocess_of(self.model, self.spec, cfg.data.color_constancy)
        counts = targets(self.train_df, self.task).sum(axis=0)
        loss_cfg = cfg.loss.model_dump()
        if str(loss_cfg["alpha"]).lower() in {"none", "null"}:
            loss_cfg["alpha"] = None
        self.loss_fn = build_loss(loss_cfg, counts, self.task.classes)
        if self.world > 1 and has_batchnorm(self.model):
            if self.device.type == "cuda":  # before the optimiser is built: it must see the converted modules
                self.model = convert_sync_batchnorm(self.model)
            elif self.dist.is_main:
                console.print("[yellow]note:[/] BatchNorm statistics stay per process on CPU "
                              "(SyncBatchNorm needs CUDA)")
        groups = build_param_groups(self.model, lr=cfg.optim.lr, head_lr=cfg.optim.head_lr,
                                    layer_decay=cfg.optim.layer_decay, weight_decay=cfg.optim.weight_decay)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=fused)
        steps = self.steps_per_epoch()
        total = max(1, steps * cfg.train.epochs // cfg.optim.accumulate)
        warm = int(round(cfg.optim.warmup_epochs * steps / cfg.optim.accumulate))
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=warm, total_steps=total)
        self.ema = ModelEMA(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        self.ddp_model = None
        step_model = self.model
        if self.world > 1:
            find_unused = find_unused_setting(self._probe_unused)
            self.ddp_model = wrap_ddp(self.model, self.device, find_unused)
            step_model = self.ddp_model
        self.step_model = torch.compile(step_model) if cfg.train.compile else step_model
        if cfg.train.grad_checkpointing and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)

    def _probe_unused(self) -> list[str]:
        ds = LesionDataset(self.train_df.iloc[:2], self.task, self.spec, self.preprocess, train=False)
        batch = move_batch(collate([ds[i] for i in range(len(ds))]), self.device, self.channels_last)
        return unused_parameters(self.model, self.loss_fn, batch)

    def _loss(self, outputs: dict, target: torch.Tensor):
        if self.world > 1:  # the loss of the global batch (identical on every rank); see gather_for_loss
            outputs, target = gather_for_loss(outputs, target)
        return self.loss_fn(outputs, target)

    def steps_per_epoch(self) -> int:
        bs = self.cfg.train.batch_size
        n = len(self.train_df) // bs if len(self.train_df) > bs else 1
        cap = self.cfg.train.max_steps_per_epoch
        return min(n, cap) if cap else n

    # ---- loop ---------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, progress) -> dict:
        cfg = self.cfg
        batches, fork_s = self._epoch_batches(epoch)  # first: a new loader iterator draws its base seed from the global RNG
        seed_everything(self._seed(epoch) + RANK_SEED_STRIDE * self.dist.rank)  # dropout etc.; data has its own seeds
        self.model.train()
        steps = self.steps_per_epoch()
        task = progress.add_task(f"fold {self.fold} epoch {epoch + 1}/{cfg.train.epochs}", total=steps, info="")
        losses, t_data, t_compute, t_startup = [], 0.0, 0.0, 0.0
        part_sums: dict[str, float] = {}
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for step in range(steps):
            batch = next(batches)
            t1 = time.perf_counter()
            if step == 0 and fork_s is not None:  # pipeline start-up: workers forked, first batch decoded
                t_startup = t1 - t0 + fork_s
            else:  # steady state: the model waited for the input pipeline
                t_data += t1 - t0
            batch = move_batch(batch, self.device, self.channels_last)
            update = (step + 1) % cfg.optim.accumulate == 0 or step + 1 == steps
            # DDP: accumulate locally, all-reduce only on the micro-step that updates
            with (self.ddp_model.no_sync() if self.ddp_model is not None and not update else contextlib.nullcontext()):
                with autocast(self.device, self.amp):
                    outputs = self.step_model(batch)
                    loss, parts = self._loss(outputs, batch["target"])
                (loss / cfg.optim.accumulate).backward()
            if update:
                if self.on_before_optimizer_step is not None:
                    self.on_before_optimizer_step(self, epoch, step)
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema:
                    self.ema.update(self.model)
            if self.device.type == "cuda" and self.profile:
                torch.cuda.synchronize()
            losses.append(float(loss.detach()))
            for name, v in parts.items():  # each term's epoch mean in the log (main, soft-F1, the model's own)
                part_sums[name] = part_sums.get(name, 0.0) + float(v)
            t0 = time.perf_counter()
            t_compute += t0 - t1
            progress.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.3f}")
            if self.on_step_end is not None:
                self.on_step_end(self, epoch, step)
        progress.remove_task(task)
        total = t_data + t_compute
        wall = total + t_startup
        return {"loss": float(np.mean(losses)) if losses else float("nan"),
                "loss_parts": {k: v / len(losses) for k, v in part_sums.items() if k != "total"}, "data_wait_s": t_data,
                "compute_s": t_compute, "startup_s": t_startup,
                "loader_workers": self._loader_kwargs()["num_workers"], "compute_threads": torch.get_num_threads(),
                "data_wait_frac": t_data / total if total else 0.0,
                "steps": len(losses), "lesions_per_s": len(losses) * cfg.train.batch_size / wall if wall else 0.0}

    @torch.no_grad()
    def predict(self, frame: pd.DataFrame, model=None, tta: int = 0, exact: bool = False) -> np.ndarray:
        """``frame``'s probabilities; in the training precision (per-epoch validation), or float32 when ``exact``
        (the out-of-fold pass: what the engine serves)."""
        model = model or (self.ema.module if self.ema else self.model)
        loader = self._loader(frame)
        probs = predict_probs(model, loader, self.device, None if exact else self.amp, self.channels_last, tta=tta,
                              modalities=self.spec.modalities)
        if self.world > 1:  # every rank predicted its shard: gather, in row order, each lesion once
            probs = gather_indexed(self.dist, list(loader.sampler), probs, len(frame))
        return probs

    def predict_out_of_fold(self, model, tta: int = 0) -> np.ndarray:
        """The validation lesions' probabilities from the final weights (``training.out_of_fold``)."""
        return predict_out_of_fold(self, model, tta)

    def _validate_now(self, epoch: int) -> bool:
        """Per-epoch validation: every ``validate_every`` epochs and after the last; ``0`` = never (the fold's
        final, test-time-augmented prediction is scored anyway); always when early stopping needs the score.
        Skipping it saves a forward pass over the fold per epoch (~7% of a 2-core CPU run)."""
        cfg = self.cfg.train
        if cfg.early_stopping_patience:
            return True
        return cfg.validate_every > 0 and ((epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs)

    def evaluate(self, probs: np.ndarray) -> dict:
        return epoch_metrics(self.task, targets(self.val_df, self.task), probs)

    def run(self) -> FoldResult:
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.setup()
        ckpt_path = self.out / "last.ckpt"
        log_path = self.out / "log.jsonl"
        start, best, best_state, history, bad_epochs = 0, -math.inf, None, [], 0
        ck = load_checkpoint_everywhere(self.dist, ckpt_path)
        if ck is not None:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            if self.ema and ck.get("ema") is not None:
                self.ema.module.load_state_dict(ck["ema"])
            start, best, best_state = ck["epoch"] + 1, ck["best"], ck.get("best_state")
            history, bad_epochs = ck["history"], ck.get("bad_epochs", 0)
            if main:
                console.print(f"[cyan]fold {self.fold}: resuming after epoch {start}[/]")
        writer = tensorboard_writer(self.out) if main else None
        with (make_progress() if self.dist.progress else NullProgress()) as progress:
            for epoch in range(start, cfg.train.epochs):
                stats = self.train_epoch(epoch, progress)
                rec = {"fold": self.fold, "epoch": epoch + 1, **stats, "lr": self.scheduler.get_last_lr()[-1]}
                if cfg.train.epoch_sizes:
                    rec["train_size"] = scheduled_size(cfg.train.epoch_sizes, epoch)
                if len(self.val_df) and self._validate_now(epoch):
                    rec.update({f"val_{k}": v for k, v in self.evaluate(self.predict(self.val_df)).items()})
                    score = rec["val_official"]
                    if score > best:
                        best, bad_epochs = score, 0
                        if cfg.train.early_stopping_patience:
                            src = self.ema.module if self.ema else self.model
                            best_state = {k: v.detach().cpu().clone() for k, v in src.state_dict().items()}
                    else:
                        bad_epochs += 1
                history.append(rec)
                if main:  # one writer; the checkpoint holds the unwrapped model: it resumes on any world size
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    if writer:
                        for k, v in rec.items():
                            if isinstance(v, (int, float)):
                                writer.add_scalar(k, v, epoch + 1)
                    console.print(epoch_line(rec))
                    save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                 "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best": best,
                                 "best_state": best_state, "history": history, "bad_epochs": bad_epochs,
                                 "ema": self.ema.module.state_dict() if self.ema else None}, ckpt_path)
                self.dist.barrier()
                if cfg.train.early_stopping_patience and bad_epochs >= cfg.train.early_stopping_patience:
                    if main:
                        console.print(f"fold {self.fold}: early stop after epoch {epoch + 1} (best {best:.4f})")
                    break
        self.close_loaders()
        final = self.ema.module if self.ema else self.model
        if best_state is not None:
            final.load_state_dict(best_state)
        oof = pd.DataFrame(columns=["lesion_id", *self.task.classes])
        metrics = {}
        if len(self.val_df):
            probs = self.predict_out_of_fold(final, tta=cfg.train.tta)
            metrics = self.evaluate(probs)
            oof = pd.DataFrame(probs, columns=list(self.task.classes))
            oof.insert(0, "lesion_id", self.val_df["lesion_id"].to_numpy())
            oof.insert(1, "fold", self.fold)
        bundle = self.write_bundle(final, metrics) if main else self.out / "bundle"
        self.dist.barrier()
        return FoldResult(self.fold, oof, metrics, bundle, history)

    def write_bundle(self, model, metrics: dict) -> Path:
        return write_fold_bundle(self, model, metrics)
