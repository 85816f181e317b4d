"""Reference models the fusion network has to beat.

- ``single_image``: one encoder on one modality (optionally plus a metadata MLP; optionally multi-task, with
  dermoscopic criteria heads, ``criteria: seven_point``).
- ``late_fusion``: each view encoded separately; pooled features averaged over the views present,
  concatenated with a concept/metadata summary, then one head.
- ``early_fusion``: clinical and dermoscopic images stacked into a 6-channel input of one CNN.
  An absent image is *replaced* by a learned constant image (so its pixels cannot matter) and a
  presence flag per view goes to the head, which can then learn what "no clinical photo" means.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.features import FeatureSpec
from .backbones import create_backbone
from .base import MultiModalNet, drop_metadata, drop_present
from .criteria_heads import add_criteria_outputs, CriteriaHeads
from .layers import MLPHead, masked_mean
from .registry import register_model
from .tokens import ConceptTokenizer, MetadataTokenizer


class _TabularSummary(nn.Module):
    """Concept + metadata tokens, masked-mean pooled: a fixed-width summary (zeros when nothing is known)."""

    def __init__(self, feature_spec: FeatureSpec, dim: int, use_concepts: bool = True, use_metadata: bool = True,
                 metadata_dropout: float = 0.0):
        super().__init__()
        self.metadata_dropout = metadata_dropout
        self.k = len(feature_spec.concepts) if use_concepts else 0
        self.use_metadata = use_metadata
        self.concepts = ConceptTokenizer(self.k, dim, [feature_spec.concept_modality(c)
                                                       for c in feature_spec.concepts[:self.k]])
        self.metadata = MetadataTokenizer(feature_spec.numeric if use_metadata else [],
                                          feature_spec.categorical_sizes if use_metadata else {}, dim)
        self.dim = dim

    def forward(self, batch: dict, b: int, device) -> torch.Tensor:
        # only the token groups the model has: a zero-width group adds nothing to the mean, and reshaping an empty
        # tensor to (b, 0, dim) pins the batch size when the network is exported with a dynamic batch
        k, n = self.k, len(self.metadata.numeric_names)
        tokens, masks = [], []
        if k:
            ct, cm = self.concepts(batch.get("concepts", torch.zeros(b, k, device=device))[:, :k].float(),
                                   batch.get("concepts_present", torch.zeros(b, k, dtype=torch.bool,
                                                                             device=device))[:, :k].bool())
            tokens.append(ct.reshape(b, k, self.dim))
            masks.append(cm.reshape(b, k))
        if self.use_metadata and (n or len(self.metadata.categorical)):
            # a model with categorical fields only (Derm7pt: sex, site, elevation) has no numeric inputs: its
            # exported graph has none either, so what is absent reads as zero-width
            nump = batch.get("numeric_present", torch.zeros(b, n, dtype=torch.bool, device=device)).bool()
            num = batch.get("numeric", torch.zeros(b, n, device=device)).float()
            cat = batch.get("categorical", torch.zeros(b, 0, dtype=torch.long, device=device)).long()
            if self.training:
                nump, cat = drop_metadata(nump, cat, self.metadata_dropout)
            mt, mm = self.metadata(num, nump, cat)
            tokens.append(mt)
            masks.append(mm)
        if not tokens:
            return torch.zeros(b, self.dim, device=device)
        return masked_mean(torch.cat(tokens, 1), torch.cat(masks, 1))


@register_model("single_image")
class SingleImage(MultiModalNet):
    def __init__(self, num_classes: int, feature_spec: FeatureSpec, *, modality: str | None = None, encoder=None,
                 pretrained_path=None, freeze_blocks: int = 0, use_metadata: bool = False, metadata_dropout: float = 0.0,
                 use_concepts: bool = False, meta_dim: int = 64, dropout: float = 0.0, criteria: str | None = None,
                 criteria_weight: float = 1.0, **backbone_kwargs):
        modality = modality or feature_spec.modalities[0]
        if modality not in feature_spec.modalities:
            raise ValueError(f"modality {modality!r} is not in feature_spec.modalities {feature_spec.modalities}")
        super().__init__(feature_spec, [modality], encoder=encoder, pretrained_path=pretrained_path,
                         freeze_blocks=freeze_blocks, **backbone_kwargs)
        dim = self.encoder(modality).dim
        self.missing_image = nn.Parameter(torch.zeros(dim))  # stands in for an absent image
        self.tabular = _TabularSummary(feature_spec, meta_dim, use_concepts, use_metadata, metadata_dropout) \
            if (use_metadata or use_concepts) else None
        self.head = MLPHead(dim + (meta_dim if self.tabular is not None else 0), num_classes,
                            hidden=max(dim // 2, 32), dropout=dropout)
        # multi-task: dermoscopic criteria (e.g. criteria: seven_point) predicted from the same features
        self.criteria_heads = CriteriaHeads(criteria, dim + (meta_dim if self.tabular is not None else 0),
                                            criteria_weight, dropout) if criteria else None

    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        present = self.image_presence(batch)
        m = self.modalities[0]
        pooled = self.encode_images(batch, present)[m][1]
        pooled = torch.where(present[:, :1], pooled, self.missing_image.expand_as(pooled))
        feats = pooled if self.tabular is None else torch.cat([pooled, self.tabular(batch, pooled.shape[0],
                                                                                    pooled.device)], 1)
        out = {"logits": self.head(feats), "features": feats, "aux": {}, "aux_mask": {}}
        return add_criteria_outputs(out, self.criteria_heads, feats, batch, self.training)


@register_model("late_fusion")
class LateFusion(MultiModalNet):
    def __init__(self, num_classes: int, feature_spec: FeatureSpec, *, encoder=None, shared_encoder: bool = False,
                 pretrained_path=None, freeze_blocks: int = 0, fusion_dim: int = 128, use_tabular: bool = True,
                 modality_dropout: float = 0.0, metadata_dropout: float = 0.0, dropout: float = 0.0,
                 aux_heads: bool = True, **backbone_kwargs):
        super().__init__(feature_spec, encoder=encoder, shared_encoder=shared_encoder, pretrained_path=pretrained_path,
                         freeze_blocks=freeze_blocks, **backbone_kwargs)
        self.modality_dropout = modality_dropout
        self.proj = nn.ModuleDict({m: nn.Linear(self.encoder(m).dim, fusion_dim) for m in self.modalities})
        self.tabular = _TabularSummary(feature_spec, fusion_dim, metadata_dropout=metadata_dropout) \
            if use_tabular else None
        self.head = MLPHead(fusion_dim * (2 if use_tabular else 1), num_classes, dropout=dropout)
        self.aux_heads = nn.ModuleDict({m: nn.Linear(self.encoder(m).dim, num_classes) for m in self.modalities}) \
            if aux_heads else nn.ModuleDict()

    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        present = self.image_presence(batch)
        if self.training:
            present = drop_present(present, self.modality_dropout)
        enc = self.encode_images(batch, present)
        views = torch.stack([self.proj[m](enc[m][1]) for m in self.modalities], 1)  # B×M×D
        feats = masked_mean(views, present)
        if self.tabular is not None:
            feats = torch.cat([feats, self.tabular(batch, feats.shape[0], feats.device)], 1)
        out = {"logits": self.head(feats), "features": feats, "aux": {}, "aux_mask": {}}
        for j, m in enumerate(self.modalities):
            if m in self.aux_heads:
                out["aux"][m], out["aux_mask"][m] = self.aux_heads[m](enc[m][1]), present[:, j]
        return out


@register_model("early_fusion")
class EarlyFusion(nn.Module):
    """6-channel CNN on [clinical, dermoscopic]. Both views must share one input size and normalisation."""

    def __init__(self, num_classes: int, feature_spec: FeatureSpec, *, encoder="timm:resnet18", input_size: int = 64,
                 modalities: tuple[str, str] = ("clinical", "dermoscopic"), dropout: float = 0.0, **backbone_kwargs):
        super().__init__()
        if isinstance(encoder, str):
            encoder = {"name": encoder}
        encoder = dict(encoder)
        if not encoder["name"].startswith("timm:"):
            raise ValueError("early_fusion needs a timm backbone (it is built with in_chans=6)")
        self.feature_spec, self.modalities = feature_spec, [m for m in modalities if m in feature_spec.modalities]
        self.encoders = nn.ModuleDict({"joint": create_backbone({**encoder, "in_chans": 3 * len(self.modalities)},
                                                                input_size=input_size, **backbone_kwargs)})
        self.fill = nn.Parameter(torch.zeros(len(self.modalities), 3, 1, 1))  # learned stand-in for an absent view
        dim = self.encoders["joint"].dim
        self.head = MLPHead(dim + len(self.modalities), num_classes, dropout=dropout)

    @property
    def data_config(self) -> dict[str, dict]:
        return {m: dict(self.encoders["joint"].data_config) for m in self.modalities}

    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        cols = [self.feature_spec.modalities.index(m) for m in self.modalities]
        present = batch["image_present"].bool()[:, cols]
        views = []
        for j, m in enumerate(self.modalities):
            x = batch["images"][m]
            views.append(torch.where(present[:, j, None, None, None], x, self.fill[j].expand_as(x)))
        _, pooled = self.encoders["joint"].forward_tokens(torch.cat(views, 1))
        feats = torch.cat([pooled, present.to(pooled.dtype)], 1)
        return {"logits": self.head(feats), "features": feats, "aux": {}, "aux_mask": {}}
