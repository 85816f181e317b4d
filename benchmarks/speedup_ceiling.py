"""The speed-up ceiling of saved `cpu_backends.py` runs: what any backend could gain over fp32 eager there.

    python benchmarks/speedup_ceiling.py [benchmarks/results/cpu_backends_*.json ...] [--int8-rate GOPS]

For each model of each run: fp32 eager's median time at batch 1 and 32 divided by the lowest floor of any
backend's precision mix (``dermfusion.bench.runner.speedup_ceiling``; the floor puts every FLOP at the
matmul rate the run measured for its precision), next to the fastest measured speed-up. ``--int8-rate``
recomputes the ceiling with another int8 rate (e.g. the best idle probe of a host whose rate varied).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dermfusion.bench.runner import speedup_ceiling

RESULTS = Path(__file__).resolve().parent / "results"


def fastest(res: dict, bs: str) -> tuple[str, float]:
    best = max(((name, rec["batches"][bs].get("speedup", 0.0)) for name, rec in res["backends"].items()
                if rec.get("ok") and bs in rec.get("batches", {})), key=lambda x: x[1])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--int8-rate", type=float, default=None)
    args = ap.parse_args()
    runs = args.runs or sorted(RESULTS.glob("cpu_backends_*.json"))
    print("| run | matmul GFLOP/s (fp32 / bf16 / int8) | model | ceiling b=1 | ceiling b=32 | fastest b=32 (any accuracy) |")
    print("|---|---|---|---:|---:|---|")
    for path in runs:
        data = json.loads(path.read_text())
        for key, res in data.items():
            if key.startswith("_") or "fp32" not in res.get("backends", {}):
                continue
            if args.int8_rate:
                res["matmul_gflops"] = {**res["matmul_gflops"], "int8": args.int8_rate}
            rates = res["matmul_gflops"]
            ceil = speedup_ceiling(res)
            name, up = fastest(res, "32")
            cell = {bs: f"{c['max_speedup']:.2f}× ({c['backend']})" for bs, c in ceil.items()}
            print(f"| {path.stem.removeprefix('cpu_backends_')} | {rates.get('fp32', 0):.0f} / {rates.get('bf16', 0):.0f} / "
                  f"{rates.get('int8', 0):.0f} | {res['name'].split(',')[1].strip() if ',' in res['name'] else res['name']} | "
                  f"{cell.get('1', '—')} | {cell.get('32', '—')} | {name} {up:.2f}× |")


if __name__ == "__main__":
    main()
