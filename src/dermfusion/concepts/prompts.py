"""Concept sets: what to score, as prompt ensembles.

A concept is a few phrasings ("hair", "hairy skin"), each put into every template ("This is skin image of {}");
all those prompts are averaged in embedding space into one concept direction, and contrasted with the reference
prompts ("This is skin image") that describe skin with no particular concept — MONET's recipe. The default set is
MILK10k's seven MONET concepts under MILK10k's own column names (``MONET_<name>`` in the CSVs,
``concept_<modality>_<name>`` in a manifest); the Derm7pt 7-point criteria are built in; a user's own set is a
YAML file::

    name: my_concepts
    templates: ["This is skin image of {}", "This is dermatology image of {}"]   # optional
    reference: ["This is skin image", "a photo of skin"]                        # optional
    concepts:
      scale: ["scale", "scaly skin", "desquamation"]
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import DermfusionError

TEMPLATES = ("This is skin image of {}", "This is dermatology image of {}", "This is image of {}",
             "a photo of a skin lesion with {}")
REFERENCE = ("This is skin image", "This is dermatology image", "a photo of skin", "a photo of a skin lesion")

# MILK10k's MONET columns (MILK10k_Training_Metadata.csv: MONET_ulceration_crust … MONET_skin_markings_pen_ink_
# purple_pen), lower-cased as the importer names them
MILK10K_CONCEPTS = {
    "ulceration_crust": ["ulceration", "crust", "an ulcer", "a crusted erosion"],
    "hair": ["hair", "hairs", "hairy skin"],
    "vasculature_vessels": ["blood vessels", "vasculature", "telangiectasia", "vascular structures"],
    "erythema": ["erythema", "redness", "red inflamed skin"],
    "pigmented": ["pigmentation", "a pigmented lesion", "brown pigment"],
    "gel_water_drop_fluid_dermoscopy_liquid": ["gel", "water drops", "fluid", "dermoscopy liquid", "air bubbles"],
    "skin_markings_pen_ink_purple_pen": ["skin markings", "pen ink", "purple pen marking", "surgical marker"],
}
SEVEN_POINT_CONCEPTS = {
    "atypical_pigment_network": ["an atypical pigment network", "an irregular pigment network"],
    "blue_whitish_veil": ["a blue-whitish veil", "blue white veil"],
    "atypical_vascular_pattern": ["an atypical vascular pattern", "irregular vessels"],
    "irregular_streaks": ["irregular streaks", "radial streaming", "pseudopods"],
    "irregular_pigmentation": ["irregular pigmentation", "irregular blotches"],
    "irregular_dots_globules": ["irregular dots and globules", "irregular globules"],
    "regression_structures": ["regression structures", "white scar-like areas", "peppering"],
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ConceptSetError(DermfusionError, ValueError):
    """A concept-set file that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class ConceptSet:
    """Named concepts, each a list of phrasings, plus the templates and reference prompts they are scored with."""

    name: str
    concepts: dict[str, list[str]]
    templates: tuple[str, ...] = TEMPLATES
    reference: tuple[str, ...] = REFERENCE
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.concepts:
            raise ConceptSetError(f"concept set {self.name!r} has no concepts")
        bad = [c for c in self.concepts if not _NAME.match(c)]
        if bad:
            raise ConceptSetError(f"concept names must be lower_snake_case (they become manifest columns "
                                  f"concept_<modality>_<name>): {bad}")
        empty = [c for c, p in self.concepts.items() if not p or not all(isinstance(x, str) and x for x in p)]
        if empty:
            raise ConceptSetError(f"concepts without phrasings (give a list of strings): {empty}")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConceptSetError("every template needs one '{}' where the phrasing goes")
        if not self.reference:
            raise ConceptSetError("give at least one reference prompt (skin without the concept)")

    @property
    def names(self) -> list[str]:
        return list(self.concepts)

    def prompts(self, concept: str) -> list[str]:
        """Every template filled with every phrasing of ``concept``: the ensemble averaged in embedding space."""
        return [t.format(p) for p in self.concepts[concept] for t in self.templates]

    def fingerprint(self) -> str:
        """Changes whenever any prompt changes — part of the cache key, so edited prompts are re-scored."""
        doc = {"concepts": self.concepts, "templates": list(self.templates), "reference": list(self.reference)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


BUILT_IN = {"milk10k": MILK10K_CONCEPTS, "seven_point": SEVEN_POINT_CONCEPTS}


def load_concept_set(spec: str | Path | None = None) -> ConceptSet:
    """``None`` / ``"milk10k"`` (the default), ``"seven_point"``, or a YAML file (see the module docstring)."""
    if spec is None or str(spec) in BUILT_IN:
        name = str(spec or "milk10k")
        return ConceptSet(name, {k: list(v) for k, v in BUILT_IN[name].items()})
    path = Path(spec)
    if not path.is_file():
        raise ConceptSetError(f"concept set {spec!r}: not a built-in set ({', '.join(BUILT_IN)}) and no such file")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(doc) - {"name", "concepts", "templates", "reference"}
    if unknown or not isinstance(doc.get("concepts"), dict):
        raise ConceptSetError(f"{path}: expected keys name, concepts (a mapping name -> list of phrasings), templates, "
                              f"reference" + (f"; unknown: {sorted(unknown)}" if unknown else ""))
    concepts = {str(k): [v] if isinstance(v, str) else list(v or []) for k, v in doc["concepts"].items()}
    return ConceptSet(str(doc.get("name") or path.stem), concepts,
                      tuple(doc.get("templates") or TEMPLATES), tuple(doc.get("reference") or REFERENCE))
