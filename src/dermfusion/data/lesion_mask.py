"""A classical, unsupervised lesion mask — the segmentation-guided model's fallback — and the segmentation metrics.

`otsu_lesion_mask(img)` needs no training and no weights (numpy + scipy only), step by step:

1. Working size: the image is shrunk so its longer side is at most `max_side` pixels (speed); the mask is scaled
   back to the input size at the end (nearest neighbour).
2. Hair removal (DullRazor-style): on the luminance (Rec. 601, Gaussian σ = 1 px against pixel noise), a
   morphological black-hat — the grey closing minus the image — with a horizontal and a vertical line of length
   ≈ 1/20 of the shorter side; a thin dark structure (a hair, narrower than the line across at least one of the
   two directions) lights up, a lesion (wider than the line both ways) does not. Pixels whose black-hat exceeds
   `hair_contrast` (dilated by one pixel) are inpainted with the closing of each colour channel — the
   surrounding skin or lesion colour.
3. The lesion-contrast channel: the first principal component of the (smoothed) RGB pixels, its sign chosen so
   that it grows with darkness (correlates with 1 − luminance). Why: it follows the colour axis along which this
   image varies most — brown on pink, red on pale — where a fixed channel (blue, L*) is blind to some
   lesion/skin pairs; values are in RGB units ([0, 1] per channel), so the separation test below is comparable
   across images.
4. Otsu's threshold on that channel (256-bin histogram). If the Otsu classes' means differ by less than
   `min_contrast` (RGB units) — a uniform or noise-only image — there is no lesion: the mask is **empty**.
5. Morphology: opening then closing with a disc of radius ≈ 1/100 of the shorter side (speckle, ragged edges),
   holes filled.
6. One component (8-connected) is kept — the highest `area × centre × border` score: centre = 3 when the
   component covers the image centre, else 1; border = 1 − the share of the image's border pixels it touches.
   A central lesion beats a dark dermatoscope corner or a shadow along an edge; an off-centre lesion that touches
   no edge keeps its full area; a lesion that fills the frame still wins by covering the centre.

`dice` and `iou` compare two masks (both empty → 1.0: nothing to find, nothing found).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import DermfusionError

MAX_SIDE = 512
HAIR_CONTRAST = 0.06   # black-hat on the [0, 1] luminance above which a pixel is taken for a hair
MIN_CONTRAST = 0.10    # Otsu class means closer than this (RGB units) → no lesion, empty mask
CENTRE_BONUS = 3.0


class LesionMaskError(DermfusionError, ValueError):
    """An input the lesion mask or the segmentation metrics cannot use; the message says what is wrong."""


def as_rgb_float(img) -> np.ndarray:
    """H × W × 3 float64 in [0, 1] from a PIL image or an array (H × W grey or H × W × 3/4; uint8, or float in
    [0, 1])."""
    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"), np.float64) / 255.0
    else:
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise LesionMaskError(f"expected an H × W or H × W × 3/4 image, got shape {arr.shape}")
        arr = arr[:, :, :3]
        arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise LesionMaskError("a float image must hold values in [0, 1] (pass uint8 for 0–255)")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise LesionMaskError(f"image too small for a lesion mask: {arr.shape[1]} × {arr.shape[0]} pixels")
    return np.nan_to_num(arr)


def _resize(arr: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """Resize an H × W × 3 float image (bilinear) or an H × W bool mask (nearest) to (width, height)."""
    if arr.dtype == bool:
        return np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize(size, resample)) > 127
    chans = [np.asarray(Image.fromarray(arr[:, :, c].astype(np.float32), mode="F").resize(size, resample))
             for c in range(arr.shape[2])]
    return np.clip(np.stack(chans, axis=2).astype(np.float64), 0.0, 1.0)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def remove_hair(rgb: np.ndarray, hair_contrast: float = HAIR_CONTRAST) -> tuple[np.ndarray, np.ndarray]:
    """(image with thin dark lines inpainted, the hair mask) — step 2 of the module docstring."""
    length = max(5, min(rgb.shape[:2]) // 20) | 1
    lum = ndimage.gaussian_filter(luminance(rgb), sigma=1.0)   # pixel noise is not hair
    footprints = ((1, length), (length, 1))
    closed = [ndimage.grey_closing(lum, size=s) for s in footprints]
    black_hat = np.maximum(closed[0], closed[1]) - lum
    hair = ndimage.binary_dilation(black_hat > hair_contrast, iterations=1)
    if not hair.any():
        return rgb, hair
    which = np.argmax(np.stack(closed), axis=0)   # fill each pixel from the direction that closed it
    filled = rgb.copy()
    for c in range(3):
        chan = [ndimage.grey_closing(rgb[:, :, c], size=s) for s in footprints]
        filled[:, :, c] = np.where(hair, np.where(which == 0, chan[0], chan[1]), rgb[:, :, c])
    return filled, hair


def contrast_channel(rgb: np.ndarray) -> np.ndarray:
    """First principal component of the RGB pixels (RGB units), positive towards dark — step 3."""
    pixels = rgb.reshape(-1, 3)
    centred = pixels - pixels.mean(axis=0)
    cov = centred.T @ centred / max(1, len(centred) - 1)
    _, vecs = np.linalg.eigh(cov)
    axis = vecs[:, -1]
    proj = centred @ axis
    darkness = -(luminance(pixels) - luminance(pixels).mean())
    if float(proj @ darkness) < 0:
        proj = -proj
    return proj.reshape(rgb.shape[:2])


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a 256-bin histogram."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def _disc(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def pick_component(mask: np.ndarray) -> np.ndarray:
    """The one component the score of step 6 prefers (empty in, empty out)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask.copy()
    h, w = mask.shape
    areas = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    border_share = np.bincount(border, minlength=n + 1) / len(border)
    score = areas * (1.0 - border_share)
    centre = labels[h // 2, w // 2]
    if centre:
        score[centre] *= CENTRE_BONUS
    score[0] = -1
    return labels == int(np.argmax(score))


def otsu_lesion_mask(img, *, max_side: int = MAX_SIDE, hair_contrast: float = HAIR_CONTRAST,
                     min_contrast: float = MIN_CONTRAST, return_hair: bool = False):
    """Boolean H × W lesion mask of a PIL image or array (the module docstring gives the steps); an image with no
    dark region standing out by `min_contrast` gives an all-False mask. With `return_hair`, (mask, hair mask),
    the hair mask at the working size."""
    rgb = as_rgb_float(img)
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        rgb = _resize(rgb, (max(8, round(w * scale)), max(8, round(h * scale))), Image.BILINEAR)
    clean, hair = remove_hair(rgb, hair_contrast)
    short = min(clean.shape[:2])
    clean = np.stack([ndimage.gaussian_filter(clean[:, :, c], sigma=max(1.0, short / 200)) for c in range(3)], 2)
    mask = np.zeros(clean.shape[:2], bool)
    if float(clean.reshape(-1, 3).std(axis=0).max()) > 1e-6:
        channel = contrast_channel(clean)
        cut = otsu_threshold(channel)
        fg = channel > cut
        if fg.any() and (~fg).any() and channel[fg].mean() - channel[~fg].mean() >= min_contrast:
            disc = _disc(max(1, short // 100))
            fg = ndimage.binary_closing(ndimage.binary_opening(fg, structure=disc), structure=disc)
            mask = pick_component(ndimage.binary_fill_holes(fg))
    if mask.shape != (h, w):
        mask = _resize(mask, (w, h), Image.NEAREST)
    return (mask, hair) if return_hair else mask


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise LesionMaskError(f"masks differ in shape: {a.shape} vs {b.shape}")
    return a, b


def dice(a, b) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty."""
    a, b = _pair(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def iou(a, b) -> float:
    """Intersection over union (Jaccard) |A∩B| / |A∪B| of two boolean masks; 1.0 when both are empty."""
    a, b = _pair(a, b)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
