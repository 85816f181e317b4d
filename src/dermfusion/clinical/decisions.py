"""From raw network output to what the product decides, as separate, named steps (docs/CLINICAL.md):

1. **posterior** under the training prior — the bundle's calibration (``calibration.json``: temperature, per-class
   bias, and the prior they assume);
2. **shown posterior** — re-weighted by Bayes' rule to the deployment prior when ``prior.deployment`` is set;
3. **decisions**, each on the training-prior posterior (a fixed function of the lesion, so per-class sensitivity and
   coverage do not move with the case mix):
   - ``balanced``: the balanced-accuracy rule's diagnosis (the challenge rule);
   - ``triage``: the action at the operating point — the bundle's (``decisions.json``, chosen on out-of-fold
     posteriors by ``dermfusion operating-point``) unless the settings override it;
   - ``differential``: the conformal prediction set (``decisions.json``, fitted on out-of-fold posteriors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluation.calibration import Calibration
from ..evaluation.conformal import prediction_sets
from ..evaluation.decision_rules import EVIDENCE_FILE, expected_rates, operating_point_keys
from ..evaluation.posterior import normalise_prior, prior_weights, reweight_prior
from ..tasks import TaskSpec
from .settings import ClinicalSettings, LEGACY_TRIAGE


@dataclass
class DecisionRules:
    """The calibration and decision rules of a served predictor, with the settings that may override them."""

    task: TaskSpec
    calibration: Calibration
    operating_point: dict          # the four triage cut-offs in force
    operating_point_source: str    # "bundle" | "service config (override)" | "built-in defaults (not chosen on evidence)"
    operating_point_evidence: dict  # the bundle's report for its operating point + where it was chosen ({} if none)
    conformal: dict | None         # the bundle's conformal calibration (None: no prediction set)
    level: float | None            # the prediction set's coverage
    training_prior: np.ndarray | None
    deployment_prior: np.ndarray | None
    level_override: bool = False    # the settings fixed ``level`` for every class (else each class's fitted level)

    @classmethod
    def of(cls, predictor, settings: ClinicalSettings | None = None) -> "DecisionRules":
        settings = settings or ClinicalSettings()
        task = predictor.task
        cal = predictor.calibration
        dec = predictor.decisions
        bundle_op = dec.get("triage")
        if settings.triage.is_override:
            op, source = settings.triage.cut_offs(operating_point_keys(bundle_op) if bundle_op else None), \
                "service config (override)"
        elif bundle_op:
            op, source = operating_point_keys(bundle_op), "bundle"
        else:
            op, source = settings.triage.cut_offs(), "built-in defaults (not chosen on evidence)"
        conf = dec.get("differential")
        level = settings.differential.level if settings.differential.level is not None else \
            (float(conf["level"]) if conf else None)
        train = np.asarray(cal.prior, dtype=np.float64) if cal.prior is not None else None
        deploy = None
        if settings.prior.deployment:
            unknown = sorted(set(settings.prior.deployment) - set(task.classes))
            if unknown:
                raise ValueError(f"prior.deployment names classes this model does not predict: {unknown} "
                                 f"(classes: {', '.join(task.classes)})")
            if train is None:
                raise ValueError("prior.deployment needs a bundle whose calibration states its training prior "
                                 "(re-calibrate it: `dermfusion calibrate RUN`)")
            deploy = normalise_prior([float(settings.prior.deployment.get(c, 0.0)) for c in task.classes])
        evidence = {**bundle_op.get("out_of_fold", {}), "evidence": bundle_op.get("evidence", "out_of_fold")} \
            if source == "bundle" else {}
        return cls(task, cal, op, source, evidence,
                   conf, level, train, deploy, settings.differential.level is not None)

    # ------------------------------------------------------------------ the steps
    def posterior(self, raw) -> np.ndarray:
        """Step 1: N×C posteriors under the training prior."""
        return self.calibration.posterior(np.atleast_2d(raw))

    def shown(self, posterior) -> np.ndarray:
        """Step 2: the posteriors a clinician sees — under the deployment prior when one is set."""
        p = np.atleast_2d(posterior)
        return reweight_prior(p, self.training_prior, self.deployment_prior) if self.deployment_prior is not None \
            else p

    def balanced(self, raw) -> np.ndarray:
        """The balanced rule's scores (challenge files)."""
        return self.calibration.balanced(np.atleast_2d(raw))

    def prediction_sets(self, posterior) -> np.ndarray | None:
        """Step 3c: N×C booleans, or None without a conformal calibration. Each class at the level it was fitted
        for (``class_levels``, e.g. a higher one for MEL) unless the settings fix one level for all."""
        if not self.conformal:
            return None
        return prediction_sets(self.task, np.atleast_2d(posterior), self.conformal,
                               self.level if self.level_override else None)

    # ------------------------------------------------------------------ what a response says about them
    def prior_info(self) -> dict:
        """Which prior the shown posteriors assume, stated."""
        if self.deployment_prior is not None:
            return {"name": "deployment", "source": "service config (prior.deployment)",
                    "values": dict(zip(self.task.classes, self.deployment_prior.round(4).tolist()))}
        if self.training_prior is not None:
            return {"name": "training", "source": "the class mix of the lesions the calibration was fitted on",
                    "values": dict(zip(self.task.classes, self.training_prior.round(4).tolist()))}
        return {"name": "unknown", "source": "an older bundle: its temperature-scaled output, under whatever prior "
                                             "its sampler trained with (not stated); re-calibrate with `dermfusion "
                                             "calibrate RUN`", "values": None}

    def override_consequences(self, bundle_path) -> dict | None:
        """For an operating point from the service config: what it does on the bundle's out-of-fold lesions
        (``oof_posteriors.npz``), beside what the bundle's own did — printed when the service starts."""
        if not self.operating_point_source.startswith("service config") or bundle_path is None:
            return None
        return expected_rates(self.task, Path(bundle_path) / EVIDENCE_FILE, self.operating_point)

    def expected_rates(self, bundle_paths) -> dict | None:
        """The operating point in force on the out-of-fold lesions of the first of ``bundle_paths`` that keeps them,
        re-weighted to the deployment prior when one is set: the referral and urgent rates a clinic should see if its
        lesions are like those (the service exports them beside the live rates; an alert compares the two)."""
        weigh = None
        if self.deployment_prior is not None:
            def weigh(y):  # from the kept lesions' own class mix (out of fold: the training prior; a local sample's
                # differs) to the clinic's
                y = np.asarray(y).astype(int)
                return prior_weights(y, np.bincount(y, minlength=len(self.task.classes)) / len(y),
                                     self.deployment_prior)
        for path in bundle_paths:
            rates = expected_rates(self.task, Path(path) / EVIDENCE_FILE, self.operating_point, weigh) if path else None
            if rates is not None:
                return rates
        return None

    def operating_point_info(self) -> dict:
        ev = self.operating_point_evidence or {}
        return {"source": self.operating_point_source, **self.operating_point,
                "applied_to": "posteriors under the training prior",
                "targets": ev.get("targets"), "out_of_fold": ev.get("cross_validated") or ev.get("in_sample"),
                # where the cut-offs were chosen: the model's out-of-fold lesions, or a clinic's labelled local sample
                "evidence": ev.get("evidence")}

    def differential_info(self) -> dict | None:
        if not self.conformal:
            return None
        return {"level": self.level, "class_levels": {} if self.level_override else
                dict(self.conformal.get("class_levels") or {}), "method": self.conformal.get("method"),
                "calibration_lesions": self.conformal.get("n")}

    def describe(self) -> dict:
        return {"prior": self.prior_info(), "operating_point": self.operating_point_info(),
                "differential": self.differential_info(), "legacy_triage": LEGACY_TRIAGE
                if self.operating_point_source.startswith("built-in") else None}
