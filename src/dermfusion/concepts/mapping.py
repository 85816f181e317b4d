"""Computed concept scores put on MILK10k's scale: one monotone map per concept.

A model trained on MILK10k's MONET scores learnt *their* distribution; another scorer (an open_clip model, other
prompts, other preprocessing) ranks images similarly but on another scale. Where both scores exist for the same
images (MILK10k lesions whose images are at hand), an isotonic regression per concept (computed → MILK10k) maps
one onto the other without changing the order of images. With no pairs, quantile mapping onto a reference sample
of MILK10k scores does the same job. The map is stored as knots and applied by linear interpolation (clipped at
the ends), so applying it needs neither scikit-learn nor the training data. It records the scorer it was fitted on
(``scorer``: model, weights fingerprint, concept-set fingerprint), so applying it to another scorer's scores can be
flagged. A bundle carries the map its model was trained with as ``concept_mapping.json`` (bundle/concept_mapping.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DermfusionError

MIN_PAIRS = 10


class ConceptMappingError(DermfusionError, ValueError):
    """A mapping that cannot be fitted or read."""


@dataclass
class ConceptMapping:
    """Per concept: increasing knots ``x`` (computed score) → ``y`` (MILK10k scale)."""

    knots: dict[str, tuple[list[float], list[float]]]
    method: str = "isotonic"
    scorer: dict | None = None   # ConceptScorer.identity of the scorer whose raw scores it was fitted on

    def apply(self, concept: str, scores) -> np.ndarray:
        s = np.asarray(scores, dtype=float)
        if concept not in self.knots:
            return s
        x, y = self.knots[concept]
        return np.clip(np.interp(s, x, y), 0.0, 1.0)

    @classmethod
    def fit_isotonic(cls, computed: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> "ConceptMapping":
        """Pairs (computed, MILK10k) per concept, the same images in the same order; NaN pairs are skipped."""
        from sklearn.isotonic import IsotonicRegression

        knots = {}
        for c, xs in computed.items():
            x, y = np.asarray(xs, float), np.asarray(reference.get(c, []), float)
            if x.shape != y.shape:
                raise ConceptMappingError(f"concept {c!r}: {x.size} computed vs {y.size} reference scores")
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() < MIN_PAIRS:
                continue  # too few pairs: leave this concept unmapped rather than fit noise
            iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x[ok], y[ok])
            knots[c] = ([float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_])
        if not knots:
            raise ConceptMappingError(f"no concept has {MIN_PAIRS} images scored both ways; nothing to fit")
        return cls(knots, "isotonic")

    @classmethod
    def fit_quantiles(cls, computed: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                      n_quantiles: int = 101) -> "ConceptMapping":
        """Unpaired: the q-th quantile of the computed scores maps to the q-th quantile of MILK10k's."""
        qs = np.linspace(0, 1, n_quantiles)
        knots = {}
        for c, xs in computed.items():
            x, y = np.asarray(xs, float), np.asarray(reference.get(c, []), float)
            x, y = x[np.isfinite(x)], y[np.isfinite(y)]
            if x.size < MIN_PAIRS or y.size < MIN_PAIRS:
                continue
            kx, ky = np.quantile(x, qs), np.quantile(y, qs)
            kx, idx = np.unique(kx, return_index=True)  # ties in x: keep the first, np.interp needs increasing x
            knots[c] = ([float(v) for v in kx], [float(v) for v in np.maximum.accumulate(ky[idx])])
        if not knots:
            raise ConceptMappingError(f"no concept has {MIN_PAIRS} scores on both sides; nothing to fit")
        return cls(knots, "quantile")

    def fitted_for_another(self, identity: dict) -> str | None:
        """Why this map does not belong to the scorer ``identity`` (other weights or other prompts), or None — also
        None for a map that does not say what it was fitted on (written before it recorded that)."""
        if not self.scorer:
            return None
        differ = [k for k in ("weights_sha256", "concept_set") if self.scorer.get(k) and
                  self.scorer.get(k) != identity.get(k)]
        if not differ:
            return None
        return (f"the concept mapping was fitted on {self.scorer.get('model', 'another scorer')} scores; this scorer "
                f"({identity.get('model')}) differs in {' and '.join(d.replace('_sha256', '') for d in differ)}")

    def to_json(self) -> str:
        doc = {"method": self.method, "knots": {c: {"x": x, "y": y} for c, (x, y) in self.knots.items()}}
        if self.scorer:
            doc["scorer"] = self.scorer
        return json.dumps(doc, indent=1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_json(cls, text: str, source: str = "<concept mapping>") -> "ConceptMapping":
        try:
            doc = json.loads(text)
            knots = {c: (list(map(float, k["x"])), list(map(float, k["y"]))) for c, k in doc["knots"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConceptMappingError(f"cannot read concept mapping {source}: {e}") from e
        for c, (x, y) in knots.items():
            if len(x) != len(y) or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
                raise ConceptMappingError(f"{source}: mapping of {c!r} is not monotone")
        scorer = doc.get("scorer")
        return cls(knots, doc.get("method", "isotonic"), scorer if isinstance(scorer, dict) else None)

    @classmethod
    def load(cls, path: str | Path) -> "ConceptMapping":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConceptMappingError(f"cannot read concept mapping {path}: {e}") from e
        return cls.from_json(text, str(path))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
