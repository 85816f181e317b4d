"""Which inputs a model sees, and how metadata values are encoded.

A FeatureSpec is derived once from a training manifest and stored in every bundle, so that
prediction encodes metadata exactly as training did. Index 0 of every categorical vocabulary
means "unknown" — missing values are masked, never treated as observed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ..errors import DermfusionError
from .manifest import concept_columns

SEXES = ("female", "male")
SKIN_TONES = ("0", "1", "2", "3", "4", "5")
# Canonical anatomical sites (MILK10k vocabulary plus "acral"); importers map their own names onto these.
SITES = (
    "head_neck_face", "trunk", "upper_extremity", "lower_extremity", "hand", "foot", "acral", "genital",
)
SITE_ALIASES = {
    "face": "head_neck_face", "scalp": "head_neck_face", "ear": "head_neck_face", "neck": "head_neck_face",
    "head neck": "head_neck_face", "head/neck": "head_neck_face", "head_neck": "head_neck_face",
    "back": "trunk", "abdomen": "trunk", "chest": "trunk", "buttocks": "trunk", "anterior torso": "trunk",
    "posterior torso": "trunk", "lateral torso": "trunk", "torso": "trunk",
    "upper extremity": "upper_extremity", "upper limbs": "upper_extremity", "arm": "upper_extremity",
    "forearm": "upper_extremity",
    "lower extremity": "lower_extremity", "lower limbs": "lower_extremity", "thigh": "lower_extremity",
    "leg": "lower_extremity",
    "palms/soles": "acral", "genital areas": "genital", "oral/genital": "genital",
}
# Derm7pt's clinical elevation of the lesion (meta.csv `elevation`), an observation made before any decision
ELEVATIONS = ("flat", "palpable", "nodular")
MISSING_TOKENS = {"", "unknown", "nan", "none", "na", "n/a", "?"}
AGE_RANGE = (0.0, 120.0)

# Every metadata field a network can read (``data.metadata_fields`` picks among them; default: DEFAULT_METADATA):
# numeric fields with the scale that brings them to about [0, 1], categorical ones with their vocabulary.
NUMERIC_FIELDS = {"age": AGE_RANGE[1]}
CATEGORICAL_FIELDS = {"sex": SEXES, "skin_tone": SKIN_TONES, "site": SITES, "elevation": ELEVATIONS}
DEFAULT_METADATA = ("age", "sex", "skin_tone", "site")
# Columns that record a clinician's decision or how the label was obtained: reading them would leak the label
# (Derm7pt's `management` — excision, follow-up — is decided *because of* the suspected diagnosis).
LABEL_LEAKS = ("management", "management_label_leak", "dx_confirmation", "diagnosis_fine")


class FeatureError(DermfusionError, ValueError):
    """Metadata fields a network cannot read; the message names the ones it can."""


def check_metadata_fields(fields) -> list[str]:
    """``fields`` validated: known to NUMERIC_FIELDS / CATEGORICAL_FIELDS, none a label leak, no repeats."""
    fields = [str(f) for f in fields]
    leaks = [f for f in fields if f in LABEL_LEAKS or f.startswith(("label_", "aux_"))]
    if leaks:
        raise FeatureError(f"metadata field(s) {leaks} are never model inputs: they record the diagnosis or a "
                           "clinician's decision made because of it (a label leak); analyse them with "
                           "`dermfusion evaluate --subset-column` instead")
    unknown = [f for f in fields if f not in NUMERIC_FIELDS and f not in CATEGORICAL_FIELDS]
    if unknown:
        raise FeatureError(f"unknown metadata field(s) {unknown}: a network reads "
                           f"{', '.join([*NUMERIC_FIELDS, *CATEGORICAL_FIELDS])}")
    if len(set(fields)) != len(fields):
        raise FeatureError(f"metadata fields {fields} name one field twice")
    return fields


def canonical_site(value) -> str:
    """Map a dataset's body-site name to the canonical vocabulary; "" when unknown."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    v = str(value).strip().lower().replace("-", " ")
    if v in MISSING_TOKENS:
        return ""
    v = SITE_ALIASES.get(v, v).replace(" ", "_")
    return v if v in SITES else ""


def canonical_elevation(value) -> str:
    """Derm7pt's elevation (flat / palpable / nodular); "" when unknown."""
    v = "" if value is None else str(value).strip().lower()
    return v if v in ELEVATIONS else ""


def canonical_sex(value) -> str:
    v = "" if value is None else str(value).strip().lower()
    return {"m": "male", "f": "female"}.get(v, v) if v in {"m", "f", *SEXES} else ""


@dataclass
class FeatureSpec:
    """The model's inputs: image modalities, concept columns, numeric and categorical metadata."""

    modalities: list[str]
    concepts: list[str] = field(default_factory=list)           # manifest columns, e.g. concept_clinical_hair
    numeric: list[str] = field(default_factory=lambda: ["age"])
    categorical: dict[str, list[str]] = field(
        default_factory=lambda: {"sex": list(SEXES), "skin_tone": list(SKIN_TONES), "site": list(SITES)}
    )

    @classmethod
    def from_manifest(cls, df: pd.DataFrame, modalities: list[str] | tuple[str, ...], use_metadata: bool = True,
                      use_concepts: bool = True, metadata_fields=None) -> "FeatureSpec":
        """``metadata_fields``: the metadata to read, in token order (NUMERIC_FIELDS / CATEGORICAL_FIELDS; None =
        DEFAULT_METADATA, the spec's defaults)."""
        spec = cls(modalities=list(modalities), concepts=concept_columns(df) if use_concepts else [])
        if not use_metadata:
            spec.numeric, spec.categorical = [], {}
        elif metadata_fields is not None:
            fields = check_metadata_fields(metadata_fields)
            spec.numeric = [f for f in fields if f in NUMERIC_FIELDS]
            spec.categorical = {f: list(CATEGORICAL_FIELDS[f]) for f in fields if f in CATEGORICAL_FIELDS}
        return spec

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**d)

    @property
    def categorical_sizes(self) -> dict[str, int]:
        """Vocabulary size per categorical field, including index 0 for "unknown"."""
        return {k: len(v) + 1 for k, v in self.categorical.items()}

    def encode_numeric(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(values scaled to about [0, 1], present mask); missing values are 0 with present=False."""
        if not self.numeric:
            return np.zeros((len(df), 0), np.float32), np.zeros((len(df), 0), bool)
        vals = df[self.numeric].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        present = ~np.isnan(vals)
        scale = np.array([NUMERIC_FIELDS.get(c, 1.0) for c in self.numeric], np.float32)
        return np.where(present, vals / scale, 0.0).astype(np.float32), present

    def encode_categorical(self, df: pd.DataFrame) -> np.ndarray:
        """N x Q int64 codes; 0 = unknown / missing."""
        out = np.zeros((len(df), len(self.categorical)), np.int64)
        for j, (name, vocab) in enumerate(self.categorical.items()):
            lookup = {v: i + 1 for i, v in enumerate(vocab)}
            col = df[name] if name in df.columns else pd.Series([""] * len(df))
            out[:, j] = [lookup.get(str(v), 0) for v in col.fillna("").astype(str)]
        return out

    def encode_concepts(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        if not self.concepts:
            return np.zeros((len(df), 0), np.float32), np.zeros((len(df), 0), bool)
        cols = [df[c] if c in df.columns else pd.Series([np.nan] * len(df)) for c in self.concepts]
        vals = np.stack([pd.to_numeric(c, errors="coerce").to_numpy(np.float32) for c in cols], axis=1)
        present = ~np.isnan(vals)
        return np.where(present, vals, 0.0).astype(np.float32), present

    def concept_modality(self, column: str) -> str:
        """concept_clinical_hair -> clinical."""
        rest = column.removeprefix("concept_")
        for m in self.modalities + ["clinical", "dermoscopic"]:
            if rest.startswith(m + "_"):
                return m
        return ""
