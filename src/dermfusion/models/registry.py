"""One door to every network: ``create_model(name, num_classes=..., feature_spec=..., **config)``.

Models register themselves with ``@register_model("name")`` (timm-style), so configs name a model
by string and a bundle can rebuild it from its saved config alone.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..config import nearest_hint
from ..data.features import FeatureSpec
from .backbones import create_backbone
from .settings import ModelSettingsError, check_encoder_settings

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


def model_settings(name: str) -> set[str] | None:
    """The settings a config may give model ``name``: its constructor's keyword parameters, plus the
    encoder options (``create_backbone``'s) when the model passes ``**backbone_kwargs`` on. ``None`` when the
    constructor takes arbitrary keywords otherwise (nothing can be checked)."""
    import inspect


    fn = _MODELS[name]
    params = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters
    own = {p for p, v in params.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)}
    own -= {"self", "num_classes", "feature_spec"}
    if any(v.kind is v.VAR_KEYWORD for v in params.values()):
        backbone = inspect.signature(create_backbone).parameters
        own |= {p for p, v in backbone.items() if v.kind is v.KEYWORD_ONLY}
    return own


def check_model_settings(name: str, settings: dict) -> None:
    """Refuse unknown model names and settings before anything is built, naming the nearest valid one.
    Options of the encoder's own library (``drop_path_rate``, ``img_size`` …) belong under ``encoder:``."""
    if name not in _MODELS:
        raise ModelSettingsError(f"unknown model {name!r}" + nearest_hint(name, list_models()))
    valid = model_settings(name)
    unknown = sorted(k for k in settings if k not in valid)
    if unknown:
        raise ModelSettingsError("; ".join(f"model {name!r} has no setting model.{k}" + nearest_hint(k, valid)
                                           for k in unknown) + " (encoder library options go under model.encoder)")
    check_encoder_settings(settings.get("encoder"))


def create_model(name: str, *, num_classes: int, feature_spec: FeatureSpec | dict, **config) -> nn.Module:
    """Build a registered model; ``feature_spec`` may be a FeatureSpec or its ``to_dict()`` form."""
    check_model_settings(name, config)
    if isinstance(feature_spec, dict):
        feature_spec = FeatureSpec.from_dict(feature_spec)
    if not feature_spec.modalities:
        raise ValueError("feature_spec.modalities is empty: every network needs at least one image modality")
    model = _MODELS[name](num_classes=num_classes, feature_spec=feature_spec, **config)
    model.model_name = name
    return model
