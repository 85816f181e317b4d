"""TMCT-style tri-modal fusion: clinical image, dermoscopic image, concepts + metadata.

Three stages, each attention with masks (absent inputs are never attended to):

1. **View alignment** — the primary view's tokens (dermoscopic) cross-attend to the other view's
   tokens. A lesion without the primary view uses its other image as the query stream instead.
2. **Semantic gating** — the aligned tokens attend to concept and metadata tokens; a learned
   sigmoid gate decides per token how much of that context to admit.
3. **Pooling** — learned queries attend over everything present (aligned tokens, other-view
   tokens, concept and metadata tokens); an MLP head maps the pooled vector to logits.

Every attention has an always-present learned null key, so rows with nothing to attend to stay
finite. Auxiliary heads on each encoder's pooled feature (and on the tabular tokens) give deep
supervision; ``aux_mask`` says for which rows each one is meaningful.

``return_attention=True`` takes PyTorch's explicit attention path (weights materialised), so its
logits can differ from the fast path's in the last float bits; use one setting when comparing.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.features import FeatureSpec
from .base import MultiModalNet, drop_metadata, drop_present
from .layers import MaskedCrossAttention, MLPHead, masked_mean, zero_masked
from .registry import register_model
from .tokens import ConceptTokenizer, MetadataTokenizer


@register_model("trimodal_fusion")
class TriModalFusion(MultiModalNet):
    def __init__(self, num_classes: int, feature_spec: FeatureSpec, *, encoder=None, shared_encoder: bool = False,
                 pretrained_path=None, freeze_blocks: int = 0, fusion_dim: int = 128, num_heads: int = 4,
                 num_pool_queries: int = 1, dropout: float = 0.1, modality_dropout: float = 0.0,
                 concept_dropout: float = 0.0, metadata_dropout: float = 0.0, primary_modality: str = "dermoscopic", aux_heads: bool = True,
                 **backbone_kwargs):
        super().__init__(feature_spec, encoder=encoder, shared_encoder=shared_encoder, pretrained_path=pretrained_path,
                         freeze_blocks=freeze_blocks, **backbone_kwargs)
        d, mods = fusion_dim, self.modalities
        self.num_classes, self.fusion_dim = num_classes, d
        self.modality_dropout, self.concept_dropout = modality_dropout, concept_dropout
        self.metadata_dropout = metadata_dropout
        self.primary = mods.index(primary_modality) if primary_modality in mods else 0
        self.token_proj = nn.ModuleDict({m: nn.Linear(self.encoder(m).token_dim, d) for m in mods})
        self.modality_embed = nn.Parameter(torch.zeros(len(mods), d))
        self.concept_names = list(feature_spec.concepts)
        self.meta_names = list(feature_spec.numeric) + list(feature_spec.categorical)
        self.concepts = ConceptTokenizer(len(self.concept_names), d,
                                         [feature_spec.concept_modality(c) for c in self.concept_names])
        self.metadata = MetadataTokenizer(feature_spec.numeric, feature_spec.categorical_sizes, d)
        self.view_attn = MaskedCrossAttention(d, num_heads, dropout)
        self.view_norm = nn.LayerNorm(d)
        self.semantic_attn = MaskedCrossAttention(d, num_heads, dropout)
        self.semantic_gate = nn.Linear(2 * d, d)
        self.semantic_norm = nn.LayerNorm(d)
        self.pool_queries = nn.Parameter(torch.randn(1, num_pool_queries, d) * 0.02)
        self.pool_attn = MaskedCrossAttention(d, num_heads, dropout)
        self.pool_norm = nn.LayerNorm(d)
        self.head = MLPHead(d, num_classes, dropout=dropout)
        self.aux_heads = nn.ModuleDict()
        if aux_heads:
            for m in mods:
                self.aux_heads[m] = nn.Sequential(nn.LayerNorm(self.encoder(m).dim), nn.Linear(self.encoder(m).dim,
                                                                                               num_classes))
            if self.concept_names or self.meta_names:
                self.aux_heads["tabular"] = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, num_classes))

    # ------------------------------------------------------------------------------------------ helpers
    def _semantic_tokens(self, batch: dict, b: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        k = len(self.concept_names)
        cs = batch.get("concepts", torch.zeros(b, k, device=device))
        cp = batch.get("concepts_present", torch.zeros(b, k, dtype=torch.bool, device=device)).bool()
        if self.training:
            cp = drop_present(cp, self.concept_dropout, keep_one=False)
        ct, cm = self.concepts(cs.float(), cp)
        n = len(self.metadata.numeric_names)
        num = batch.get("numeric", torch.zeros(b, n, device=device)).float()
        nump = batch.get("numeric_present", torch.zeros(b, n, dtype=torch.bool, device=device)).bool()
        cat = batch.get("categorical", torch.zeros(b, len(self.metadata.categorical), dtype=torch.long,
                                                   device=device))
        if self.training:
            nump, cat = drop_metadata(nump, cat, self.metadata_dropout)
        mt, mm = self.metadata(num, nump, cat.long())
        # no reshape of the concept part: with no concepts (HAM10000-style) it is B×0×D already, and an
        # explicit Reshape(B, 0, D) exports to ONNX as "copy that dimension", which ONNX Runtime refuses
        return torch.cat([ct, mt], 1), torch.cat([cm, mm], 1), k

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        present = self.image_presence(batch)
        if self.training:
            present = drop_present(present, self.modality_dropout)
        b, mods = present.shape[0], self.modalities
        encoded = self.encode_images(batch, present)

        # Per-modality projected tokens, padded to a common length T (encoders may differ).
        toks = [self.token_proj[m](encoded[m][0]) + self.modality_embed[j] for j, m in enumerate(mods)]
        t_max = max(t.shape[1] for t in toks)
        stack = torch.stack([nn.functional.pad(t, (0, 0, 0, t_max - t.shape[1])) for t in toks], 1)  # B×M×T×D
        valid = torch.stack([torch.arange(t_max, device=present.device) < t.shape[1] for t in toks])  # M×T
        tok_mask = present[:, :, None] & valid[None]  # B×M×T
        stack = zero_masked(stack, tok_mask)

        # Query stream: the primary view, or the first present view when the primary one is absent.
        first = present.float().argmax(1)
        src = torch.where(present[:, self.primary] | ~present.any(1), torch.full_like(first, self.primary), first)
        rows = torch.arange(b, device=present.device)
        q, q_mask = stack[rows, src], tok_mask[rows, src]
        other = tok_mask & (torch.arange(len(mods), device=present.device)[None] != src[:, None])[..., None]
        kv, kv_mask = stack.flatten(1, 2), other.flatten(1, 2)

        # Stage 1: view alignment.
        a, w_view = self.view_attn(q, kv, kv_mask, need_weights=return_attention)
        z = self.view_norm(q + a)
        # Stage 2: semantic gating with concept + metadata tokens.
        sem, sem_mask, k = self._semantic_tokens(batch, b, present.device)
        s, w_sem = self.semantic_attn(z, sem, sem_mask, need_weights=return_attention)
        gate = torch.sigmoid(self.semantic_gate(torch.cat([z, s], -1)))
        z = zero_masked(self.semantic_norm(z + gate * s), q_mask)
        # Stage 3: learned-query pooling over everything present.
        seq = torch.cat([z, kv, sem], 1)
        seq_mask = torch.cat([q_mask, kv_mask, sem_mask], 1)
        pooled, w_pool = self.pool_attn(self.pool_queries.expand(b, -1, -1), seq, seq_mask,
                                        need_weights=return_attention)
        features = self.pool_norm(pooled).mean(1)
        out = {"logits": self.head(features), "features": features, "aux": {}, "aux_mask": {}}

        for j, m in enumerate(mods):
            if m in self.aux_heads:
                out["aux"][m] = self.aux_heads[m](encoded[m][1])
                out["aux_mask"][m] = present[:, j]
        if "tabular" in self.aux_heads:
            out["aux"]["tabular"] = self.aux_heads["tabular"](masked_mean(sem, sem_mask))
            out["aux_mask"]["tabular"] = sem_mask.any(1)
        if return_attention:
            out["attention"] = self._split_attention(w_pool.mean(1), w_view, w_sem, gate, src, t_max, k)
        return out

    def _split_attention(self, w, w_view, w_sem, gate, src, t_max, k) -> dict:
        """Pooling weights (B×(1+T+M·T+K+F)) split into named groups; the query stream counts for its source view."""
        mods, m_count = self.modalities, len(self.modalities)
        null, qw = w[:, 0], w[:, 1:1 + t_max]
        kvw = w[:, 1 + t_max:1 + t_max + m_count * t_max].reshape(-1, m_count, t_max)
        semw = w[:, 1 + t_max + m_count * t_max:]
        image = {}
        for j, m in enumerate(mods):
            image[m] = kvw[:, j] + torch.where((src == j)[:, None], qw, torch.zeros_like(qw))
        return {
            "image": image,
            "concept": {c: semw[:, i] for i, c in enumerate(self.concept_names)},
            "metadata": {f: semw[:, k + i] for i, f in enumerate(self.meta_names)},
            "null": null,
            "stages": {"view_alignment": w_view, "semantic": w_sem, "semantic_gate": gate.mean(-1)},
        }
