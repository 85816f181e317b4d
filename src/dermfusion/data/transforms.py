"""Per-modality image transforms, on uint8 tensors (fast; the same ops run on GPU batches).

Dermoscopy has no canonical orientation: any rotation and both flips are label-preserving.
Clinical close-ups do (the camera is held upright, skin folds and body context have a direction):
horizontal flips only, plus colour jitter, blur and cut-out for phone-camera variability.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
                 "nearest": v2.InterpolationMode.NEAREST}


@dataclass
class Preprocess:
    """What a backbone expects; travels with the model into the bundle."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    color_constancy: str = "none"   # none | shades_of_gray (see ShadesOfGray)
    crop_pct: float = 1.0           # evaluation: resize the short side to size / crop_pct, then centre-crop size
    source: str = ""                # where these values come from (a foundation model's pinned upstream code)

    @classmethod
    def from_data_config(cls, cfg: dict, color_constancy: str = "none") -> "Preprocess":
        """From an encoder's data config. ``resize_crop_pct`` (a foundation model's *published* evaluation crop,
        e.g. PanDerm's 0.875) is honoured; timm's own ``crop_pct`` is not — this project's recipes were measured
        with the whole image resized, and a silent change of their preprocessing would change their results."""
        size = cfg.get("input_size", (3, 224, 224))
        return cls(size=int(size[-1]), mean=tuple(float(x) for x in cfg.get("mean", cls.mean)),
                   std=tuple(float(x) for x in cfg.get("std", cls.std)),
                   interpolation=str(cfg.get("interpolation", "bicubic")), color_constancy=color_constancy,
                   crop_pct=float(cfg.get("resize_crop_pct", 1.0)), source=str(cfg.get("preprocess_source", "")))

    @property
    def eval_resize(self) -> int:
        """The short side an image is resized to before evaluation's centre crop: size / crop_pct."""
        return self.size if self.crop_pct >= 1.0 else int(round(self.size / self.crop_pct))

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "color_constancy": self.color_constancy, "crop_pct": self.crop_pct, "source": self.source}


class ShadesOfGray(torch.nn.Module):
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004; Barata et al. 2015 for dermoscopy).

    Estimates the illuminant as the Minkowski p-norm mean of each channel and rescales the channels so
    the estimate becomes grey. Dermoscopes, cameras and clinics differ in white balance (the ISIC 2018
    test images differ in colour from HAM10000's training images); normalising it at train *and*
    prediction time removes part of that shift. Works on uint8 C×H×W tensors (and batches of them).
    """

    def __init__(self, power: float = 6.0):
        super().__init__()
        self.power = float(power)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float()
        illum = x.pow(self.power).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.power)  # per channel
        gain = illum.mean(dim=-3, keepdim=True) / illum.clamp_min(1e-3)
        out = x * gain
        return out.round().clamp(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else out


COLOR_CONSTANCY = {"none": None, "shades_of_gray": ShadesOfGray}


def _constancy(pre: Preprocess) -> list:
    if pre.color_constancy not in COLOR_CONSTANCY:
        raise ValueError(f"unknown color_constancy {pre.color_constancy!r}; use one of {', '.join(COLOR_CONSTANCY)}")
    cls = COLOR_CONSTANCY[pre.color_constancy]
    return [cls()] if cls is not None else []


def _interp(pre: Preprocess):
    return INTERPOLATION.get(pre.interpolation, v2.InterpolationMode.BICUBIC)


def train_transform(modality: str, pre: Preprocess, strength: float = 1.0) -> v2.Compose:
    s = float(strength)
    crop = v2.RandomResizedCrop(pre.size, scale=(max(0.35, 1 - 0.6 * s), 1.0), ratio=(0.8, 1.25),
                                interpolation=_interp(pre), antialias=True)
    if modality == "dermoscopic":
        ops = [*_constancy(pre), crop, v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
               v2.RandomApply([v2.RandomRotation(180, interpolation=v2.InterpolationMode.BILINEAR)], p=0.5 * s),
               # no hue jitter: it costs 2.5 ms per image on a CPU worker, 5x the rest of the pipeline together
               v2.ColorJitter(0.15 * s, 0.15 * s, 0.1 * s)]
    else:
        ops = [*_constancy(pre), crop, v2.RandomHorizontalFlip(),
               v2.ColorJitter(0.3 * s, 0.3 * s, 0.2 * s, 0.03 * s),
               v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2 * s)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    if modality != "dermoscopic":
        ops.append(v2.RandomErasing(p=0.25 * s, scale=(0.02, 0.12), value=0))
    return v2.Compose(ops)


def eval_transform(pre: Preprocess) -> v2.Compose:
    """Evaluation, on a uint8 image whose short side is already ``pre.eval_resize`` (``data.images.resize_short_side``:
    the decode cache and ``dataset.image_tensor`` both resize first, so colour constancy sees the same pixels on every
    path); the Resize here then only mends a rounding of the long side."""
    return v2.Compose([*_constancy(pre), v2.Resize(pre.eval_resize, interpolation=_interp(pre), antialias=True),
                       v2.CenterCrop(pre.size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])


def tta_views(modality: str, n: int) -> list:
    """Label-preserving views for test-time augmentation on normalised B×3×H×W tensors.

    Dermoscopy: the 8 dihedral transforms; clinical: identity and horizontal flip (repeated).
    """
    dihedral = [lambda x, k=k, f=f: torch.rot90(x.flip(-1) if f else x, k, dims=(-2, -1))
                for f in (False, True) for k in range(4)]
    if modality == "dermoscopic":
        views = dihedral
    else:
        views = [lambda x: x, lambda x: x.flip(-1)]
    n = max(1, n)
    return [views[i % len(views)] for i in range(n)]
