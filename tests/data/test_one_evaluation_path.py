"""The pixels a served lesion reaches the model with are the pixels its calibration was fitted on.

The training's out-of-fold pass reads files through the decode cache; ``dermfusion predict``, ``gate`` and
``/v1/analyze`` decode an image in memory and go through ``dataset.image_tensor``. Both must give the same tensor,
bit for bit — including colour constancy (which must see the resized image on both paths) and a foundation model's
own interpolation and evaluation crop.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermfusion.data.dataset import LesionDataset, image_tensor
from dermfusion.data.features import FeatureSpec
from dermfusion.data.images import DecodeCache, read_image
from dermfusion.data.transforms import Preprocess
from dermfusion.tasks import ISIC2018


def _photo(path, size=(480, 360)):
    """A textured, colour-cast, non-square JPEG (a resize and a colour-constancy step both change it)."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 80 * np.sin(xx / 17.0), 90 + 60 * np.cos(yy / 11.0), 60 + 0.1 * xx], -1)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=92)
    return str(path)


PREPROCESSING = [
    Preprocess(size=64, color_constancy="shades_of_gray"),                        # the HAM10000 / Derm7pt recipes
    Preprocess(size=64, interpolation="bilinear", crop_pct=0.875),                # PanDerm-style resize-then-crop
]


@pytest.mark.parametrize("pre", PREPROCESSING, ids=["bicubic_shades_of_gray", "bilinear_crop_0.875"])
def test_the_engine_sees_the_pixels_the_out_of_fold_pass_saw(tmp_path, pre):
    path = _photo(tmp_path / "lesion.jpg")
    df = pd.DataFrame([{"lesion_id": "L1", "image_dermoscopic": path, "age": np.nan, "sex": "", "site": ""}])
    spec = FeatureSpec(modalities=["dermoscopic"])
    spec.numeric, spec.categorical = [], {}
    cached = LesionDataset(df, ISIC2018, spec, {"dermoscopic": pre}, cache_dir=str(tmp_path / "cache"))
    out_of_fold = cached[0]["images"]["dermoscopic"]
    warm = LesionDataset(df, ISIC2018, spec, {"dermoscopic": pre}, cache_dir=str(tmp_path / "cache"))[0]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1                   # the second read was a cache hit
    served = image_tensor(read_image(path), pre)                                  # predict / gate / /v1/analyze
    in_memory = LesionDataset(df.assign(image_dermoscopic=[read_image(path)]), ISIC2018, spec,
                              {"dermoscopic": pre})[0]["images"]["dermoscopic"]  # stacks' in-memory rows
    assert out_of_fold.shape == (3, 64, 64)
    assert torch.equal(out_of_fold, served)
    assert torch.equal(warm["images"]["dermoscopic"], served)
    assert torch.equal(in_memory, served)


def test_the_decode_cache_keeps_interpolations_apart(tmp_path):
    path = _photo(tmp_path / "lesion.jpg")
    bicubic = DecodeCache(tmp_path / "cache", 50).get(path)
    bilinear = DecodeCache(tmp_path / "cache", 50, "bilinear").get(path)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    assert not np.array_equal(bicubic, bilinear)
    assert np.array_equal(DecodeCache(tmp_path / "cache", 50, "bilinear").get(path), bilinear)
    # a name the evaluation transform resamples bicubic (it knows bicubic / bilinear / nearest) is resized bicubic
    # here too, and shares the bicubic entries
    assert np.array_equal(DecodeCache(tmp_path / "cache", 50, "lanczos").get(path), bicubic)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
