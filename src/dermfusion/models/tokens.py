"""Turning concept scores and patient metadata into tokens that attention can read.

One token per concept and per metadata field, each with its own learned identity, so attention
weights can be reported per concept column / per field. Absent values are *masked* (the returned
``present`` mask) rather than fed in as zeros that would look like observations.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ConceptTokenizer(nn.Module):
    """token_k = e_k + score_k · d_k + m_{modality(k)}; present = concepts_present."""

    def __init__(self, num_concepts: int, dim: int, concept_modalities: Sequence[int | str] | None = None):
        super().__init__()
        self.num_concepts = num_concepts
        mods = list(concept_modalities) if concept_modalities is not None else [0] * num_concepts
        if len(mods) != num_concepts:
            raise ValueError(f"concept_modalities has {len(mods)} entries for {num_concepts} concepts")
        names = sorted({m for m in mods if isinstance(m, str)})
        ids = [names.index(m) if isinstance(m, str) else int(m) for m in mods]
        self.register_buffer("modality_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.concept_embed = nn.Parameter(torch.randn(num_concepts, dim) * 0.02)
        self.score_direction = nn.Parameter(torch.randn(num_concepts, dim) * 0.02)
        self.modality_embed = nn.Parameter(torch.zeros(max(ids, default=0) + 1, dim))

    def forward(self, scores: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.where(present, scores, torch.zeros_like(scores))  # NaN-safe and value-blind when absent
        tokens = (self.concept_embed + self.modality_embed[self.modality_ids])[None] \
            + scores[..., None] * self.score_direction[None]
        return tokens, present.bool()


class MetadataTokenizer(nn.Module):
    """Numeric fields: value·w_i + b_i, or a learned "missing" token when absent (kept visible, so the
    model knows the value is unknown). Categorical fields: an embedding; index 0 ("unknown") is masked out.
    """

    def __init__(self, numeric_names: Sequence[str], categorical_sizes: dict[str, int] | Sequence[int], dim: int):
        super().__init__()
        self.numeric_names = list(numeric_names)
        if isinstance(categorical_sizes, dict):
            self.categorical_names, sizes = list(categorical_sizes), list(categorical_sizes.values())
        else:
            sizes = list(categorical_sizes)
            self.categorical_names = [f"cat{i}" for i in range(len(sizes))]
        n = len(self.numeric_names)
        self.numeric_weight = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.numeric_bias = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.numeric_missing = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.categorical = nn.ModuleList(nn.Embedding(s, dim) for s in sizes)
        for emb in self.categorical:
            nn.init.normal_(emb.weight, std=0.02)

    @property
    def token_names(self) -> list[str]:
        return self.numeric_names + self.categorical_names

    def forward(self, numeric: torch.Tensor, numeric_present: torch.Tensor,
                categorical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts, masks = [], []
        if self.numeric_names:
            value = torch.where(numeric_present, numeric, torch.zeros_like(numeric))
            observed = value[..., None] * self.numeric_weight + self.numeric_bias
            parts.append(torch.where(numeric_present[..., None], observed, self.numeric_missing.expand_as(observed)))
            masks.append(torch.ones_like(numeric_present, dtype=torch.bool))
        if len(self.categorical):
            parts.append(torch.stack([emb(categorical[:, j]) for j, emb in enumerate(self.categorical)], dim=1))
            masks.append(categorical > 0)
        if not parts:
            b = numeric.shape[0]
            return numeric.new_zeros(b, 0, self.numeric_weight.shape[1]), numeric.new_zeros(b, 0, dtype=torch.bool)
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)
