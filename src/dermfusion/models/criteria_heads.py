"""Dermoscopic criteria heads (multi-task learning): one linear head per criterion of a criteria set (the
7-point checklist for Derm7pt) on the features the diagnosis head sees.

While training, the batch's ``criteria`` (B×K grouped-label indices, −1 = not annotated) give a cross-entropy
per criterion over the annotated rows; their mean, times ``weight``, is returned as the model's own loss term
(``outputs["losses"]["criteria"]``, see ``training/losses.py``). The heads' logits are always returned under
``outputs["criteria"]`` so prediction can report each criterion and the 7-point score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..criteria import get_criteria


class CriteriaHeads(nn.Module):
    def __init__(self, criteria: str, dim: int, weight: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.criteria_set, self.weight = criteria, float(weight)
        self.criteria = get_criteria(criteria)
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({c.name: nn.Linear(dim, len(c.labels)) for c in self.criteria})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.drop(features)
        return {name: head(x) for name, head in self.heads.items()}

    def loss(self, logits: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Mean over criteria of each criterion's cross-entropy on its annotated rows (0 with none), × weight."""
        terms = []
        for j, c in enumerate(self.criteria):
            z, t = logits[c.name].float(), targets[:, j].long()
            known = t >= 0
            # sum / count (not ignore_index's mean of nothing = NaN) keeps a batch without annotations finite
            terms.append(F.cross_entropy(z, t.clamp_min(0), reduction="none").mul(known).sum()
                         / known.sum().clamp_min(1))
        return self.weight * torch.stack(terms).mean()


def add_criteria_outputs(out: dict, heads: CriteriaHeads | None, features: torch.Tensor, batch: dict,
                         training: bool) -> dict:
    """``out`` with the criteria heads' logits and, while training on an annotated batch, their loss term."""
    if heads is None:
        return out
    logits = heads(features)
    out["criteria"] = logits
    if training and "criteria" in batch:
        out.setdefault("losses", {})["criteria"] = heads.loss(logits, batch["criteria"])
    return out
