"""The "cannot assess" gate: is an image fit for the model to assess at all?

A model asked about a blank frame, a blurred shot or a photo of something that is not skin still answers: with a
near-uniform differential that reads as a 43 / 100 risk, or — as often — confidently (a trained HAM10000 network
gives a white frame a top probability of 0.63; BENCHMARKS.md). The gate refuses such inputs before any triage,
on two kinds of cheap evidence, the image checks doing most of the work:

- **image checks** on what the model sees (the centre square, at most `GATE_SIZE` px, in CIE L*a*b*):
  one uniform colour (the largest channel standard deviation), exposure (share of near-black and of clipped
  white pixels), blur (variance of the Laplacian of L* on the well-exposed pixels), skin-likeness (share of the
  coloured well-exposed pixels whose hue lies in the magenta-pink → red → brown → yellow range of skin and lesions;
  near-grey pixels — very pale skin under white light — count neither way, and a grey image has no skin);
- **familiarity** (``embedding_reference``): how unlike the reference lesions the image is in the network's
  intermediate layers — what tells a skin-coloured photo of a cat or a cup of coffee from a lesion;
- **the model's own confidence**: a top calibrated probability below what the training run's out-of-fold
  lesions reach. Its quantiles are computed at training time beside the drift reference
  (`confidence_reference`, stored in ``drift_reference.json``); `confidence_threshold` turns them into a cut
  for a chosen share of out-of-fold lesions that would have been refused.

Pure functions: the cut-offs come from the caller (the service's ``quality`` settings), the quantiles from the
bundle. A finding is ``(code, message)``; codes are the keys of `REASONS` (bounded: they label metrics).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .image_stats import BRIGHT_L, DARK_L, laplacian, srgb_to_lab

GATE_SIZE = 224            # the model's input side: checks see the image at (at most) that resolution
# L*a*b* hue angle atan2(b*, a*): magenta-pink (dermoscopy under polarised light, down to ≈ −50° per image in
# HAM10000) through red (≈ 0°) and brown to yellow (≈ 90°); blue, cyan and green lie outside
SKIN_HUE_DEG = (-70.0, 100.0)
SKIN_MIN_CHROMA = 3.0           # below: grey — no colour evidence either way
MIN_COLOURED_SHARE = 0.02       # fewer coloured pixels than this share: a grey image, skin fraction 0
REFERENCE_LEVELS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)   # OOF shares refused, stored per bundle

REASONS = {
    "blank": "image is blank or one uniform colour",
    "underexposed": "image too dark",
    "overexposed": "image overexposed (clipped white)",
    "blurred": "image too blurred",
    "not_skin": "image does not look like skin",
    "model_unsure": "model unsure: out of distribution",
    "unfamiliar": "image unlike the lesions the model was trained on",
}
MEASURES = ("colour_spread", "dark_fraction", "bright_fraction", "sharpness", "skin_fraction")


# ---------------------------------------------------------------------------------------------- image checks
def model_view(img: Image.Image, size: int = GATE_SIZE) -> np.ndarray:
    """The centre square the model sees, resized to ``size`` px (never enlarged): H×W×3 uint8 RGB."""
    rgb = img.convert("RGB")
    w, h = rgb.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    sq = rgb.crop((left, top, left + s, top + s))
    if s > size:
        sq = sq.resize((size, size), Image.BILINEAR)
    return np.asarray(sq, dtype=np.uint8)


def image_measures(img: Image.Image) -> dict[str, float]:
    """`MEASURES` of one image (see the module docstring), computed on `model_view`."""
    lab = srgb_to_lab(model_view(img))
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    spread = float(max(L.std(), a.std(), b.std()))
    dark, bright = L < DARK_L, L > BRIGHT_L
    ok = ~(dark | bright)
    # Laplacian only where the pixel and its 4 neighbours are well exposed (a vignette's rim is no sharpness)
    lap = laplacian(L)
    inner = ok[1:-1, 1:-1] & ok[:-2, 1:-1] & ok[2:, 1:-1] & ok[1:-1, :-2] & ok[1:-1, 2:]
    sharp = float(lap[inner].var()) if inner.sum() > 16 else 0.0
    hue = np.degrees(np.arctan2(b, a))
    chroma = np.hypot(a, b)
    coloured = ok & (chroma >= SKIN_MIN_CHROMA)
    skin = coloured & (hue >= SKIN_HUE_DEG[0]) & (hue <= SKIN_HUE_DEG[1])
    n_col = int(coloured.sum())
    skin_fraction = float(skin.sum() / n_col) if n_col and n_col >= MIN_COLOURED_SHARE * ok.sum() else 0.0
    return {"colour_spread": spread, "dark_fraction": float(dark.mean()), "bright_fraction": float(bright.mean()),
            "sharpness": sharp, "skin_fraction": skin_fraction}


def image_findings(m: dict[str, float], *, min_colour_spread: float, max_dark_fraction: float,
                   max_bright_fraction: float, min_sharpness: float, min_skin_fraction: float) -> list[tuple[str, str]]:
    """Why an image with measures ``m`` cannot be assessed (empty: it can). A badly exposed image gets only its
    exposure finding (a black frame is "too dark"), a blank one only "blank" — blur and colour are then measured
    on too few pixels to mean anything."""
    out = []
    if m["dark_fraction"] > max_dark_fraction:
        out.append(("underexposed", f"{REASONS['underexposed']} ({100 * m['dark_fraction']:.0f}% near-black "
                                    f"pixels > {100 * max_dark_fraction:g}%)"))
    if m["bright_fraction"] > max_bright_fraction:
        out.append(("overexposed", f"{REASONS['overexposed']} ({100 * m['bright_fraction']:.0f}% clipped "
                                   f"pixels > {100 * max_bright_fraction:g}%)"))
    if out:
        return out
    if m["colour_spread"] < min_colour_spread:
        return [("blank", f"{REASONS['blank']} (colour spread {m['colour_spread']:.1f} < {min_colour_spread:g})")]
    if m["sharpness"] < min_sharpness:
        out.append(("blurred", f"{REASONS['blurred']} (sharpness {m['sharpness']:.1f} < {min_sharpness:g})"))
    if m["skin_fraction"] < min_skin_fraction:
        out.append(("not_skin", f"{REASONS['not_skin']} ({100 * m['skin_fraction']:.0f}% of the coloured pixels "
                                f"skin-toned < {100 * min_skin_fraction:g}%)"))
    return out


# ----------------------------------------------------------------------------------------- model confidence
def top_probability(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    return p.max(-1)


def confidence_reference(probs, levels=REFERENCE_LEVELS) -> dict | None:
    """Lower-tail quantiles of the top calibrated probability over (out-of-fold) lesions: the data-derived
    half of the model check, computed at training time and stored beside the drift reference. ``method=
    "lower"``: each cut is a value some lesion really had, so at most that share of them falls below it."""
    top = top_probability(probs)
    top = top[np.isfinite(top)] if top.ndim == 1 else np.zeros(0)
    if not len(top):
        return None
    q = np.quantile(top, list(levels), method="lower")
    return {"signal": "top_probability", "n": int(len(top)), "levels": [float(x) for x in levels],
            "quantiles": [float(x) for x in q], "chance": 1.0 / np.asarray(probs).shape[-1]}


def confidence_threshold(reference: dict | None, rate: float, min_lesions: int = 100) -> float | None:
    """The top-probability cut refusing about ``rate`` of the reference lesions (interpolated between the
    stored levels); None when there is no reference or it holds fewer than ``min_lesions`` lesions (a tail
    quantile of a few dozen lesions says nothing)."""
    if not reference or reference.get("n", 0) < min_lesions or not reference.get("levels"):
        return None
    levels, q = np.asarray(reference["levels"], float), np.asarray(reference["quantiles"], float)
    return float(np.interp(rate, levels, q))


def model_findings(probs, min_top_probability: float | None) -> list[tuple[str, str]]:
    if min_top_probability is None:
        return []
    top = float(top_probability(probs))
    if top < min_top_probability:
        return [("model_unsure", f"{REASONS['model_unsure']} (top class probability {top:.2f} < "
                                 f"{min_top_probability:.2f}, below what the training lesions reach)")]
    return []


def familiarity_findings(score: float | None, cut: float | None) -> list[tuple[str, str]]:
    """The familiarity check (``evaluation.embedding_reference``): refused when the image's unfamiliarity score
    exceeds the cut."""
    if score is None or cut is None or not np.isfinite(score) or score <= cut:
        return []
    return [("unfamiliar", f"{REASONS['unfamiliar']} (unfamiliarity {score:.2f} > {cut:.2f}; a typical lesion "
                           "scores about 1)")]
