"""One door to every network: ``create_model(name, num_classes=..., feature_spec=..., **config)``.

Models register themselves with ``@register_model("name")`` (timm-style), so configs name a model
by string and a bundle can rebuild it from its saved config alone.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..data.features import FeatureSpec

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None):
    """Decorator registering a model class or factory under ``name`` (default: its ``__name__``)."""

    def deco(fn):
        key = name or fn.__name__
        if key in _MODELS and _MODELS[key] is not fn:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, *, num_classes: int, feature_spec: FeatureSpec | dict, **config) -> nn.Module:
    """Build a registered model; ``feature_spec`` may be a FeatureSpec or its ``to_dict()`` form."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    if isinstance(feature_spec, dict):
        feature_spec = FeatureSpec.from_dict(feature_spec)
    if not feature_spec.modalities:
        raise ValueError("feature_spec.modalities is empty: every network needs at least one image modality")
    model = _MODELS[name](num_classes=num_classes, feature_spec=feature_spec, **config)
    model.model_name = name
    return model
