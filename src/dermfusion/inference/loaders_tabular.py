"""Bundle loaders for the tabular kinds: "tabular", "stack" and "ensemble".

Importing this module registers the three kinds with `inference.bundle.register_kind`
(`inference/loaders.py` imports it). Member bundles of stacks and ensembles are referenced by paths
relative to the stack / ensemble bundle, so a folder of bundles can be moved as a whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .bundle import Bundle, BundleError, Predictor, load_predictor, register_kind


class TabularPredictor(Predictor):
    """One gradient-boosted (or logistic) expert: manifest rows -> feature table -> probabilities."""

    def __init__(self, bundle: Bundle, n_jobs: int = 2):
        from ..tabular.expert import TabularExpert
        from ..tabular.features import TabularFeatureSpec

        self.bundle = bundle
        if "features" not in bundle.config:
            raise BundleError(f"{bundle.path}: tabular bundle config has no 'features' spec; re-train the bundle")
        self.spec = TabularFeatureSpec.from_dict(bundle.config["features"])
        self.expert = TabularExpert.load(bundle.path, n_jobs=n_jobs)
        if self.expert.num_classes != bundle.task.num_classes:
            raise BundleError(f"{bundle.path}: model has {self.expert.num_classes} classes, task "
                              f"{bundle.task.name!r} has {bundle.task.num_classes}")

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


def _load_members(bundle: Bundle, kwargs: dict) -> tuple[list[dict], list[Predictor]]:
    """(members.json entries, their loaded predictors), each checked to predict the bundle's classes."""
    members = _members(bundle)
    preds = [load_predictor(m["resolved"], **kwargs) for m in members]
    for m, p in zip(members, preds):
        _check_member_task(bundle, p, m["path"])
    return members, preds


class EnsemblePredictor(Predictor):
    """Weighted mean of the members' raw probabilities (weights on the simplex)."""

    def __init__(self, bundle: Bundle, **kwargs):
        self.bundle = bundle
        members, self.members = _load_members(bundle, kwargs)
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


class StackPredictor(Predictor):
    """Meta-model (meta.json) over the members' raw probabilities (+ optional concepts / metadata)."""

    def __init__(self, bundle: Bundle, **kwargs):
        from ..tabular.stacking import MetaModel

        self.bundle = bundle
        _, self.members = _load_members(bundle, kwargs)
        self.meta = MetaModel.load(bundle.path)

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        probs = [p.predict_raw(df, tta=tta, progress=progress) for p in self.members]
        return self.meta.predict_proba(probs, df)


@register_kind("tabular")
def load_tabular(bundle: Bundle, **kwargs) -> Predictor:
    return TabularPredictor(bundle, n_jobs=kwargs.get("n_jobs", 2))


@register_kind("ensemble")
def load_ensemble(bundle: Bundle, **kwargs) -> Predictor:
    return EnsemblePredictor(bundle, **kwargs)


@register_kind("stack")
def load_stack(bundle: Bundle, **kwargs) -> Predictor:
    return StackPredictor(bundle, **kwargs)
