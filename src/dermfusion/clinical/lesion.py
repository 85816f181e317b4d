"""A lesion as the clinical engine sees it: decoded images and metadata in memory — never file paths.

The API builds one from an upload (``service.inputs`` decodes it), ``dermfusion predict`` / ``gate`` / ``explain``
from manifest rows (``lesions_from_manifest`` reads each file with the same safe decoder, ``data.images``); from
there every lesion takes the same path to a decision (``clinical.engine``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from ..data.images import ImageError, read_image
from ..data.manifest import IMAGE_COLUMNS, concept_columns

# manifest fields a model may read as metadata (the FeatureSpec picks its own among them)
METADATA_FIELDS = ("age", "sex", "skin_tone", "site")


@dataclass
class Lesion:
    lesion_id: str
    images: dict[str, Image.Image] = field(default_factory=dict)   # modality -> decoded RGB image
    metadata: dict = field(default_factory=dict)                   # age, sex, skin_tone, site, concept_* …
    errors: dict[str, str] = field(default_factory=dict)           # modality -> why its file could not be read


def row_metadata(row: dict, extra_columns=()) -> dict:
    """The manifest-style metadata of one row: known fields and concept scores that are present (NaN / "" =
    unknown, left out), plus ``extra_columns`` a model reads (e.g. Derm7pt's ``elevation``)."""
    out = {}
    for k in (*METADATA_FIELDS, *extra_columns, *(c for c in row if str(c).startswith("concept_"))):
        if k not in row:
            continue
        v = row[k]
        if v is None or (isinstance(v, float) and not np.isfinite(v)) or (isinstance(v, str) and v in ("", "nan")):
            continue
        out[k] = v
    return out


def lesion_from_row(row: dict, modalities=tuple(IMAGE_COLUMNS), extra_columns=()) -> Lesion:
    """One manifest row as a Lesion: each image the model uses read from its file (an unreadable file is recorded in
    ``errors`` and the image left absent, as an upload that failed to decode would be refused)."""
    images, errors = {}, {}
    for m in modalities:
        path = row.get(IMAGE_COLUMNS[m], "")
        if isinstance(path, Image.Image):
            images[m] = path
            continue
        if not isinstance(path, str) or not path or path == "nan":
            continue
        try:
            images[m] = read_image(path)
        except ImageError as e:
            errors[m] = str(e)
    return Lesion(str(row.get("lesion_id", "")), images, row_metadata(row, extra_columns), errors)


def lesions_from_manifest(df: pd.DataFrame, modalities=tuple(IMAGE_COLUMNS), chunk: int = 64,
                          extra_columns=()) -> Iterator[list[Lesion]]:
    """The manifest's rows as Lesions, ``chunk`` at a time (images are decoded lazily, one chunk in memory)."""
    records = df.to_dict("records")
    for start in range(0, len(records), chunk):
        yield [lesion_from_row(r, modalities, extra_columns) for r in records[start:start + chunk]]


def frame_from_lesions(lesions: list[Lesion], concepts=()) -> pd.DataFrame:
    """In-memory manifest rows for predictors that read frames (tabular experts, stacks): metadata columns, concept
    columns (NaN where absent) and image columns holding the decoded images themselves."""
    rows = []
    for les in lesions:
        row = {"lesion_id": les.lesion_id, "dataset": "request", "patient_id": "", "split": "", "fold": -1,
               "age": float("nan"), "sex": "", "skin_tone": "", "site": ""}
        row.update({col: les.images.get(m, "") for m, col in IMAGE_COLUMNS.items()})
        row.update(les.metadata)
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in concepts:
        if c not in df.columns:
            df[c] = float("nan")
    for c in concept_columns(df):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df
