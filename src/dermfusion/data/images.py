"""Safe image reading and a decode cache.

Every image goes through `read_image`: EXIF orientation applied, any mode converted to 8-bit RGB,
a pixel-count cap against decompression bombs, and every failure turned into an `ImageError`
that names the file — so a bad file is found by `dermfusion data check`, not mid-epoch.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import DermfusionError

# 100 megapixels: far above any dermoscope (~24 MP) yet far below a bomb.
MAX_PIXELS = 100_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(DermfusionError, ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        scale = 65535.0 if hi > 255 else 255.0
        arr = np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite on white: a transparent background is not skin
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "<upload>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB PIL image, or raise ImageError naming `name`."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}×{h} = {w * h:,} pixels exceeds the cap of {max_pixels:,} "
                                 "(possible decompression bomb)")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg.lower() or "image file is truncated" in msg:
            raise ImageError(f"{name}: truncated image file ({msg})") from None
        raise ImageError(f"{name}: corrupt or unreadable image ({msg})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make a good image unusable
        pass
    return _to_rgb(img)


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    return decode_image(path.read_bytes(), str(path), max_pixels)


# a preprocessing's interpolation name (``Preprocess.interpolation``) as PIL's resampling filter; any other name is
# resampled bicubic, as the evaluation transform resamples it (``transforms.INTERPOLATION``)
PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resample_name(interpolation: str) -> str:
    """The filter ``interpolation`` resizes with here: itself when known, else "bicubic"."""
    return interpolation if interpolation in PIL_RESAMPLE else "bicubic"


def resize_short_side(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """``img`` with its short side at ``size`` px (aspect kept), resampled with ``interpolation`` (a model's
    preprocessing: bicubic for the ImageNet encoders, bilinear for PanDerm …). The one resize before the model's
    transforms, whether an image comes through the decode cache or from memory (an upload)."""
    w, h = img.size
    s = size / min(w, h)
    if abs(s - 1.0) < 1e-6:
        return img
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), PIL_RESAMPLE[resample_name(interpolation)],
                      reducing_gap=3.0)


# (path, mtime, size) -> sha1 of the file: shared by every cache in the process (an edited file changes mtime/size)
_CONTENT_KEYS: dict[tuple[str, float, int], str] = {}


class DecodeCache:
    """Resized uint8 RGB arrays on disk, keyed by file content, target size and interpolation.

    Epochs after the first read a small .npy instead of decoding a JPEG. The key is the sha1 of the
    file bytes (so an edited file is re-decoded) plus the size (and the interpolation, when not bicubic);
    entries are written atomically.
    """

    def __init__(self, root: str | os.PathLike, size: int, interpolation: str = "bicubic"):
        self.root = Path(root)
        self.size = int(size)
        self.interpolation = interpolation = resample_name(interpolation)
        # bicubic entries keep their old names: caches written before the interpolation was part of the key stay valid
        self._suffix = f"{self.size}" if interpolation == "bicubic" else f"{self.size}_{interpolation}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._keys = _CONTENT_KEYS

    def _key(self, path: Path) -> tuple[str, bytes | None]:
        st = path.stat()
        memo = (str(path), st.st_mtime, st.st_size)
        if memo in self._keys:
            return self._keys[memo], None
        data = path.read_bytes()
        key = hashlib.sha1(data).hexdigest()
        self._keys[memo] = key
        return key, data

    def prime(self, paths) -> None:
        """Hash ``paths`` now, in this process. Data-loader workers are forked per epoch and inherit the
        memo, so each file is read and hashed once per run instead of once per epoch per worker."""
        for p in paths:
            if p:
                try:
                    self._key(Path(p))
                except OSError:
                    pass  # a missing file is reported, by name, when it is loaded

    def get(self, path: str | os.PathLike) -> np.ndarray:
        path = Path(path)
        if not path.exists():
            raise ImageError(f"{path}: file not found")
        key, data = self._key(path)
        entry = self.root / key[:2] / f"{key}_{self._suffix}.npy"
        if entry.exists():
            try:
                return np.load(entry)
            except Exception:
                entry.unlink(missing_ok=True)
        img = decode_image(data if data is not None else path.read_bytes(), str(path))
        arr = np.asarray(resize_short_side(img, self.size, self.interpolation), dtype=np.uint8)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, arr)
        os.replace(tmp, entry)
        return arr


def load_rgb_array(path: str, cache: DecodeCache | None = None, size: int | None = None,
                   interpolation: str = "bicubic") -> np.ndarray:
    """H×W×3 uint8; through the cache when given, else decoded (and resized when `size`)."""
    if cache is not None:
        return cache.get(path)
    img = read_image(path)
    if size:
        img = resize_short_side(img, size, interpolation)
    return np.asarray(img, dtype=np.uint8)
