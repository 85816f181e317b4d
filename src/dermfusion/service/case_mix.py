"""The case mix of recent traffic, estimated before any label comes back.

Every answered analysis adds its posteriors under the training prior to a rolling window; EM on them
(``evaluation.posterior.estimate_prior_em``, Saerens et al. 2002) estimates the class prior of the traffic, and its
total-variation distance from the training prior is exported (``dermfusion_case_mix_shift``) with an alert rule
(docs/alerts: DermfusionCaseMixShift). A clinic whose patients differ from the training data — or a referral pathway
that changed — shows here within a few hundred analyses; set ``prior.deployment`` once the new mix is known.
"""
from __future__ import annotations

import threading
from collections import deque

import numpy as np

from ..evaluation.posterior import estimate_prior_em, prior_shift_distance


class CaseMixMonitor:
    """A rolling window of training-prior posteriors and the EM estimate of their class prior (thread-safe)."""

    def __init__(self, classes, training_prior, window: int = 500, min_samples: int = 50):
        self.classes = list(classes)
        self.training_prior = None if training_prior is None else np.asarray(training_prior, dtype=np.float64)
        self.min_samples = min_samples
        self.window: deque = deque(maxlen=window)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.training_prior is not None

    def observe(self, posterior) -> None:
        if self.enabled and posterior is not None:
            with self._lock:
                self.window.append(np.asarray(posterior, dtype=np.float64))

    def estimate(self) -> dict | None:
        """{"prior": {class: share}, "shift": TV distance from the training prior, "n", "converged"}, or None with
        too few analyses (or a bundle whose training prior is unknown)."""
        with self._lock:
            rows = list(self.window)
        if not self.enabled or len(rows) < self.min_samples:
            return None
        em = estimate_prior_em(np.stack(rows), self.training_prior)
        return {"prior": dict(zip(self.classes, em["prior"])), "n": em["n"], "converged": em["converged"],
                "shift": prior_shift_distance(em["prior"], self.training_prior)}
