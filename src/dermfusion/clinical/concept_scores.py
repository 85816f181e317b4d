"""Concept scores the request did not send, computed from its images (service config ``concepts``).

The scorer (``dermfusion.concepts``) loads on first use — a CLIP ViT-L/14 is large and most models need no concepts
— and is shared by the worker threads (scoring is read-only; the content-hash cache writes whole files atomically).

The raw scores are put on the served model's scale by the concept mapping its bundle carries
(``concept_mapping.json``, covered by the bundle's hash); a bundle without one (older bundles) uses the service
config's ``concepts.mapping`` if named, else the raw scores. A bundle mapping and a *different* config mapping is
a start-up error: which one the model was trained with would be a guess. What was supplied, what was computed (raw
and mapped values), by which scorer and with which mapping goes into the audit record (:meth:`ConceptFill.audit`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..concepts import ConceptMapping, ConceptMappingError, ConceptScorer, load_scorer
from ..concepts.mapping import file_sha256
from .settings import ConceptScorerConfig


@dataclass
class ConceptFill:
    """One request's concept scores: the columns it supplied, the ones computed (value given to the model, and
    the scorer's raw score), the scorer's identity and the mapping used."""
    supplied: list[str]
    computed: dict[str, float] = field(default_factory=dict)
    raw: dict[str, float] = field(default_factory=dict)
    scorer: dict | None = None
    mapping: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def audit(self) -> dict:
        return {"supplied": list(self.supplied), "computed": dict(self.computed), "computed_raw": dict(self.raw),
                "scorer": self.scorer, "mapping": self.mapping if self.computed else None}


class ConceptFiller:
    """``fill(images bytes per modality, fields, model concept columns) -> ConceptFill``; fills ``fields``."""

    def __init__(self, config: ConceptScorerConfig, bundle_mapping: Path | None = None):
        self.config = config
        self._scorer: ConceptScorer | None = None
        self._lock = threading.Lock()
        self._mismatch: str | None = None
        self.mapping, self.mapping_info = self._resolve_mapping(bundle_mapping) if self.enabled else (None, None)

    @property
    def enabled(self) -> bool:
        return bool(self.config.model)

    def _resolve_mapping(self, bundle_file: Path | None) -> tuple[ConceptMapping | None, dict | None]:
        own = self.config.mapping
        if bundle_file is not None:
            sha = file_sha256(bundle_file)
            if own and file_sha256(own) != sha:
                raise ConceptMappingError(
                    f"the served bundle carries its own concept mapping ({bundle_file}) and the service config names "
                    f"another (concepts.mapping: {own}); remove concepts.mapping — the bundle's is the one its model "
                    f"was trained with")
            return ConceptMapping.load(bundle_file), {"source": "bundle", "file": bundle_file.name, "sha256": sha}
        if own:
            return ConceptMapping.load(own), {"source": "service config", "file": str(own), "sha256": file_sha256(own)}
        return None, None

    def scorer(self) -> ConceptScorer:
        with self._lock:
            if self._scorer is None:
                c = self.config
                scorer = load_scorer(c.model, weights=c.weights, concept_set=c.concept_set, cache_dir=c.cache_dir)
                self._mismatch = self.mapping.fitted_for_another(scorer.identity) if self.mapping is not None else None
                self._scorer = scorer
            return self._scorer

    def fill(self, images: dict[str, bytes], fields: dict, model_concepts: list[str]) -> ConceptFill:
        out = ConceptFill(supplied=[c for c in model_concepts if c in fields])
        if not self.enabled:
            return out
        for m, data in images.items():
            want = [c for c in model_concepts if c.startswith(f"concept_{m}_") and c not in fields]
            if not want:
                continue
            scorer = self.scorer()
            raw = scorer.score_bytes([data], [f"<{m} upload>"], mapped=False)[0]
            for col in want:
                name = col[len(f"concept_{m}_"):]
                if name in raw:
                    value = raw[name] if self.mapping is None else float(self.mapping.apply(name, [raw[name]])[0])
                    fields[col] = out.computed[col] = value
                    out.raw[col] = raw[name]
        if out.computed:
            out.scorer, out.mapping = self.scorer().identity, self.mapping_info
            if self._mismatch:
                out.warnings.append(f"computed concept scores: {self._mismatch}")
        return out
