"""Building networks from configuration: the one place that turns an experiment config (training) or a bundle's
saved config (inference, export) into a model, its feature spec and its preprocessing.

``load_network`` rebuilds a bundle's network and loads its weights **strictly** — a mismatch is an error,
never a partially random model.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file
from torch import nn

from ..config import ExperimentConfig
from ..data.features import FeatureSpec
from ..data.manifest import present_modalities
from ..data.transforms import Preprocess
from ..tasks import TaskSpec, get_task
from .checkpoint import CheckpointMismatchError
from .registry import create_model


def feature_spec_for(cfg: ExperimentConfig, task: TaskSpec, df: pd.DataFrame) -> FeatureSpec:
    mods = cfg.data.modalities or [m for m in task.modalities if m in present_modalities(df)] or list(task.modalities)
    return FeatureSpec.from_manifest(df, mods, use_metadata=cfg.data.use_metadata, use_concepts=cfg.data.use_concepts,
                                     metadata_fields=cfg.data.metadata_fields)


def build_model(cfg: ExperimentConfig, task: TaskSpec, spec: FeatureSpec, for_inference: bool = False):
    kwargs = cfg.model_kwargs()
    if for_inference:  # weights come from the bundle: never re-read a foundation checkpoint or a hub
        kwargs = {k: (None if "pretrained_path" in k or k.endswith("_path") else (False if k == "pretrained" else v))
                  for k, v in kwargs.items()}
        kwargs = _strip_pretrained(kwargs)
    return create_model(cfg.model.name, num_classes=task.num_classes, feature_spec=spec, **kwargs)


def _strip_pretrained(obj):
    if isinstance(obj, dict):
        return {k: (False if k == "pretrained" else None if k.endswith("pretrained_path") else _strip_pretrained(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip_pretrained(v) for v in obj]
    return obj


def preprocess_of(model, spec: FeatureSpec, color_constancy: str = "none") -> dict[str, Preprocess]:
    dc = getattr(model, "data_config", {}) or {}
    return {m: Preprocess.from_data_config(dc.get(m, {}), color_constancy) for m in spec.modalities}


def load_network(config: dict, weights: str | Path) -> tuple[nn.Module, ExperimentConfig, FeatureSpec,
                                                             dict[str, Preprocess]]:
    """(model in eval mode, experiment config, feature spec, preprocessing) of a network bundle, from its
    ``config.yaml`` (as a dict) and its ``model.safetensors``. The weights load strictly: missing or unexpected
    keys raise ``CheckpointMismatchError``."""
    cfg = ExperimentConfig.model_validate(config["experiment"])
    spec = FeatureSpec.from_dict(config["feature_spec"])
    preprocess = {m: Preprocess(**p) for m, p in config["preprocess"].items()}
    model = build_model(cfg, get_task(config["task"]), spec, for_inference=True)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise CheckpointMismatchError(str(weights), list(missing), list(unexpected),
                                      hint="the bundle's weights were not written for its config.yaml")
    return model.eval(), cfg, spec, preprocess
