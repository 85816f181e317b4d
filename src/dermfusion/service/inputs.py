"""What a client sends, checked before any model runs: uploads (decoded safely, with a 4xx reason for every
way a file can be wrong) and the patient metadata a response echoes."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..data.images import ImageError, decode_image
from ..errors import DermfusionError
from .config import LimitsConfig


class InputError(DermfusionError):
    """A problem with what the client sent: becomes a 4xx JSON error, never a 500."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, details=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.details = status, code, message, field, details


@dataclass
class Upload:
    modality: str
    data: bytes
    content_type: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def decode_upload(up: Upload, lim: LimitsConfig) -> tuple[Image.Image, str]:
    """(RGB image, format) or InputError with the reason."""
    name = f"{up.modality} image"
    if not up.data:
        raise InputError(400, "empty_image", f"{name}: the uploaded file is empty", up.modality)
    try:
        with Image.open(io.BytesIO(up.data)) as probe:
            fmt, (w, h) = probe.format or "", probe.size
    except Image.DecompressionBombError:
        raise InputError(413, "decompression_bomb", f"{name}: refused as a decompression bomb (too many pixels)",
                         up.modality) from None
    except UnidentifiedImageError:
        raise InputError(400, "not_an_image", f"{name}: not an image (format not recognised); "
                         "upload a JPEG or PNG photo", up.modality) from None
    except Exception:  # noqa: BLE001 — any parser failure is the file's fault
        raise InputError(400, "invalid_image", f"{name}: corrupt or unreadable image", up.modality) from None
    # every cost of decoding (pixels, each side, the intermediate buffers of a thin strip) is bounded here, from
    # the header alone: PIL has read nothing but the header yet
    if w * h > lim.max_pixels:
        raise InputError(413, "decompression_bomb" if len(up.data) < w * h // 100 else "too_many_pixels",
                         f"{name}: {w}×{h} = {w * h:,} pixels exceeds the limit of {lim.max_pixels:,} "
                         "(possible decompression bomb); downscale the image", up.modality)
    if max(w, h) > lim.max_side:
        raise InputError(413, "image_too_large", f"{name}: {w}×{h} exceeds the limit of {lim.max_side:,} px per "
                         "side; downscale the image", up.modality)
    if min(w, h) and max(w, h) / min(w, h) > lim.max_aspect_ratio:
        raise InputError(422, "bad_aspect_ratio", f"{name}: {w}×{h} is too elongated (aspect ratio above "
                         f"{lim.max_aspect_ratio:g}); upload a photo of the lesion, cropped roughly square",
                         up.modality)
    if min(w, h) < lim.min_side:
        raise InputError(422, "image_too_small", f"{name}: {w}×{h} is too small (min {lim.min_side} px per side)",
                         up.modality)
    try:
        img = decode_image(up.data, name, lim.max_pixels)
    except ImageError as e:
        msg = str(e)
        if "truncated" in msg:
            raise InputError(400, "truncated_image", f"{name}: the file is truncated (incomplete upload?)",
                             up.modality) from None
        if "bomb" in msg or "exceeds" in msg:
            raise InputError(413, "decompression_bomb", msg, up.modality) from None
        raise InputError(400, "invalid_image", msg, up.modality) from None
    return img, fmt


def public_metadata(fields: dict) -> dict:
    out = {}
    for k, v in fields.items():
        if k.startswith("concept_"):
            out.setdefault("concepts", {})[k.removeprefix("concept_")] = v
        else:
            out[k] = v
    return out
