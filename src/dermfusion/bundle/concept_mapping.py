"""The concept mapping a bundle's model was trained with: ``concept_mapping.json`` in the bundle directory.

A model trained on MILK10k's MONET scores expects computed concept scores on that scale; the per-concept monotone
map (``concepts.mapping``, fitted with ``dermfusion concepts --fit-mapping``) is what puts them there, so it travels
with the model (``dermfusion bundle concept-mapping BUNDLE MAP.json``). It changes answers, so the content hash covers
it like any other file of the bundle (it is not in ``UNHASHED_FILES``); writing it re-seals the bundle after checking
that nothing else changed. The service and ``dermfusion predict --concept-model`` apply it when they compute scores.
A bundle without it (every bundle written before it existed) keeps working: computed scores are used raw, or mapped
by the service config's ``concepts.mapping`` / ``dermfusion concepts --mapping`` when one is named.
This module handles the file; reading it as a mapping is ``concepts.ConceptMapping.from_json``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from .store import BundleError, member_paths, update_file

CONCEPT_MAPPING_FILE = "concept_mapping.json"


def write_concept_mapping(bundle: str | Path, text: str) -> str:
    """Store the mapping's JSON in the bundle and re-seal it (after verifying the rest); the new content hash."""
    return update_file(bundle, CONCEPT_MAPPING_FILE, lambda f: f.write_text(text, encoding="utf-8"))


def find_concept_mapping(bundles: Iterable[str | Path]) -> Path | None:
    """The ``concept_mapping.json`` carried by these bundles or their member bundles (recursively); None when none
    carries one; a ``BundleError`` when they carry different ones (which scale would the ensemble's scores be on?)."""
    found: dict[str, Path] = {}
    seen: set[Path] = set()

    def walk(p: Path) -> None:
        p = p.resolve()
        if p in seen:
            return
        seen.add(p)
        f = p / CONCEPT_MAPPING_FILE
        if f.is_file():
            found.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), f)
        for m in member_paths(p):
            walk(m)

    for b in bundles:
        if b is not None:
            walk(Path(b))
    if len(found) > 1:
        raise BundleError("these bundles carry different concept mappings (" + ", ".join(map(str, found.values())) +
                          "): computed concept scores cannot be put on one scale for all of them")
    return next(iter(found.values()), None)
