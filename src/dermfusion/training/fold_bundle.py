"""A fold's bundle: the trained network with its config, feature spec, preprocessing and (with
``calibration.prior_adjustment: training_prior``) the training-prior calibration."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from ..bundle import write_bundle
from ..criteria import label_prior
from ..data.dataset import class_balanced_weights, criteria_targets, hard_case_factors
from ..data.manifest import targets
from ..evaluation.calibration import Calibration, training_prior
from ..evaluation.posterior import normalise_prior
from .checkpoint import write_dir_atomic


def write_fold_bundle(trainer, model, metrics: dict) -> Path:
    """The fold's bundle (kind "network") for ``trainer`` (a ``FoldTrainer``) with ``model``'s weights."""
    cfg = trainer.cfg
    name = f"{cfg.name}_fold{trainer.fold}" if trainer.fold >= 0 else f"{cfg.name}_full"  # fold -1: all lesions
    config = {"kind": "network", "task": trainer.task.name, "name": name,
              "model": {"name": cfg.model.name, **cfg.model_kwargs()},
              "feature_spec": trainer.spec.to_dict(),
              "preprocess": {m: p.to_dict() for m, p in trainer.preprocess.items()},
              "experiment": cfg.model_dump(), "fold": trainer.fold}
    heads = getattr(model, "criteria_heads", None)
    if heads is not None:  # the criteria's label prior under the sampler: prediction divides it out
        config["criteria_prior"] = criteria_training_prior(trainer, heads.criteria)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    calibration = training_prior_calibration(trainer)
    # written beside and renamed into place: a crash never leaves a half-written bundle
    return write_dir_atomic(trainer.out / "bundle", lambda d: write_bundle(
        d, config=config, metrics=metrics, calibration=calibration,
        write_model=lambda m: save_file(state, str(m / "model.safetensors"))))


def training_prior_calibration(trainer) -> dict | None:
    """Every network bundle — a full-data refit too, which has no out-of-fold predictions to fit anything on — turns
    its raw output into posteriors under its training rows' class mix by Bayes' rule from the prior its sampler
    drew with (``train.sampler_power``): bias = log(mix / sampling prior), temperature 1. With
    ``calibration.prior_adjustment: training_prior`` its balanced rule divides by that mix (** prior_strength),
    which at strength 1 equals dividing the raw output by the sampling prior — the rule the challenge files use. A cross-validated
    run refits all of it on its out-of-fold predictions afterwards (``training.run_calibration``)."""
    counts = targets(trainer.train_df, trainer.task).sum(axis=0)
    mix = normalise_prior(counts + 1e-9)
    bias = (np.log(mix) - np.log(training_prior(counts, trainer.cfg.train.sampler_power))).tolist()
    cal = trainer.cfg.calibration
    strength = cal.prior_strength if cal.prior_adjustment == "training_prior" else 0.0
    return Calibration(1.0, None, None, bias, mix.tolist(), strength).to_dict()


def criteria_training_prior(trainer, criteria) -> dict[str, list[float]]:
    """The criteria's label frequencies among the fold's training lesions, each weighted as the class-balanced
    sampler drew it (``train.sampler_power``, ``train.hard_cases``)."""
    df = trainer.train_df
    codes = criteria_targets(df, trainer.task)
    if codes is None:
        codes = np.full((len(df), len(criteria)), -1)
    weights = class_balanced_weights(targets(df, trainer.task), trainer.cfg.train.sampler_power,
                                     hard_case_factors(df, trainer.cfg.train.hard_cases))
    return label_prior(codes, weights, criteria)
