"""The feature table of the tabular expert: concepts + metadata + derived features, in a fixed order.

A `TabularFeatureSpec` is derived once from the training manifest and stored in the bundle config,
so that prediction builds exactly the same columns (same order, same categorical vocabularies) as
training did. Missing values stay NaN (gradient-boosted trees route them on their own); categorical
metadata becomes a pandas `Categorical` with a fixed vocabulary, unknown values -> NaN.

Derived features (why): the two views of a lesion see the same concept differently — a crust that
scores high on the close-up but low under the dermatoscope says something about the lesion surface —
so per concept we add the clinical−dermoscopic difference, the mean and a log-ratio; per view we add
the concept total and each concept's share of it (MONET scores share a common scale per image, so
shares remove the per-image brightness/quality offset); plus missing counts and an age band.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ..data.features import SEXES, SITES, SKIN_TONES
from ..errors import DermfusionError
from ..tasks import MODALITIES

CONCEPT_PREFIX = "concept_"
_EPS = 1e-3


class FeatureError(DermfusionError, ValueError):
    """A manifest the tabular expert cannot turn into features; the message says what to fix."""


def concept_names(df: pd.DataFrame, modalities=MODALITIES) -> list[str]:
    """Concept names found in `concept_<modality>_<name>` columns, sorted, union over modalities."""
    names: set[str] = set()
    for col in df.columns:
        if not col.startswith(CONCEPT_PREFIX):
            continue
        rest = col[len(CONCEPT_PREFIX):]
        for m in modalities:
            if rest.startswith(m + "_"):
                names.add(rest[len(m) + 1:])
    return sorted(names)


@dataclass
class TabularFeatureSpec:
    """Which columns the tabular expert sees, in which order."""

    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    concepts: list[str] = field(default_factory=list)          # concept *names*, e.g. "hair"
    use_metadata: bool = True
    derived: bool = True
    categorical: dict[str, list[str]] = field(
        default_factory=lambda: {"sex": list(SEXES), "skin_tone": list(SKIN_TONES), "site": list(SITES)})
    columns: list[str] = field(default_factory=list)            # filled by from_manifest; the fixed order

    @classmethod
    def from_manifest(cls, df: pd.DataFrame, modalities=MODALITIES, use_metadata: bool = True,
                      derived: bool = True) -> "TabularFeatureSpec":
        modalities = [m for m in modalities if any(c.startswith(f"{CONCEPT_PREFIX}{m}_") for c in df.columns)] \
            or list(modalities)
        spec = cls(modalities=list(modalities), concepts=concept_names(df, modalities),
                   use_metadata=use_metadata, derived=derived)
        if not use_metadata:
            spec.categorical = {}
        if not spec.concepts and not use_metadata:
            raise FeatureError("the manifest has no concept_<modality>_<name> columns and metadata is switched "
                               "off: there is nothing for the tabular expert to learn from")
        spec.columns = list(spec._build(df.iloc[:0]).columns)
        return spec

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TabularFeatureSpec":
        return cls(**d)

    @property
    def categorical_columns(self) -> list[str]:
        return list(self.categorical)

    # ------------------------------------------------------------------ building
    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Feature table for `df`, columns exactly `self.columns` (missing inputs -> NaN)."""
        if not isinstance(df, pd.DataFrame):
            raise FeatureError(f"expected a manifest DataFrame, got {type(df).__name__}")
        out = self._build(df)
        if self.columns and list(out.columns) != self.columns:
            raise FeatureError("feature columns differ from the ones recorded at training time; "
                               "was the spec edited by hand?")
        return out

    def _concept(self, df: pd.DataFrame, modality: str, name: str) -> np.ndarray:
        col = f"{CONCEPT_PREFIX}{modality}_{name}"
        if col not in df.columns:
            return np.full(len(df), np.nan)
        return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)

    def _build(self, df: pd.DataFrame) -> pd.DataFrame:
        n = len(df)
        cols: dict[str, np.ndarray | pd.Categorical] = {}
        raw = {m: {c: self._concept(df, m, c) for c in self.concepts} for m in self.modalities}
        for m in self.modalities:
            for c in self.concepts:
                cols[f"{m}_{c}"] = raw[m][c]
        if self.use_metadata:
            age = pd.to_numeric(df["age"], errors="coerce").to_numpy(float) if "age" in df.columns \
                else np.full(n, np.nan)
            age = np.where((age >= 0) & (age <= 120), age, np.nan)
            cols["age"] = age
            for name, vocab in self.categorical.items():
                values = df[name].fillna("").astype(str).str.replace(r"\.0$", "", regex=True) \
                    if name in df.columns else pd.Series([""] * n)
                cols[name] = pd.Categorical(values.where(values.isin(vocab)), categories=vocab)
            if "skin_tone" in self.categorical:
                cols["skin_tone_num"] = pd.to_numeric(pd.Series(np.asarray(cols["skin_tone"], dtype=object)),
                                                      errors="coerce").to_numpy(float)
        if self.derived:
            if self.use_metadata:
                cols["age_band"] = np.floor(cols["age"] / 10.0)
            if len(self.modalities) == 2 and self.concepts:
                a, b = self.modalities
                for c in self.concepts:
                    x, y = raw[a][c], raw[b][c]
                    cols[f"diff_{c}"] = x - y
                    cols[f"mean_{c}"] = (x + y) / 2.0
                    cols[f"logratio_{c}"] = np.log((x + _EPS) / (y + _EPS))
            for m in self.modalities:
                if not self.concepts:
                    break
                mat = np.stack([raw[m][c] for c in self.concepts], axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    total = np.nansum(mat, axis=1)
                    total = np.where(np.isnan(mat).all(axis=1), np.nan, total)
                    cols[f"{m}_total"] = total
                    for j, c in enumerate(self.concepts):
                        cols[f"{m}_share_{c}"] = mat[:, j] / (total + _EPS)
            missing = np.zeros(n)
            for m in self.modalities:
                for c in self.concepts:
                    missing += np.isnan(raw[m][c])
            if self.use_metadata:
                missing += np.isnan(cols["age"])
                for name in self.categorical:
                    missing += pd.isna(np.asarray(cols[name], dtype=object)).astype(float)
            cols["n_missing"] = missing
        return pd.DataFrame(cols, index=df.index).reset_index(drop=True)


def build_features(df: pd.DataFrame, spec: TabularFeatureSpec | None = None) -> tuple[pd.DataFrame, TabularFeatureSpec]:
    """(feature table, spec): derives the spec from `df` when none is given."""
    spec = spec or TabularFeatureSpec.from_manifest(df)
    return spec.transform(df), spec
