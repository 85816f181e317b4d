"""Fill a manifest's missing concept columns with computed scores (``dermfusion concepts``).

Supplied scores are kept as they are; only empty cells (``concept_<modality>_<name>`` NaN or absent) of rows that
have that modality's image are computed. With ``fit_mapping``, images that have both a supplied and a computed score
fit the per-concept monotone map (computed → supplied) first, so every computed score lands on the supplied scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data.manifest import IMAGE_COLUMNS
from .mapping import ConceptMapping
from .scorer import ConceptScorer


@dataclass
class FillReport:
    supplied: int = 0                      # concept cells that already had a score
    computed: int = 0                      # cells filled with a computed score
    images_scored: int = 0                 # images sent through the model (cache hits excluded)
    cache_hits: int = 0
    no_image: int = 0                      # empty cells left empty: no image of that modality
    mapping: ConceptMapping | None = None  # the map fitted here (fit_mapping=True)
    per_modality: dict = field(default_factory=dict)


def column(modality: str, concept: str) -> str:
    return f"concept_{modality}_{concept}"


def fill_concepts(df: pd.DataFrame, scorer: ConceptScorer, *, modalities=None, overwrite: bool = False,
                  fit_mapping: bool = False) -> tuple[pd.DataFrame, FillReport]:
    df, report = df.copy(), FillReport()
    mods = [m for m in (modalities or IMAGE_COLUMNS) if IMAGE_COLUMNS[m] in df.columns]
    calls0 = scorer.model_calls
    hits0 = scorer.cache.hits if scorer.cache is not None else 0
    raw_all = {}
    for m in mods:
        cols = [column(m, c) for c in scorer.names]
        for col in cols:
            if col not in df.columns:
                df[col] = np.nan
        has_image = df[IMAGE_COLUMNS[m]].astype(str).str.len() > 0
        empty = df[cols].isna() | overwrite
        report.no_image += int((empty & ~has_image.to_numpy()[:, None]).to_numpy().sum())
        need = has_image & (empty.any(axis=1) | fit_mapping)
        report.supplied += int((~df[cols].isna()).to_numpy().sum()) if not overwrite else 0
        if not need.any():
            report.per_modality[m] = 0
            continue
        idx = df.index[need]
        raw = scorer.score_files(df.loc[idx, IMAGE_COLUMNS[m]].tolist(), mapped=False)
        raw_all[m] = (idx, pd.DataFrame(raw, index=idx)[scorer.names], empty.loc[idx])
    if fit_mapping:
        comp = {c: np.concatenate([r[c].to_numpy() for _, r, _ in raw_all.values()]) for c in scorer.names}
        ref = {c: np.concatenate([df.loc[i, column(m, c)].to_numpy() for m, (i, _, _) in raw_all.items()])
               for c in scorer.names}
        report.mapping = scorer.mapping = ConceptMapping.fit_isotonic(comp, ref)
        report.mapping.scorer = scorer.identity  # what it was fitted on: applying it to another scorer is flagged
    for m, (idx, raw, empty) in raw_all.items():
        n = 0
        for c in scorer.names:
            values = scorer.mapping.apply(c, raw[c].to_numpy()) if scorer.mapping is not None else raw[c].to_numpy()
            cell = empty[column(m, c)].to_numpy()
            df.loc[idx[cell], column(m, c)] = values[cell]
            n += int(cell.sum())
        report.per_modality[m] = n
        report.computed += n
    report.images_scored = scorer.model_calls - calls0
    report.cache_hits = (scorer.cache.hits - hits0) if scorer.cache is not None else 0
    return df, report
