"""Reading a request's parts into checked inputs: an uploaded image (content type, size) and the metadata JSON
(parsed and validated, errors reported without echoing the input)."""
from __future__ import annotations

import json

from fastapi import UploadFile
from pydantic import ValidationError

from .config import ServiceConfig
from .inputs import InputError, Upload
from .schemas import PatientMetadata

MAX_METADATA_CHARS = 16_384
FORM_FIELDS = {"clinical", "dermoscopic", "metadata"}


async def read_upload(modality: str, up: UploadFile, config: ServiceConfig) -> Upload:
    lim = config.limits
    ctype = (up.content_type or "").split(";")[0].strip().lower()
    if ctype not in lim.allowed_content_types:
        raise InputError(415, "unsupported_media_type",
                         f"{modality} image: content type {ctype or 'none'!r} is not accepted; send one of "
                         f"{', '.join(lim.allowed_content_types)}", modality)
    data = await up.read(lim.max_upload_bytes + 1)
    if len(data) > lim.max_upload_bytes:
        raise InputError(413, "payload_too_large",
                         f"{modality} image is larger than the limit of {lim.max_upload_bytes:,} bytes", modality)
    return Upload(modality, data, ctype)


def parse_metadata(raw: str | None) -> PatientMetadata:
    if raw is None or not raw.strip():
        return PatientMetadata()
    if len(raw) > MAX_METADATA_CHARS:
        raise InputError(422, "invalid_metadata", f"metadata is longer than {MAX_METADATA_CHARS} characters", "metadata")
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(422, "invalid_metadata", f"metadata is not valid JSON ({e.msg} at position {e.pos})",
                         "metadata") from None
    if not isinstance(obj, dict):
        raise InputError(422, "invalid_metadata", "metadata must be a JSON object, e.g. {\"age\": 55, \"site\": \"trunk\"}",
                         "metadata")
    try:
        return PatientMetadata.model_validate(obj)
    except ValidationError as e:
        details = clean_errors(e.errors())
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise InputError(422, "invalid_metadata", f"invalid metadata — {summary}", "metadata", details) from None


def clean_errors(errors) -> list[dict]:
    """Pydantic errors without the offending input echoed back (it may be anything)."""
    out = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",))
        msg = e.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        out.append({"field": loc or "metadata", "message": msg, "type": e.get("type", "")})
    return out
