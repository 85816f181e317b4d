"""From bundle directories to predictors: the kind table, ``load_predictor(bundle)`` and ``load_run(target)``.

Every bundle kind is listed in ``KINDS`` here (no registration by import side effects). A loader takes the
bundle, the options and ``load_member`` (how composite kinds load their member bundles); options a kind does not
use are ignored, so one call can load a run that mixes kinds (network options: ``device``, ``batch_size``,
``num_workers``, ``backend``; tabular: ``n_jobs``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from ..bundle import Bundle, BundleError, read_bundle, resolve_run
from .network import load_network_bundle
from .predictor import AveragePredictor, Predictor
from .tabular_kinds import EnsemblePredictor, StackPredictor, TabularPredictor

Loader = Callable[..., Predictor]


def _tabular(bundle: Bundle, load_member: Loader, **options) -> Predictor:
    return TabularPredictor(bundle, n_jobs=options.get("n_jobs", 2))


def _network(bundle: Bundle, load_member: Loader, **options) -> Predictor:
    return load_network_bundle(bundle, **options)


def _average(bundle: Bundle, load_member: Loader, **options) -> Predictor:
    """A run's fold bundles (members.json, paths relative to the bundle), averaged; this bundle's calibration."""
    members = json.loads(bundle.file("members.json").read_text())
    preds = [load_member((bundle.path / m["path"]).resolve(), **options) for m in members]
    return AveragePredictor(preds, bundle=bundle)


KINDS: dict[str, Loader] = {
    "network": _network,
    "tabular": _tabular,
    "average": _average,
    "ensemble": lambda bundle, load_member, **options: EnsemblePredictor(bundle, load_member, **options),
    "stack": lambda bundle, load_member, **options: StackPredictor(bundle, load_member, **options),
}


def load_predictor(path: str | Path, **options) -> Predictor:
    """The predictor of one bundle directory, of any kind."""
    bundle = read_bundle(path)
    if bundle.kind not in KINDS:
        raise BundleError(f"{path}: unknown bundle kind {bundle.kind!r}; known: {', '.join(sorted(KINDS))}")
    return KINDS[bundle.kind](bundle, load_predictor, **options)


def load_run(target: str | os.PathLike | Iterable[str | os.PathLike], **options) -> Predictor:
    """The predictor for a bundle, a training run directory or a list of them (``bundle.resolve_run``); several
    bundles are averaged under the one ensemble rule (``inference.predictor``)."""
    preds = [load_predictor(b, **options) for b in resolve_run(target)]
    return preds[0] if len(preds) == 1 else AveragePredictor(preds)
