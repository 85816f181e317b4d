"""Model settings a config may name, and the error for one that does not exist: ``ModelSettingsError`` names the
setting and the nearest valid one (``config.nearest_hint``)."""
from __future__ import annotations

import inspect
import re

from ..config import ConfigError, nearest_hint

_UNEXPECTED = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


class ModelSettingsError(ConfigError):
    """A model config names a setting the registered model (or its encoder) does not have."""


def unexpected_encoder_setting(error: TypeError, library_classes, encoder: str) -> ModelSettingsError | None:
    """A ``ModelSettingsError`` for a library constructor's "unexpected keyword argument" (a misspelt
    ``model.encoder`` option), with the nearest parameter of that constructor; None for any other TypeError."""
    m = _UNEXPECTED.search(str(error))
    if not m:
        return None
    cls_name, key = m.groups()
    cls = getattr(library_classes, cls_name, None)
    valid = [] if cls is None else [p for p in inspect.signature(cls.__init__).parameters if p not in {"self", "kwargs"}]
    return ModelSettingsError(f"model.encoder.{key}: encoder {encoder!r} ({cls_name}) has no setting {key!r}"
                              + nearest_hint(key, valid))


# create_backbone's own options (a dict encoder spec may carry them); every other key goes to the library
BACKBONE_OPTIONS = {"name", "pretrained_path", "pretrained", "input_size", "allow_head_mismatch",
                    "ignore_pretraining_keys"}


def check_encoder_settings(encoder) -> None:
    """Refuse a misspelt option of a timm encoder spec (``model.encoder: {name: "timm:…", …}``, or one per
    modality) before anything is built: the options must be parameters of a model class of the timm module that
    defines the architecture, or of timm's factory. Specs that cannot be checked this way (other libraries, hub
    ids, modules taking ``**kwargs``) are left to the build, which raises the same error."""
    specs = [encoder] if isinstance(encoder, dict) and "name" in encoder else \
        list(encoder.values()) if isinstance(encoder, dict) else []
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            continue
        source, _, ident = spec["name"].partition(":")
        options = [k for k in spec if k not in BACKBONE_OPTIONS]
        if source != "timm" or ident.startswith("hf-hub:") or not options:
            continue
        valid = _timm_settings(ident)
        if valid is None:
            continue
        for key in options:
            if key not in valid:
                raise ModelSettingsError(f"model.encoder.{key}: encoder {spec['name']!r} has no setting {key!r}"
                                         + nearest_hint(key, valid))


def _timm_settings(ident: str) -> set[str] | None:
    """Parameter names the timm architecture ``ident`` can take, or None when they cannot be listed."""
    import timm  # timm is heavy: imported when a timm encoder spec is checked
    from timm.models import model_entrypoint
    from torch import nn

    try:
        module = inspect.getmodule(model_entrypoint(ident))
    except RuntimeError:  # not a timm architecture name: the build reports it
        return None
    valid = set(inspect.signature(timm.create_model).parameters)
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__:
            params = inspect.signature(obj.__init__).parameters
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return None
            valid.update(params)
    return valid - {"self", "kwargs", "args"}
