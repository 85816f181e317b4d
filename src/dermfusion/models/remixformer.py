"""``remixformer``: a RemixFormer++-style three-branch network (Xu et al., "RemixFormer++: a multi-modal
transformer model for precision skin tumor differential diagnosis with memory-efficient attention").

- **Clinical branch** (top-down, ``remix_branches.ClinicalBranch``): global ViT with a class token, lesion
  selection from its attention, a local encoder sharing its early blocks, cross-scale cross-attention.
- **Dermoscopy branch** (bottom-up, ``remix_branches.DermoscopyBranch``): windows of the high-resolution image
  through a shared window encoder, multi-scale texture attention added to each window embedding, a region-level
  transformer.
- **Metadata branch**: one token per metadata field (and per concept score, ``use_concepts``) — embedding
  (``tokens.MetadataTokenizer``) → linear → LayerNorm → GELU.
- **Cross-modality fusion**: a small transformer over [class, clinical global, clinical local, dermoscopy global,
  dermoscopy local, metadata…] tokens, with a key mask for what is absent; the class token → head.

A branch whose image is absent contributes no token (masked), and in training its rows never enter the encoder
(``run_present_rows``). ``encoder`` may be one spec or ``{clinical: …, dermoscopic: …}`` (the clinical one must
be a timm ViT with a class token); the clinical encoder's input size is the global view, ``clinical_size`` the
photo's; the dermoscopic encoder's input size is the window, ``dermoscopic_size`` the image's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..data.features import FeatureSpec
from .base import MultiModalNet, drop_metadata, drop_present
from .layers import MLPHead, masked_mean, zero_masked
from .registry import register_model
from .base import run_present_rows
from .remix_branches import AttnBlock, ClinicalBranch, DermoscopyBranch, inner_model
from .tokens import ConceptTokenizer, MetadataTokenizer

IMAGE_TOKENS = {"clinical": ("global", "local"), "dermoscopic": ("global", "local")}


class MetadataBranch(nn.Module):
    """Metadata fields (+ concept scores) → B×F×dim tokens and their B×F presence mask."""

    def __init__(self, feature_spec: FeatureSpec, dim: int, use_concepts: bool = True, metadata_dropout: float = 0.0):
        super().__init__()
        self.metadata_dropout = metadata_dropout
        self.concept_names = list(feature_spec.concepts) if use_concepts else []
        self.concepts = ConceptTokenizer(len(self.concept_names), dim,
                                         [feature_spec.concept_modality(c) for c in self.concept_names])
        self.metadata = MetadataTokenizer(feature_spec.numeric, feature_spec.categorical_sizes, dim)
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU())

    @property
    def num_tokens(self) -> int:
        return len(self.concept_names) + len(self.metadata.token_names)

    def forward(self, batch: dict, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        k, n = len(self.concept_names), len(self.metadata.numeric_names)
        cs = batch.get("concepts", torch.zeros(b, k, device=device))[:, :k].float()
        cp = batch.get("concepts_present", torch.zeros(b, k, dtype=torch.bool, device=device))[:, :k].bool()
        ct, cm = self.concepts(cs, cp)
        num = batch.get("numeric", torch.zeros(b, n, device=device)).float()
        nump = batch.get("numeric_present", torch.zeros(b, n, dtype=torch.bool, device=device)).bool()
        cat = batch.get("categorical", torch.zeros(b, len(self.metadata.categorical), dtype=torch.long,
                                                   device=device)).long()
        if self.training:
            nump, cat = drop_metadata(nump, cat, self.metadata_dropout)
        mt, mm = self.metadata(num, nump, cat)
        tokens, mask = torch.cat([ct.expand(b, -1, -1), mt], 1), torch.cat([cm, mm], 1)
        return zero_masked(self.embed(tokens), mask), mask


@register_model("remixformer")
class RemixFormer(MultiModalNet):
    def __init__(self, num_classes: int, feature_spec: FeatureSpec, *, encoder=None, pretrained_path=None,
                 freeze_blocks: int = 0, clinical_size: int | None = None, dermoscopic_size: int | None = None,
                 num_regions: int = 3, region_fraction: float = 0.5, local_blocks: int | None = None,
                 selection_window: int = 1, cross_depth: int = 1, num_textures: int = 16,
                 texture_scales: Sequence[int] = (1, 2), region_depth: int = 2, fusion_dim: int = 256,
                 fusion_depth: int = 2, num_heads: int = 4, dropout: float = 0.1, modality_dropout: float = 0.0,
                 metadata_dropout: float = 0.0, use_concepts: bool = True, aux_heads: bool = True, **backbone_kwargs):
        mods = [m for m in feature_spec.modalities if m in IMAGE_TOKENS]
        if not mods:
            raise ValueError(f"remixformer reads clinical and/or dermoscopic images; feature_spec has "
                             f"{feature_spec.modalities}")
        super().__init__(feature_spec, mods, encoder=encoder, pretrained_path=pretrained_path,
                         freeze_blocks=freeze_blocks, **backbone_kwargs)
        d = fusion_dim
        self.modality_dropout = modality_dropout
        self.branches = nn.ModuleDict()
        self.proj = nn.ModuleDict()
        self.sizes: dict[str, int] = {}
        if "clinical" in mods:
            enc = self.encoder("clinical")
            self.branches["clinical"] = ClinicalBranch(
                enc, num_regions=num_regions, region_fraction=region_fraction, local_blocks=local_blocks,
                selection_window=selection_window, cross_depth=cross_depth, num_heads=num_heads, dropout=dropout)
            self.sizes["clinical"] = int(clinical_size or 2 * enc.data_config["input_size"][-1])
            self.proj["clinical"] = nn.Linear(enc.token_dim, d)
        if "dermoscopic" in mods:
            enc = self.encoder("dermoscopic")
            size = int(dermoscopic_size or 4 * enc.data_config["input_size"][-1])
            self.branches["dermoscopic"] = DermoscopyBranch(
                enc, image_size=size, dim=d, num_textures=num_textures, texture_scales=texture_scales,
                region_depth=region_depth, num_heads=num_heads, dropout=dropout)
            self.sizes["dermoscopic"] = size
            self.proj["dermoscopic"] = nn.Identity()
        # the explainer and the layer statistics read each dermoscopic image as a grid of windows
        self.encoder_windows = {"dermoscopic": self.branches["dermoscopic"].grid} if "dermoscopic" in mods else {}
        self.metadata_branch = MetadataBranch(feature_spec, d, use_concepts, metadata_dropout)
        n_image = 2 * len(mods)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_embed = nn.Parameter(torch.randn(n_image + 1, d) * 0.02)  # per image token kind; last: metadata
        self.fusion = nn.ModuleList(AttnBlock(d, num_heads, dropout) for _ in range(fusion_depth))
        self.norm = nn.LayerNorm(d)
        self.head = MLPHead(d, num_classes, dropout=dropout)
        self.aux_heads = nn.ModuleDict()
        if aux_heads:
            for m in mods:
                self.aux_heads[m] = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, num_classes))
            if self.metadata_branch.num_tokens:
                self.aux_heads["tabular"] = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, num_classes))

    @property
    def data_config(self) -> dict[str, dict]:
        """Each modality's preprocessing at the *branch's* input size (the full photo / dermoscopic image)."""
        return {m: dict(self.encoder(m).data_config, input_size=(3, self.sizes[m], self.sizes[m]))
                for m in self.modalities}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the window encoder's blocks in the backward pass (the memory of a 1024² image is its 16
        windows' activations). The clinical encoder is left alone: lesion selection reads its last attention."""
        if "dermoscopic" in self.modalities:
            vit = inner_model(self.encoder("dermoscopic"))
            if hasattr(vit, "set_grad_checkpointing"):
                vit.set_grad_checkpointing(enable)

    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        present = self.image_presence(batch)
        if self.training:
            present = drop_present(present, self.modality_dropout)
        b = present.shape[0]
        tokens, masks, feats, extra = [], [], {}, {}
        for j, m in enumerate(self.modalities):
            enc, branch, keep = self.encoder(m), self.branches[m], present[:, j]

            def run(x, enc=enc, branch=branch, m=m):
                if m == "dermoscopic":
                    return branch(enc, x, need_weights=return_attention)
                return branch(enc, x)

            images = batch["images"][m]
            out = run_present_rows(run, images, keep, branch) if self.training and not bool(keep.all()) \
                else run(images)
            out = {k: zero_masked(v, keep) for k, v in out.items()}
            feats[m], extra[m] = self.proj[m](out["global"]), out
            tokens += [feats[m], self.proj[m](out["local"])]
            masks += [keep, keep]
        image_tokens = torch.stack(tokens, 1) + self.modality_embed[:-1]
        meta, meta_mask = self.metadata_branch(batch, b, present.device)
        seq = torch.cat([self.cls_token.expand(b, -1, -1), image_tokens, meta + self.modality_embed[-1]], 1)
        mask = torch.cat([present.new_ones(b, 1), torch.stack(masks, 1), meta_mask], 1)
        seq = zero_masked(seq, mask)
        for blk in self.fusion:
            seq, _ = blk(seq, mask=mask)
        features = self.norm(seq[:, 0])
        out = {"logits": self.head(features), "features": features, "aux": {}, "aux_mask": {}}
        for j, m in enumerate(self.modalities):
            if m in self.aux_heads:
                out["aux"][m], out["aux_mask"][m] = self.aux_heads[m](feats[m]), present[:, j]
        if "tabular" in self.aux_heads:
            out["aux"]["tabular"] = self.aux_heads["tabular"](masked_mean(meta, meta_mask))
            out["aux_mask"]["tabular"] = meta_mask.any(1)
        if return_attention:
            out["attention"] = {"windows": {m: e["window_weights"] for m, e in extra.items() if "window_weights" in e},
                                "regions": {m: e["centres"] for m, e in extra.items() if "centres" in e}}
        return out
