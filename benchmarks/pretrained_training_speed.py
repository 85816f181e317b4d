"""Training throughput of the pretrained HAM10000 recipe under different CPU settings.

Runs `dermfusion train` for a few steps per setting (fold 0, one epoch capped at --steps steps, at one input
size) and reads the fold's log: images/s over the steady-state steps (the fold's start-up — loader, worker
fork, first batch — left out) and the share of that time spent waiting for input.

    python benchmarks/pretrained_training_speed.py --manifest ham_train.parquet --size 192 \
        --setting "threads=2 workers=1" --setting "threads=2 workers=0" --setting "threads=1 workers=1"

Nothing else may run on the machine meanwhile: two torch processes on 2 cores slow each other down
many times over (OpenMP threads wait for each other), which says nothing about either.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(config: str, manifest: str, size: int, steps: int, batch: int, setting: dict, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        sets = [f"train.threads={setting.get('threads', 0)}", f"data.num_workers={setting.get('workers', -1)}",
                f"train.precision={setting.get('precision', 'fast')}", f"train.epoch_sizes=[{size}]",
                "train.epochs=1", f"train.max_steps_per_epoch={steps}", "train.tta=0", f"train.batch_size={batch}",
                f"train.channels_last={str(setting.get('channels_last', 'true')).lower()}", *extra,
                *(f"{k}={v}" for k, v in setting.items() if "." in k)]  # any config key, e.g. model.freeze_blocks=3
        cmd = [sys.executable, "-c", "from dermfusion.cli import main; main()", "train", config, "--manifest", manifest, "--out", out,
               "--folds", "0", "--profile"] + [a for s in sets for a in ("--set", s)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        log = next(Path(out).glob("**/fold_0/log.jsonl"))  # member_0/fold_0 for an ensemble recipe
        rec = json.loads(log.read_text().splitlines()[0])
    steady = rec["compute_s"] + rec["data_wait_s"]  # the first step is start-up (see engine.train_epoch)
    return {**setting, "size": size, "steps": rec["steps"], "images_per_s": (rec["steps"] - 1) * batch / steady,
            "data_wait_frac": rec["data_wait_frac"], "startup_s": rec["startup_s"],
            "command_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ham10000_pretrained")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--size", type=int, action="append", help="training input size (repeatable)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--setting", action="append",
                    help='e.g. "threads=2 workers=1 precision=fast model.freeze_blocks=3" (dotted keys: config overrides)')
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    settings = [dict(kv.split("=", 1) for kv in s.split()) for s in (args.setting or ["threads=0 workers=-1"])]
    print(f"# {cpu_name()} · {args.config} · {args.steps} steps per setting")
    print("| size | setting | images/s | data wait | start-up s |\n|---:|---|---:|---:|---:|")
    for size in args.size or [192]:
        for s in settings:
            r = run(args.config, args.manifest, size, args.steps, args.batch_size, s, args.extra)
            label = " ".join(f"{k}={v}" for k, v in s.items())
            print(f"| {size} | {label} | {r['images_per_s']:.1f} | {r['data_wait_frac']:.0%} | {r['startup_s']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
