"""How far apart the evaluation pixels of the two image paths were, and are: the training's out-of-fold pass (the
decode cache: resize the short side with PIL, then the evaluation transform) vs the engine (`predict`, `gate`,
`/v1/analyze`: `dataset.image_tensor`). Before the one-path change the engine handed the full-size image to the
evaluation transform, so colour constancy saw different pixels and the resize ran in torchvision.

    python benchmarks/eval_pixel_paths.py "../shared/data/derm7pt/images/A*.jpg" --size 224 [--n 20]

Prints, in 0–255 units, the mean / 99th percentile / largest absolute difference of the model input between the
cache path and (a) the former engine path, (b) `image_tensor` now.
"""
from __future__ import annotations

import argparse
import glob

import numpy as np
import torch

from dermfusion.data.dataset import image_tensor
from dermfusion.data.images import read_image, resize_short_side
from dermfusion.data.transforms import Preprocess, eval_transform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pattern")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--color-constancy", default="shades_of_gray")
    a = ap.parse_args()
    torch.set_num_threads(1)
    pre = Preprocess(size=a.size, color_constancy=a.color_constancy)
    scale = torch.tensor(pre.std).view(3, 1, 1) * 255
    tf = eval_transform(pre)
    before, now, shapes = [], [], set()
    for f in sorted(glob.glob(a.pattern))[:a.n]:
        img = read_image(f)
        shapes.add(img.size)
        cached = tf(torch.from_numpy(np.asarray(resize_short_side(img, pre.eval_resize), dtype=np.uint8).copy())
                    .permute(2, 0, 1))
        former = tf(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        before.append(((former - cached).abs() * scale).flatten())
        now.append(((image_tensor(img, pre) - cached).abs() * scale).flatten())
    for name, d in (("former engine path vs out-of-fold", before), ("engine now vs out-of-fold", now)):
        d = torch.cat(d)
        print(f"{name}: mean {d.mean():.3f}, p99 {d.quantile(0.99):.2f}, max {d.max():.2f} (0-255 units; "
              f"{len(before)} images of {sorted(shapes)} px, input {a.size}, {a.color_constancy})")


if __name__ == "__main__":
    main()
