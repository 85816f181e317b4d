"""The heat map's "model region" is the part of the photo the model saw: with a published evaluation crop
(``Preprocess.crop_pct`` < 1 — PanDerm: short side to 256, centre 224) that is the central crop_pct of the short
side, not the whole short side; the heat map is placed there and everything outside it is dimmed."""
from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dermfusion.data.transforms import Preprocess, eval_transform
from dermfusion.explain import center_crop_box, heatmap_to_image_size, overlay_heatmap
from service_fixtures import png_bytes, tiny_bundle  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("size, crop_pct", [((300, 200), 0.875), ((200, 300), 0.875), ((257, 257), 0.5),
                                            ((300, 200), 1.0)])
def test_the_box_is_what_evaluation_preprocessing_keeps(size, crop_pct):
    """An image whose red channel encodes x and green encodes y: the first / last pixels of the preprocessed crop
    give the original coordinates it starts and ends at."""
    w, h = size
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    img = np.stack([xs * 255.0 / (w - 1), ys * 255.0 / (h - 1), np.zeros_like(xs, float)], -1)
    t = torch.from_numpy(img.round().astype(np.uint8)).permute(2, 0, 1)
    pre = Preprocess(size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", crop_pct=crop_pct)
    out = eval_transform(pre)(t).numpy()
    left, top, right, bottom = center_crop_box(size, crop_pct)
    px = (w - 1) / 64 * 1.5  # one and a half output pixels, in original pixels
    assert abs(out[0, :, 0].mean() * (w - 1) - left) < px and abs(out[0, :, -1].mean() * (w - 1) - right) < px
    assert abs(out[1, 0, :].mean() * (h - 1) - top) < px * h / w + 1 and abs(out[1, -1, :].mean() * (h - 1) - bottom) \
        < px * h / w + 1
    assert right - left == bottom - top == round(min(w, h) * crop_pct)


def test_the_heat_map_lies_on_the_crop_and_the_rest_is_dimmed():
    grid = np.ones((4, 4), np.float32)
    heat, box = heatmap_to_image_size(grid, (300, 200), crop_pct=0.875)
    assert box == (62, 12, 237, 187)
    assert heat[:12].max() == 0 and heat[187:].max() == 0 and heat[:, :62].max() == 0 and heat[100, 150] > 0.9
    img = Image.new("RGB", (300, 200), (200, 200, 200))
    ov, _ = overlay_heatmap(img, grid, max_side=None, crop_pct=0.875)
    arr = np.asarray(ov).astype(int)
    assert arr[5, 150].tolist() == [90, 90, 90]  # above the crop: dimmed (200 × 0.45), not painted
    assert arr[100, 150].tolist() != [200, 200, 200] and arr[100, 150].tolist() != [90, 90, 90]


def test_the_service_reports_the_crop_it_used(tiny_bundle, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.bundle import seal_bundle
    from dermfusion.service.app import create_app
    from dermfusion.service.config import load_service_config

    bundle = tmp_path / "panderm_like"
    shutil.copytree(tiny_bundle, bundle)  # the tiny model with PanDerm's evaluation crop (resize 1/0.875, crop)
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    for p in cfg["preprocess"].values():
        p["crop_pct"] = 0.875
    (bundle / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    seal_bundle(bundle)
    conf = load_service_config(None, env={}, audit={"db_url": f"sqlite:///{tmp_path}/audit.db"},
                               quality={"enabled": False})
    wide = Image.new("RGB", (900, 500), (200, 200, 200))
    with TestClient(create_app(bundle, conf, warmup=False)) as c:
        r = c.post("/v1/analyze", files={"dermoscopic": ("wide.png", png_bytes(wide), "image/png")})
    assert r.status_code == 200, r.text[:500]
    (hm,) = r.json()["explanations"]["heatmaps"]
    ov = np.asarray(Image.open(io.BytesIO(base64.b64decode(hm["overlay_png_base64"])))).astype(int)
    (w, h) = (hm["width"], hm["height"])
    left, top, right, bottom = hm["model_region"]
    assert (w, h) == (512, 284) and [left, top, right, bottom] == list(center_crop_box((512, 284), 0.875))
    assert bottom - top == right - left == round(0.875 * 284) and top > 0  # not the whole short side
    assert ov[top // 2, w // 2].tolist() == [90, 90, 90]  # above the region the model saw: dimmed
    assert ov[(top + bottom) // 2, w // 2].tolist() != [90, 90, 90]
