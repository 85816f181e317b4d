"""The tabular bundle kinds — "tabular", "stack" and "ensemble" — as predictors (the kind table is
``inference.load``).

Member bundles of stacks and ensembles are referenced by paths relative to the stack / ensemble bundle, so a
folder of bundles can be moved as a whole. Members are loaded through the ``load_member`` function the kind
table passes in, so any kind can be a member.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..bundle import Bundle, BundleError
from ..tabular.expert import TabularExpert
from ..tabular.features import TabularFeatureSpec
from ..tabular.stacking import MetaModel
from .predictor import Predictor, weighted_mixture

LoadMember = Callable[..., Predictor]


class TabularPredictor(Predictor):
    """One gradient-boosted (or logistic) expert: manifest rows -> feature table -> probabilities."""

    def __init__(self, bundle: Bundle, n_jobs: int = 2):
        self.bundle = bundle
        if "features" not in bundle.config:
            raise BundleError(f"{bundle.path}: tabular bundle config has no 'features' spec; re-train the bundle")
        self.spec = TabularFeatureSpec.from_dict(bundle.config["features"])
        self.expert = TabularExpert.load(bundle.path, n_jobs=n_jobs)
        if self.expert.num_classes != bundle.task.num_classes:
            raise BundleError(f"{bundle.path}: model has {self.expert.num_classes} classes, task "
                              f"{bundle.task.name!r} has {bundle.task.num_classes}")

    def mixture(self):
        return [(1.0, self)]

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        if len(df) == 0:
            return np.zeros((0, self.task.num_classes))
        return self.expert.predict_proba(self.spec.transform(df))


def _members(bundle: Bundle) -> list[dict]:
    f = bundle.file("members.json")
    if not f.exists():
        raise BundleError(f"{bundle.path}: {bundle.kind} bundle has no members.json")
    members = json.loads(f.read_text())
    for m in members:
        p = (bundle.path / m["path"]).resolve()
        if not (p / "config.yaml").exists():
            raise BundleError(f"{bundle.path}: member bundle {m['path']} (resolved to {p}) is missing; "
                              "keep member bundles at the same relative place as when the bundle was written")
        m["resolved"] = p
    return members


def _check_member_task(bundle: Bundle, pred: Predictor, path: Path) -> None:
    if pred.task.classes != bundle.task.classes:
        raise BundleError(f"{bundle.path}: member {path} predicts {pred.task.name!r} classes, "
                          f"not those of {bundle.task.name!r}")


def _load_members(bundle: Bundle, load_member: LoadMember, options: dict) -> tuple[list[dict], list[Predictor]]:
    """(members.json entries, their loaded predictors), each checked to predict the bundle's classes."""
    members = _members(bundle)
    preds = [load_member(m["resolved"], **options) for m in members]
    for m, p in zip(members, preds):
        _check_member_task(bundle, p, m["path"])
    return members, preds


class EnsemblePredictor(Predictor):
    """Weighted mean of the members' raw probabilities (weights on the simplex)."""

    def __init__(self, bundle: Bundle, load_member: LoadMember, **options):
        self.bundle = bundle
        members, self.members = _load_members(bundle, load_member, options)
        w = np.array([float(m["weight"]) for m in members])
        if (w < 0).any() or w.sum() <= 0:
            raise BundleError(f"{bundle.path}: ensemble weights must be non-negative with a positive sum")
        self.weights = w / w.sum()

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(df), self.task.num_classes))
        for w, p in zip(self.weights, self.members):
            if w > 0:
                out += w * p.predict_raw(df, tta=tta, progress=progress)
        return out

    def mixture(self):
        return weighted_mixture(self.members, self.weights)


class StackPredictor(Predictor):
    """Meta-model (meta.json) over the members' raw probabilities (+ optional concepts / metadata)."""

    def __init__(self, bundle: Bundle, load_member: LoadMember, **options):
        self.bundle = bundle
        _, self.members = _load_members(bundle, load_member, options)
        self.meta = MetaModel.load(bundle.path)

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        probs = [p.predict_raw(df, tta=tta, progress=progress) for p in self.members]
        return self.meta.predict_proba(probs, df)
