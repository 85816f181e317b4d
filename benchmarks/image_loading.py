"""Image loading throughput (images/s) with and without the decode cache, on real HAM10000 JPEGs.

    python benchmarks/image_loading.py [--csv ../shared/data/ham10000/train.csv] [--n 2000] [--size 128]

"decode" = read + safe decode + EXIF + RGB + resize each time (what every epoch costs without a cache);
"cache cold" = the first epoch with the cache (decode + write); "cache warm" = later epochs.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from dermfusion.data.images import DecodeCache, load_rgb_array


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=str(Path(__file__).resolve().parents[1] / ".." / "shared/data/ham10000/train.csv"))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    csv = Path(args.csv)
    paths = [str(csv.parent / p) for p in pd.read_csv(csv)["image"].head(args.n)]
    # warm the OS page cache so both paths read from memory: we measure decoding, not the disk
    for p in paths:
        Path(p).read_bytes()

    def run(fn):
        t = time.perf_counter()
        for p in paths:
            fn(p)
        return len(paths) / (time.perf_counter() - t)

    tmp = Path(tempfile.mkdtemp())
    try:
        decode = run(lambda p: load_rgb_array(p, size=args.size))
        cache = DecodeCache(tmp, args.size)
        cold = run(cache.get)
        warm = run(DecodeCache(tmp, args.size).get)   # a new object: content hashing included
    finally:
        shutil.rmtree(tmp)
    print(f"images: {len(paths)} HAM10000 JPEGs (224×224) resized to short side {args.size}, 1 process")
    print(f"decode every time : {decode:8.0f} images/s")
    print(f"cache, first epoch: {cold:8.0f} images/s")
    print(f"cache, later epoch: {warm:8.0f} images/s  ({warm / decode:.1f}× decode)")


if __name__ == "__main__":
    main()
