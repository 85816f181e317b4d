"""Concept scores computed from images (MONET's recipe) for patients who have none: prompt-ensemble scorer,
content-hash cache, monotone mapping onto MILK10k's scale, filling a manifest's empty concept columns."""
from .cache import ConceptCache, default_cache_dir
from .fill import FillReport, fill_concepts
from .mapping import ConceptMapping, ConceptMappingError
from .prompts import ConceptSet, ConceptSetError, load_concept_set
from .scorer import ConceptScorer, load_scorer

__all__ = ["ConceptCache", "ConceptMapping", "ConceptMappingError", "ConceptScorer", "ConceptSet", "ConceptSetError",
           "FillReport", "default_cache_dir", "fill_concepts", "load_concept_set", "load_scorer"]
