"""Predictors: manifest rows in, class probabilities out — and the one ensemble rule.

**Ensembles** (a run's fold bundles, several bundles named on the command line, an ``average`` or ``ensemble``
bundle, a stack): the members contribute their *raw* (uncalibrated) probabilities; the ensemble combines them —
the mean for fold ensembles and ad-hoc lists, the searched weights for ``ensemble`` bundles, the meta-model for
stacks — and applies **one** calibration, its own (posteriors; the balanced rule and the decisions are built on them). For a run's fold ensemble that is the run's calibration,
which was fitted on the raw out-of-fold probabilities, i.e. on exactly what each fold member outputs raw.
Bundles whose calibrations differ cannot be averaged ad hoc (``BundleError``): combine them with
``dermfusion ensemble``, which fits one calibration on the blend. The service follows the same rule
(``service.analyzer``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..bundle import Bundle, BundleError
from ..evaluation.calibration import Calibration
from ..tasks import TaskSpec


class Predictor:
    """Turns manifest rows into class probabilities (calibrated with the bundle's calibration.json)."""

    bundle: Bundle

    @property
    def task(self) -> TaskSpec:
        return self.bundle.task

    @property
    def calibration(self) -> Calibration:
        """The one calibration this predictor applies to its raw probabilities."""
        return Calibration.from_dict(self.bundle.calibration)

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        """N x C probabilities before calibration."""
        raise NotImplementedError

    def mixture(self) -> list[tuple[float, "Predictor"]] | None:
        """``[(weight, leaf predictor), …]`` when ``predict_raw`` is the weighted mean of those leaves' raw
        probabilities (a single model: itself with weight 1), else None (e.g. a stack's meta-model). The service
        uses it to run each network itself (explanations, its backend) and still combine them as this does."""
        return None

    @property
    def decisions(self) -> dict:
        """The bundle's decision rules (``decisions.json``: triage operating point, conformal calibration) or {}."""
        return dict(getattr(self.bundle, "decisions", None) or {})

    def predict_proba(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        """N×C calibrated **posteriors** under the bundle's training prior (rows sum to 1)."""
        return self.calibration.posterior(self.predict_raw(df, tta=tta, progress=progress))

    def predict_balanced(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        """N×C scores of the balanced-accuracy rule (posteriors divided by the training prior): what the challenges'
        official files carry; decision scores, not probabilities of anything a clinician meets."""
        return self.calibration.balanced(self.predict_raw(df, tta=tta, progress=progress))

    def predict_submission(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        """N×C scores for the multi-label submission: tuned per-class cuts rescaled to land at 0.5."""
        return self.calibration.apply(self.predict_raw(df, tta=tta, progress=progress), rescale_cuts=True)


class AveragePredictor(Predictor):
    """Several bundles of one task, averaged: the mean of the members' raw probabilities, then one calibration —
    ``bundle``'s (an ``average`` bundle) or, for an ad-hoc list, the calibration the members share."""

    def __init__(self, predictors: list[Predictor], bundle: Bundle | None = None):
        if not predictors:
            raise BundleError("nothing to average: no bundles")
        tasks = {p.task.name for p in predictors}
        if len(tasks) != 1:
            raise BundleError(f"cannot average bundles of different tasks: {sorted(tasks)}")
        if bundle is None:
            differ = [p.bundle.path for p in predictors[1:] if p.bundle.calibration != predictors[0].bundle.calibration]
            if differ:
                raise BundleError(
                    f"cannot average bundles with different calibrations ({predictors[0].bundle.path} vs "
                    f"{differ[0]}): an average applies one calibration to the mean of the raw probabilities. Pass "
                    "the bundles of one run, or combine runs with `dermfusion ensemble RUN… --manifest M`, which "
                    "fits one calibration on the blend")
        self.members = predictors
        self.bundle = bundle if bundle is not None else predictors[0].bundle

    def choose_backend(self, sample: pd.DataFrame, candidates=None) -> list[str]:
        return [p.choose_backend(sample, candidates) if hasattr(p, "choose_backend") else "" for p in self.members]

    def use_backend(self, names, sample: pd.DataFrame | None = None) -> None:
        for p, name in zip(self.members, names):
            if name and hasattr(p, "use_backend"):
                p.use_backend(name, sample)

    def predict_raw(self, df, *, tta=0, progress=False):
        return np.mean([p.predict_raw(df, tta=tta, progress=progress) for p in self.members], axis=0)

    def mixture(self):
        return weighted_mixture(self.members, [1.0 / len(self.members)] * len(self.members))


def weighted_mixture(members: list[Predictor], weights) -> list[tuple[float, Predictor]] | None:
    """The flattened mixture of ``Σ weight · member``; None when a member is not itself a mixture."""
    out = []
    for w, m in zip(weights, members):
        sub = m.mixture()
        if sub is None:
            return None
        out += [(float(w) * sw, leaf) for sw, leaf in sub]
    return out
