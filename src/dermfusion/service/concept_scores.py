"""Concept scores the request did not send, computed from its images (service config ``concepts``).

The scorer (``dermfusion.concepts``) loads on first use — a CLIP ViT-L/14 is large and most models need no concepts
— and is shared by the worker threads (scoring is read-only; the content-hash cache writes whole files atomically).
"""
from __future__ import annotations

import threading

from ..concepts import ConceptScorer, load_scorer
from .config import ConceptScorerConfig


class ConceptFiller:
    """``fill(images bytes per modality, fields, model concept columns) -> (supplied, computed)``; fills ``fields``."""

    def __init__(self, config: ConceptScorerConfig):
        self.config = config
        self._scorer: ConceptScorer | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.config.model)

    def scorer(self) -> ConceptScorer:
        with self._lock:
            if self._scorer is None:
                c = self.config
                self._scorer = load_scorer(c.model, weights=c.weights, concept_set=c.concept_set,
                                           cache_dir=c.cache_dir, mapping=c.mapping)
            return self._scorer

    def fill(self, images: dict[str, bytes], fields: dict, model_concepts: list[str]) -> tuple[list[str], list[str]]:
        supplied = [c for c in model_concepts if c in fields]
        computed: list[str] = []
        if not self.enabled:
            return supplied, computed
        for m, data in images.items():
            want = [c for c in model_concepts if c.startswith(f"concept_{m}_") and c not in fields]
            if not want:
                continue
            scores = self.scorer().score_bytes([data], [f"<{m} upload>"])[0]
            for col in want:
                name = col[len(f"concept_{m}_"):]
                if name in scores:
                    fields[col] = scores[name]
                    computed.append(col)
        return supplied, computed
