"""Concept scores for images that have none: a CLIP-family model against prompt ensembles (MONET's recipe).

As MONET computes them (suinleelab/MONET@3ae0a64, tutorial/automatic_concept_annotation.ipynb,
``calculate_concept_presence_score``; the same function in SiyuanYan1/Derm1M@92d8fa9 concept_annotation/model.py for
DermLIP): every prompt and the image are embedded and L2-normalised; per group g (a template with its reference
prompt, prompts.py) the image's cosine similarity to the concept is the mean over the concept's terms, t_g, and to the
reference the mean over the group's references, r_g; then

    p = mean_g softmax([t_g / T, r_g / T])[0] = mean_g sigmoid((t_g − r_g) / T),   T = 1 / exp(4.5944)   ∈ [0, 1]

— a fixed temperature (≈ 1/98.9), the same for every model, not the model's own logit scale. Raw scores are cached
by the image's sha256; an optional :class:`~dermfusion.concepts.mapping.ConceptMapping` then puts them on MILK10k's scale.
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import ImageError, decode_image
from ..models.clip_family import ClipModel, create_clip
from .cache import ConceptCache, content_hash
from .mapping import ConceptMapping
from .prompts import ConceptSet, load_concept_set

MONET_TEMPERATURE = 1 / math.exp(4.5944)  # MONET's calculate_concept_presence_score default


class ConceptScorer:
    """``score_bytes([jpeg bytes…]) -> [{concept: probability}]`` for one CLIP-family model and concept set."""

    def __init__(self, clip: ClipModel, concept_set: ConceptSet | None = None, *, cache: ConceptCache | None = None,
                 mapping: ConceptMapping | None = None, batch_size: int = 16, device: str = "cpu"):
        self.clip, self.concept_set = clip, concept_set or load_concept_set()
        self.mapping, self.batch_size, self.device = mapping, int(batch_size), torch.device(device)
        self.clip.model.to(self.device).eval()
        self.cache = cache
        self.model_calls = 0  # images actually sent through the network (cache hits are not)
        self._directions: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fingerprint: str | None = None

    @property
    def names(self) -> list[str]:
        return self.concept_set.names

    @property
    def identity(self) -> dict:
        """What the scores depend on: the model's name, a fingerprint of its weights, the concept set's fingerprint
        (recorded in audits and in a fitted mapping)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            tensors = sorted(self.clip.model.state_dict().items())
            for name, p in tensors[:: max(1, len(tensors) // 16)]:  # a sample of tensors: cheap even for ViT-L
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes()[:1 << 16])
            self._fingerprint = h.hexdigest()[:12]
        return {"model": self.clip.name, "weights_sha256": self._fingerprint,
                "concept_set": self.concept_set.fingerprint()}

    @property
    def key(self) -> str:
        """The scorer's identity for the cache: model, a fingerprint of its weights, the concept set."""
        i = self.identity
        return f"{i['model']}-{i['weights_sha256']}-{i['concept_set']}"

    # ------------------------------------------------------------------------------------------ text side
    @torch.no_grad()
    def _mean_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        """The mean of the prompts' normalised embeddings (not normalised again: its dot product with a normalised
        image embedding is the mean cosine similarity, as MONET averages them)."""
        emb = self.clip.model.encode_text(self.clip.tokenizer(list(prompts)).to(self.device)).float()
        return F.normalize(emb, dim=-1).mean(dim=0)

    def directions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K×G×D concept directions, G×D reference directions), one per concept and group (prompts.py)."""
        if self._directions is None:
            groups = self.concept_set.groups()
            concepts = torch.stack([torch.stack([self._mean_embedding(self.concept_set.prompts(c, templates))
                                                 for templates, _ in groups]) for c in self.names])
            self._directions = concepts, torch.stack([self._mean_embedding(refs) for _, refs in groups])
        return self._directions

    # ----------------------------------------------------------------------------------------- image side
    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """The model's published preprocessing: short side to size/crop_pct (its interpolation), centre crop,
        mean/std normalisation."""
        from torchvision.transforms import v2

        dc = self.clip.data_config
        size = int(dc["input_size"][-1])
        interp = {"bilinear": v2.InterpolationMode.BILINEAR}.get(dc.get("interpolation"), v2.InterpolationMode.BICUBIC)
        resize = int(size / float(dc.get("crop_pct", 1.0) or 1.0))
        ops = v2.Compose([v2.ToImage(), v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(size),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(dc["mean"]), list(dc["std"]))])
        return ops(img.convert("RGB"))

    @torch.no_grad()
    def score_tensor(self, images: torch.Tensor) -> np.ndarray:
        """B×K raw probabilities for preprocessed images (B×3×H×W)."""
        concepts, reference = self.directions()
        feats = F.normalize(self.clip.model.encode_image(images.to(self.device)).float(), dim=-1)
        self.model_calls += images.shape[0]
        target = torch.einsum("bd,kgd->bkg", feats, concepts)         # mean cosine over each group's terms
        ref = (feats @ reference.T)[:, None, :]                         # B×1×G
        return torch.sigmoid((target - ref) / MONET_TEMPERATURE).mean(-1).cpu().numpy()

    # ------------------------------------------------------------------------------------------ entry points
    def score_bytes(self, blobs: Sequence[bytes], names: Sequence[str] | None = None,
                    mapped: bool = True) -> list[dict[str, float]]:
        """One ``{concept: score}`` per image (raw scores cached by content; the mapping, if any, applied after)."""
        names = list(names) if names is not None else [f"<image {i}>" for i in range(len(blobs))]
        shas = [content_hash(b) for b in blobs]
        raw: dict[str, dict[str, float]] = {}
        todo: list[int] = []
        for i, sha in enumerate(shas):
            if sha in raw:
                continue
            hit = self.cache.get(sha) if self.cache is not None else None
            if hit is not None and all(c in hit for c in self.names):
                raw[sha] = hit
            else:
                raw[sha] = {}
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            batch = torch.stack([self.preprocess(decode_image(blobs[i], names[i])) for i in chunk])
            for i, row in zip(chunk, self.score_tensor(batch)):
                raw[shas[i]] = {c: float(v) for c, v in zip(self.names, row)}
                if self.cache is not None:
                    self.cache.put(shas[i], raw[shas[i]])
        out = [dict(raw[sha]) for sha in shas]
        if mapped and self.mapping is not None:
            for d in out:
                for c in d:
                    d[c] = float(self.mapping.apply(c, [d[c]])[0])
        return out

    def score_files(self, paths: Sequence[str | Path], mapped: bool = True) -> list[dict[str, float]]:
        blobs = []
        for p in paths:
            p = Path(p)
            if not p.is_file():
                raise ImageError(f"{p}: file not found")
            blobs.append(p.read_bytes())
        return self.score_bytes(blobs, [str(p) for p in paths], mapped=mapped)


def load_scorer(model: str, *, weights: str | Path | None = None, concept_set: str | Path | None = None,
                cache_dir: str | Path | None = None, use_cache: bool = True, mapping: str | Path | None = None,
                device: str = "cpu", batch_size: int = 16) -> ConceptScorer:
    """A scorer from names: ``model`` as :func:`~dermfusion.models.clip_family.create_clip` takes it (a missing
    weights file is a clear error, a hub id offline fails at once), the concept set, the cache and the mapping."""
    clip = create_clip(model, weights)
    scorer = ConceptScorer(clip, load_concept_set(concept_set), mapping=ConceptMapping.load(mapping) if mapping
                           else None, device=device, batch_size=batch_size)
    if use_cache:
        scorer.cache = ConceptCache(cache_dir, scorer.key)
    why = scorer.mapping.fitted_for_another(scorer.identity) if scorer.mapping is not None else None
    if why:
        logging.getLogger(__name__).warning("%s: %s", mapping, why)
    return scorer
