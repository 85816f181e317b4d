"""Heat maps back onto the image the clinician uploaded, at its original aspect ratio.

Evaluation preprocessing resizes the short side to ``size / crop_pct`` and centre-crops a ``size`` square, so a
heat map covers the central square of side ``crop_pct · min(W, H)`` of the original image (the whole short side for
``crop_pct`` 1; 87.5 % of it for PanDerm's resize-to-256, crop-224). The map is upsampled onto that square and the
rest of the image — which the model never saw — is dimmed rather than painted, so nobody reads "no evidence" into a
region that was not looked at.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw


def display_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def center_crop_box(size: tuple[int, int], crop_pct: float = 1.0) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the region eval preprocessing keeps (Resize short side to size / crop_pct +
    CenterCrop size): the central square of side ``crop_pct · min(W, H)``."""
    w, h = size
    side = max(1, min(min(w, h), int(round(min(w, h) * min(float(crop_pct), 1.0)))))
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def heatmap_to_image_size(grid: np.ndarray, size: tuple[int, int],
                          crop_pct: float = 1.0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An h×w grid in [0, 1] -> an H×W array over an image of ``size`` (W, H); 0 outside the crop."""
    w, h = size
    box = center_crop_box(size, crop_pct)
    side = box[2] - box[0]
    g = np.clip(np.nan_to_num(np.asarray(grid, dtype=np.float32)), 0.0, 1.0)
    up = np.asarray(Image.fromarray(g, mode="F").resize((side, side), Image.BILINEAR), dtype=np.float32)
    full = np.zeros((h, w), np.float32)
    full[box[1]:box[3], box[0]:box[2]] = np.clip(up, 0.0, 1.0)
    return full, box


def colorize(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay_heatmap(image: Image.Image, grid: np.ndarray, *, max_side: int | None = 512, alpha: float = 0.5,
                    cmap: str = "jet", outline: bool = True, crop_pct: float = 1.0) -> tuple[Image.Image, np.ndarray]:
    """(overlay RGB image at the original aspect ratio, capped at ``max_side``; heat map H×W at that size).
    ``crop_pct``: the model's evaluation crop (``Preprocess.crop_pct``), which decides the region it saw."""
    size = display_size(image.size, max_side)
    base = image.convert("RGB")
    if size != image.size:
        base = base.resize(size, Image.BILINEAR, reducing_gap=2.0)
    heat, box = heatmap_to_image_size(grid, size, crop_pct)
    rgb = np.asarray(base, dtype=np.float32)
    a = (alpha * heat)[..., None]
    out = rgb * (1 - a) + colorize(heat, cmap).astype(np.float32) * a
    outside = np.ones(heat.shape, bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    out[outside] *= 0.45  # not seen by the model
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if outline and outside.any():
        ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 255, 255), width=1)
    return img, heat


def heatmap_image(heat: np.ndarray, cmap: str = "jet") -> Image.Image:
    return Image.fromarray(colorize(heat, cmap))


def png_bytes(img: Image.Image) -> bytes:
    """Lossless PNG at zlib level 1: a 512-px overlay encodes in ~4 ms instead of ~25 ms at the default level 6,
    for ~15 % more bytes (measured; BENCHMARKS.md) — the heat map is on every clinician request's path."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def png_base64(img: Image.Image) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")
