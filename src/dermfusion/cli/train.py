"""``dermfusion train``: cross-validated training (single process, or under torchrun)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer

from ..console import console
from .common import manifest as load_manifest

_FOLD_PARALLEL_TIMEOUT_S = 7 * 24 * 3600


def train_cmd(
    config: str = typer.Argument(..., help="YAML config path or a built-in name (e.g. tiny_cpu, ham10000_cpu)"),
    manifest: Path = typer.Option(..., help="training manifest with folds"),
    out: Path = typer.Option(..., help="run directory (re-running resumes from its checkpoints)"),
    folds: Optional[str] = typer.Option(None, help="'all' (default), a list like 0,1, or 'full' for one model on all data"),
    set_: List[str] = typer.Option([], "--set", help="override a config value, e.g. --set train.epochs=3"),
    profile: bool = typer.Option(False, "--profile", help="print the data-wait vs compute breakdown per fold"),
    fold_parallel: bool = typer.Option(False, "--fold-parallel",
                                       help="under torchrun: each process trains its own folds (folds[rank::world], "
                                            "no DDP); rank 0 gathers the out-of-fold predictions and calibrates"),
):
    """Train (cross-validated) models: per-fold bundles, out-of-fold probabilities, calibration.

    Multi-GPU / multi-node: run the same command under torchrun, e.g.
    `torchrun --nproc-per-node 4 --no-python dermfusion train …` (train.batch_size stays the global batch)."""
    from ..config import load_config
    from ..runtime.distributed import distributed_session, record_errors
    from ..training.cv import train_cv

    cfg = load_config(config, set_)  # a misspelt key in any section fails here, before anything runs
    if model_family(cfg) in experimental_families():
        console.print(f"[yellow]{model_family(cfg)} is experimental[/]: it has no real-data figure yet (README, "
                      "\"Model zoo\"); judge it on your own held-out data")

    def run() -> None:
        # fold-parallel ranks only exchange results (gloo), and may wait for the slowest fold: no short timeout
        session = (distributed_session(cfg.train.device, backend="gloo", timeout_s=_FOLD_PARALLEL_TIMEOUT_S)
                   if fold_parallel else distributed_session(cfg.train.device))
        with session as ctx:
            summary = train_cv(cfg, load_manifest(manifest), out, folds=folds, profile=profile,
                               fold_parallel=fold_parallel, dist=ctx)
            if not ctx.is_main:
                return
            if profile and "profile" in summary:
                from rich.table import Table
                t = Table(title="training-step breakdown",
                          caption="start-up: the fold's first batch (loader built, workers forked, first images "
                                  "decoded; later epochs' batches are prefetched); workers: loader processes "
                                  "(data.num_workers); threads: torch compute threads (train.threads); input-bound "
                                  "share: data wait / (data wait + compute), without and with the start-up")
                for c in ("fold", "workers", "threads", "start-up (s)", "data wait (s)", "compute (s)",
                          "input-bound share", "incl. start-up"):
                    t.add_column(c, justify="right")
                for f, p in summary["profile"].items():
                    t.add_row(str(f), str(p.get("loader_workers", "?")), str(p.get("compute_threads", "?")),
                              f"{p.get('startup_s', 0.0):.2f}", f"{p['data_wait_s']:.2f}",
                              f"{p['compute_s']:.2f}", f"{p['data_wait_frac']:.1%}", f"{p['input_bound_frac']:.1%}")
                console.print(t)
            console.print(f"[green]done[/]: bundles and out-of-fold predictions in {out}")

    record_errors(run)()


def model_zoo() -> list[dict]:
    """The model families and their configs (``models/zoo.json``: the table README's "Model zoo" follows), read
    as data so that ``dermfusion --help`` imports no model code."""
    return json.loads((resources.files("dermfusion") / "models" / "zoo.json").read_text(encoding="utf-8"))["families"]


def experimental_families() -> list[str]:
    """The families without a real-data figure yet."""
    return [f["family"] for f in model_zoo() if f["experimental"]]


def model_family(cfg) -> str:
    """A config's family as the zoo names it: the network's registered name, or ``tabular:<backend>``."""
    return f"tabular:{cfg.model.backend}" if cfg.model.kind == "tabular" else cfg.model.name


train_cmd.__doc__ += ("\n\nExperimental model families (no real-data figure yet: README, \"Model zoo\"): "
                      + ", ".join(experimental_families()) + ".")
