"""Cost of seeding one training item's augmentation: ``torch.manual_seed`` vs the CPU generator alone.

    python benchmarks/item_seeding.py [--calls 2000]

The training dataset seeds every lesion's augmentation from (run, epoch, lesion). ``torch.manual_seed``
also seeds CUDA, lazily: without an initialised GPU it queues the call together with a formatted Python
stack trace (for error messages), on every call, so it costs far more than seeding the CPU generator —
and more the deeper the calling stack (a DataLoader worker's is deep). Prints µs per call at a shallow and
a deep (40 frames) stack, and the time of one tiny-config training item (the bundled HAM10000 sample).
"""
from __future__ import annotations

import argparse
import time

import torch


def per_call_us(fn, calls: int, depth: int = 0) -> float:
    if depth:
        return per_call_us_deep(fn, calls, depth)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls * 1e6


def per_call_us_deep(fn, calls: int, depth: int) -> float:
    return per_call_us_deep(fn, calls, depth - 1) if depth > 1 else per_call_us(fn, calls)


def item_ms(n: int = 48) -> float:
    from dermfusion.config import load_config
    from dermfusion.data.dataset import LesionDataset
    from dermfusion.data.importers import import_isic
    from dermfusion.demo import sample_dir
    from dermfusion.tasks import ISIC2018
    from dermfusion.models.factory import build_model, feature_spec_for, preprocess_of

    cfg = load_config("tiny_cpu")
    df = import_isic(sample_dir() / "train.csv", sample_dir() / "images", ISIC2018, dataset="ham10000_sample")
    spec = feature_spec_for(cfg, ISIC2018, df)
    model = build_model(cfg, ISIC2018, spec)
    ds = LesionDataset(df, ISIC2018, spec, preprocess_of(model, spec), train=True, seed=0)
    [ds[(0, i)] for i in range(min(8, len(ds)))]  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        ds[(1, i % len(ds))]
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    print("| seeding call | µs per call (shallow stack) | µs per call (40 frames deeper) |")
    print("|---|---:|---:|")
    for name, fn in [("torch.manual_seed", torch.manual_seed),
                     ("torch.default_generator.manual_seed", torch.default_generator.manual_seed)]:
        print(f"| `{name}` | {per_call_us(fn, args.calls):.1f} | {per_call_us(fn, args.calls, depth=40):.1f} |")
    print(f"\none tiny-config training item (dataset as shipped): {item_ms():.2f} ms")


if __name__ == "__main__":
    main()
