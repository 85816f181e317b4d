"""Reading a request's parts into checked inputs: the form's fields (each known, each at most once), an uploaded
image (content type, size) and the metadata JSON (size and nesting bounded before parsing, then validated) —
errors reported without echoing the input."""
from __future__ import annotations

import json

from fastapi import UploadFile
from pydantic import ValidationError

from ..tasks import MODALITIES
from .config import ServiceConfig
from .inputs import InputError, Upload
from .schemas import MONET_CONCEPTS, PatientMetadata

MAX_METADATA_CHARS = 16_384
MAX_METADATA_DEPTH = 8          # the schema needs 3 ({"concepts": {"dermoscopic": {name: score}}})
FORM_FIELDS = {"clinical", "dermoscopic", "metadata"}
# the only parts of an error location that may be shown back: names the API defines, never the client's own keys
_SAFE_LOC = (set(PatientMetadata.model_fields) | set(MODALITIES) | FORM_FIELDS | set(MONET_CONCEPTS)
             | {"query", "header", "path", "explain", "format", "request_id", "diagnosis", "confirmation",
                "amendment", "reason", "version", "share", "a", "b", "delta"})


def check_form(form) -> None:
    """Every field of the multipart form known and sent at most once — a second copy never silently wins."""
    keys = [k for k, _ in form.multi_items()]
    unknown = {k for k in keys if k not in FORM_FIELDS}
    if unknown:
        raise InputError(422, "unknown_field", f"{len(unknown)} unknown form field(s); expected 'clinical', "
                         "'dermoscopic' (image files) and 'metadata' (JSON)")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise InputError(422, "duplicate_field", f"form field(s) {', '.join(repr(k) for k in repeated)} sent more "
                         "than once; send each at most once", repeated[0])


async def read_upload(modality: str, up: UploadFile, config: ServiceConfig) -> Upload:
    lim = config.limits
    ctype = (up.content_type or "").split(";")[0].strip().lower()
    if ctype not in lim.allowed_content_types:
        raise InputError(415, "unsupported_media_type",
                         f"{modality} image: its content type is not accepted; send one of "
                         f"{', '.join(lim.allowed_content_types)}", modality)
    data = await up.read(lim.max_upload_bytes + 1)
    if len(data) > lim.max_upload_bytes:
        raise InputError(413, "payload_too_large",
                         f"{modality} image is larger than the limit of {lim.max_upload_bytes:,} bytes", modality)
    return Upload(modality, data, ctype)


def json_depth(text: str) -> int:
    """The deepest nesting of arrays / objects in JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


class DuplicateKey(ValueError):
    """A JSON object names the same key twice (the last copy must never silently win)."""

    def __init__(self, key: str):
        super().__init__("duplicate key")
        self.key = key


def _unique_pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def strict_json_loads(text: str | bytes):
    """``json.loads`` that refuses an object naming a key twice (``DuplicateKey``) — ``{"age": 5, "age": 90}`` is
    ambiguous, not "90"."""
    return json.loads(text, object_pairs_hook=_unique_pairs)


def safe_name(key: str) -> str:
    """A key as it may be shown back: a name the API defines, else ``*``."""
    return key if key in _SAFE_LOC else "*"


def parse_metadata(raw: str | None, concepts: frozenset[str] | None = None) -> PatientMetadata:
    """The metadata field as validated ``PatientMetadata``; ``concepts``: the concept names accepted
    (``schemas.known_concepts``), None = any well-formed name."""
    if raw is None or not raw.strip():
        return PatientMetadata()
    if len(raw) > MAX_METADATA_CHARS:
        raise InputError(422, "invalid_metadata", f"metadata is longer than {MAX_METADATA_CHARS} characters", "metadata")
    if json_depth(raw) > MAX_METADATA_DEPTH:
        raise InputError(422, "invalid_metadata", f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep "
                         "(a flat object with a 'concepts' object of per-image scores is expected)", "metadata")
    try:
        obj = strict_json_loads(raw)
    except DuplicateKey as e:
        raise InputError(422, "invalid_metadata", f"metadata names the key {safe_name(e.key)!r} more than once; "
                         "send each key once", "metadata") from None
    except json.JSONDecodeError as e:
        raise InputError(422, "invalid_metadata", f"metadata is not valid JSON ({e.msg} at position {e.pos})",
                         "metadata") from None
    except RecursionError:  # the depth check above makes this unreachable; kept as the last line of defence
        raise InputError(422, "invalid_metadata", "metadata is nested too deeply", "metadata") from None
    if not isinstance(obj, dict):
        raise InputError(422, "invalid_metadata", "metadata must be a JSON object, e.g. {\"age\": 55, \"site\": \"trunk\"}",
                         "metadata")
    try:
        return PatientMetadata.model_validate(obj, context={"concepts": concepts} if concepts is not None else None)
    except ValidationError as e:
        details = clean_errors(e.errors())
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise InputError(422, "invalid_metadata", f"invalid metadata — {summary}", "metadata", details) from None


def clean_errors(errors) -> list[dict]:
    """Pydantic / FastAPI errors without the offending input echoed back (it may be anything): no ``input``, and
    of the location only the names the API defines (a client's own key is shown as ``*``)."""
    out = []
    for e in errors:
        where = tuple(e.get("loc", ()))
        loc = ".".join(str(x) if isinstance(x, int) or x in _SAFE_LOC else "*" for x in where if x != "body")
        msg = e.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        out.append({"field": loc or ("body" if where[:1] == ("body",) else "metadata"), "message": msg,
                    "type": e.get("type", "")})
    return out
