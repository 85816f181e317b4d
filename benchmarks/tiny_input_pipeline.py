"""How input-bound training is on the tiny CPU config: repeated `dermfusion train --profile` runs.

    python benchmarks/tiny_input_pipeline.py [--runs 5] [--threads 2,1] [--epochs 10]

Each run is the README's command, as a new user runs it, on the bundled 48-image HAM10000 sample
(2 folds; fold 0 trained) with the decode cache and one loader worker:

    dermfusion train tiny_cpu --manifest m.parquet --out r --folds 0 --profile --set train.epochs=10
        --set data.cache_dir=cache --set data.num_workers=1 --set train.threads=T

The cache is filled by a first, unreported run. Thread settings are interleaved run by run so a busy host
slows them alike. Prints, per setting, the range and median of the fold's start-up (loader built, workers
forked, first batch ready), steady-state data wait and compute, and the input-bound share without and with
the start-up — the figures of `dermfusion train --profile`, read from each run's summary.json.

``--breakdown N`` instead splits the fold's start-up, N times, each in a fresh process: building the
loader, starting its worker (``iter()``: the fork) and waiting for the worker's first batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(work: Path, threads: int, epochs: int) -> dict:
    out = work / f"r_{threads}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = ["dermfusion", "train", "tiny_cpu", "--manifest", str(work / "m.parquet"), "--out", str(out),
           "--folds", "0", "--profile", "--set", f"train.epochs={epochs}", "--set", f"data.cache_dir={work / 'cache'}",
           "--set", "data.num_workers=1", "--set", f"train.threads={threads}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())["profile"]["0"]


BREAKDOWN = """
import json, sys, time
from pathlib import Path
import pandas as pd
from dermfusion.config import load_config
from dermfusion.tasks import get_task
from dermfusion.training.engine import FoldTrainer
work = Path(sys.argv[1])
cfg = load_config("tiny_cpu", [f"data.cache_dir={work / 'cache'}", "data.num_workers=1", "train.epochs=10"])
trainer = FoldTrainer(cfg, get_task(cfg.task), pd.read_parquet(work / "m.parquet"), 0, work / "breakdown")
trainer.setup()
t0 = time.perf_counter(); loader = trainer.train_loader(range(10))
t1 = time.perf_counter(); it = iter(loader)
t2 = time.perf_counter(); next(it)
t3 = time.perf_counter()
print(json.dumps({"loader_ms": 1000 * (t1 - t0), "start_worker_ms": 1000 * (t2 - t1), "first_batch_ms": 1000 * (t3 - t2)}))
"""


def breakdown(work: Path, n: int) -> None:
    rows = []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", BREAKDOWN, str(work)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for key in rows[0]:
        vals = [r[key] for r in rows]
        print(f"{key}: {min(vals):.1f}–{max(vals):.1f} (median {statistics.median(vals):.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", default="2,1", help="train.threads settings to compare")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--breakdown", type=int, default=0, metavar="N", help="split the start-up instead, N times")
    args = ap.parse_args()
    from dermfusion.demo import sample_dir

    settings = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["dermfusion", "import", "isic", str(sample_dir() / "train.csv"), "--dataset", "ham10000",
                        "--k", "2", "--out", str(work / "m.parquet")], check=True, capture_output=True)
        run_once(work, settings[0], 1)  # fills the decode cache
        if args.breakdown:
            return breakdown(work, args.breakdown)
        results = {t: [] for t in settings}
        for i in range(args.runs):
            for t in settings:
                results[t].append(run_once(work, t, args.epochs))
                p = results[t][-1]
                print(f"run {i + 1} threads={t}: start-up {p['startup_s']:.3f} s, wait {p['data_wait_s']:.3f} s, "
                      f"compute {p['compute_s']:.2f} s, input-bound {100 * p['data_wait_frac']:.1f} % "
                      f"({100 * p['input_bound_frac']:.1f} % with start-up)", flush=True)

    def cell(rows, key, scale=1.0, fmt="{:.2f}"):
        vals = [r[key] * scale for r in rows]
        return f"{fmt.format(min(vals))}–{fmt.format(max(vals))} (median {fmt.format(statistics.median(vals))})"

    print("\n| compute threads | start-up (s) | data wait (s) | compute (s) | input-bound | with start-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for t, rows in results.items():
        print(f"| {t} | {cell(rows, 'startup_s', fmt='{:.3f}')} | {cell(rows, 'data_wait_s', fmt='{:.3f}')} | "
              f"{cell(rows, 'compute_s')} | {cell(rows, 'data_wait_frac', 100, '{:.1f}')} % | "
              f"{cell(rows, 'input_bound_frac', 100, '{:.1f}')} % |")


if __name__ == "__main__":
    main()
