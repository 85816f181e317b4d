"""Concept sets: what to score, as prompt ensembles — MONET's recipe.

MONET's concept-presence score (suinleelab/MONET@3ae0a64dcc96a6fa23c191f85d85325181caf1dd,
tutorial/automatic_concept_annotation.ipynb: ``get_prompt_embedding``, ``calculate_concept_presence_score``): a
concept is a few *terms* ("ulceration", "crust"); each template ("This is skin image of {}") is filled with every term;
per template, the image's cosine similarity is averaged over the terms and contrasted with its similarity to that
template's reference prompt ("This is skin image") in a two-way softmax at temperature 1 / exp(4.5944); the score is the
mean over templates (scorer.py). The templates and references below are MONET's defaults, paired one to one.

The default set is MILK10k's seven MONET concepts under MILK10k's own column names (``MONET_<name>`` in the CSVs,
``concept_<modality>_<name>`` in a manifest). Their terms are the column names' own words — the ISIC challenge page
lists the same groups ("Ulceration, crust", "Hair", "Vasculature, vessels", "Erythema", "Pigmentation", "Gel, water
drop, dermoscopy liquid", "Skin markings, pen ink, purple pen"; challenge.isic-archive.com/landing/milk10k). The
exact prompts ISIC used to compute MILK10k's scores are not published; fit a mapping onto the supplied scores
(mapping.py) before mixing computed and supplied values. The Derm7pt 7-point criteria use the terms and dermoscopy
templates of MONET's own Derm7pt experiment (experiments/concept_annotation.ipynb, ``get_concept_embedding``:
"This is dermatoscopy of {}" / "This is dermoscopy of {}" against "This is dermatoscopy" / "This is dermoscopy",
pooled into one group). A user's own set is a YAML file::

    name: my_concepts
    templates: ["This is skin image of {}", "This is dermatology image of {}"]   # optional
    reference: ["This is skin image", "This is dermatology image"]              # optional; paired with templates
    pooled: false        # optional; true = all prompts against all references at once (one group)
    concepts:
      scale: ["scale", "scaly skin", "desquamation"]

Templates and references are paired one to one when there are as many of each (and ``pooled`` is false); otherwise
all of a concept's prompts form one group against all references.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import DermfusionError

TEMPLATES = ("This is skin image of {}", "This is dermatology image of {}", "This is image of {}")
REFERENCE = ("This is skin image", "This is dermatology image", "This is image")
DERMOSCOPY_TEMPLATES = ("This is dermatoscopy of {}", "This is dermoscopy of {}")
DERMOSCOPY_REFERENCE = ("This is dermatoscopy", "This is dermoscopy")

# MILK10k's MONET columns (MILK10k_Training_Metadata.csv: MONET_ulceration_crust … MONET_skin_markings_pen_ink_
# purple_pen), lower-cased as the importer names them; the terms are the words of each column name
MILK10K_CONCEPTS = {
    "ulceration_crust": ["ulceration", "crust"],
    "hair": ["hair"],
    "vasculature_vessels": ["vasculature", "vessels"],
    "erythema": ["erythema"],
    "pigmented": ["pigmented"],
    "gel_water_drop_fluid_dermoscopy_liquid": ["gel", "water drop", "fluid", "dermoscopy liquid"],
    "skin_markings_pen_ink_purple_pen": ["skin markings", "pen ink", "purple pen"],
}
# MONET's Derm7pt concept terms (experiments/concept_annotation.ipynb, derm7ptconcept_*)
SEVEN_POINT_CONCEPTS = {
    "atypical_pigment_network": ["atypical pigment network", "irregularly meshed pigment network"],
    "blue_whitish_veil": ["blue whitish veil", "blue white veil"],
    "atypical_vascular_pattern": ["atypical vascular structures"],
    "irregular_streaks": ["irregular streaks"],
    "irregular_pigmentation": ["irregular pigmentation"],
    "irregular_dots_globules": ["irregular dots and globules"],
    "regression_structures": ["regression structure"],
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
    pooled: bool = False
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

    def groups(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(templates, references) of each group a score is averaged over: one per template, paired with its
        reference (MONET's default), or a single group of all of them."""
        if not self.pooled and len(self.templates) == len(self.reference):
            return [((t,), (r,)) for t, r in zip(self.templates, self.reference)]
        return [(tuple(self.templates), tuple(self.reference))]

    def prompts(self, concept: str, templates: tuple[str, ...] | None = None) -> list[str]:
        """Every template (of a group, or all) filled with every term of ``concept``."""
        return [t.format(p) for t in (templates or self.templates) for p in self.concepts[concept]]

    def fingerprint(self) -> str:
        """Changes whenever any prompt changes — part of the cache key, so edited prompts are re-scored."""
        doc = {"concepts": self.concepts, "templates": list(self.templates), "reference": list(self.reference)}
        if self.pooled:
            doc["pooled"] = True
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# name → (concepts, templates, references, pooled)
BUILT_IN = {"milk10k": (MILK10K_CONCEPTS, TEMPLATES, REFERENCE, False),
            "seven_point": (SEVEN_POINT_CONCEPTS, DERMOSCOPY_TEMPLATES, DERMOSCOPY_REFERENCE, True)}


def load_concept_set(spec: str | Path | None = None) -> ConceptSet:
    """``None`` / ``"milk10k"`` (the default), ``"seven_point"``, or a YAML file (see the module docstring)."""
    if spec is None or str(spec) in BUILT_IN:
        name = str(spec or "milk10k")
        concepts, templates, reference, pooled = BUILT_IN[name]
        return ConceptSet(name, {k: list(v) for k, v in concepts.items()}, templates, reference, pooled)
    path = Path(spec)
    if not path.is_file():
        raise ConceptSetError(f"concept set {spec!r}: not a built-in set ({', '.join(BUILT_IN)}) and no such file")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(doc) - {"name", "concepts", "templates", "reference", "pooled"}
    if unknown or not isinstance(doc.get("concepts"), dict):
        raise ConceptSetError(f"{path}: expected keys name, concepts (a mapping name -> list of terms), templates, "
                              f"reference, pooled" + (f"; unknown: {sorted(unknown)}" if unknown else ""))
    concepts = {str(k): [v] if isinstance(v, str) else list(v or []) for k, v in doc["concepts"].items()}
    return ConceptSet(str(doc.get("name") or path.stem), concepts, tuple(doc.get("templates") or TEMPLATES),
                      tuple(doc.get("reference") or REFERENCE), bool(doc.get("pooled", False)))
