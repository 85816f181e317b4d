"""A foundation model's published evaluation preprocessing travels with it: PanDerm's bilinear resize to 256 and
224 centre crop with its own std; bundles written before `crop_pct` existed keep resizing the whole image."""
from __future__ import annotations

import numpy as np
import torch

from dermfusion.data.transforms import Preprocess, eval_transform
from dermfusion.models.panderm import PANDERM_DATA_CONFIG


def _image(w=320, h=256):
    rng = np.random.default_rng(0)
    return torch.from_numpy((rng.random((h, w, 3)) * 255).astype(np.uint8)).permute(2, 0, 1)


def test_panderm_preprocessing_is_its_published_one():
    pre = Preprocess.from_data_config(PANDERM_DATA_CONFIG)
    assert pre.crop_pct == 0.875 and pre.interpolation == "bilinear" and pre.std == (0.228, 0.224, 0.225)
    img = _image()
    out = eval_transform(pre)(img)
    assert out.shape == (3, 224, 224)
    # the same by hand: short side to 256 (bilinear, antialiased), centre 224 crop, normalise
    from torchvision.transforms import v2

    ref = v2.functional.center_crop(v2.functional.resize(img, 256, interpolation=v2.InterpolationMode.BILINEAR,
                                                         antialias=True), [224, 224]).float() / 255
    ref = (ref - torch.tensor(pre.mean)[:, None, None]) / torch.tensor(pre.std)[:, None, None]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_timm_crop_pct_is_ignored_and_old_bundles_keep_the_whole_image():
    pre = Preprocess.from_data_config({"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic"})
    assert pre.crop_pct == 1.0  # timm's default crop is not this project's recipe
    old = Preprocess(**{"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                        "color_constancy": "none"})  # a bundle's preprocess dict from before crop_pct
    assert old.crop_pct == 1.0 and old.to_dict()["crop_pct"] == 1.0
    img = _image(224, 224)
    ref = (img.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(eval_transform(old)(img), ref, atol=1e-5, rtol=1e-5)
