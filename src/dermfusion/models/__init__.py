"""Networks: ``create_model(name, num_classes=..., feature_spec=..., **config)`` and image backbones.

Importing this package registers every built-in model (``list_models()`` names them).
"""
from . import baselines, fusion  # noqa: F401  (registers the models)
from . import vit_triage  # noqa: F401  (registers vit_triage)
from . import remixformer  # noqa: F401  (registers remixformer)
from . import seg_guided  # noqa: F401  (registers seg_guided_dual)
from .backbones import Backbone, create_backbone, tiny_backbone_spec
from .checkpoint import CheckpointMismatchError, HubUnavailableError, load_state_dict_strict, read_state_dict
from .panderm import panderm_checkpoint_filter_fn
from .registry import create_model, list_models, register_model

__all__ = [
    "Backbone", "create_backbone", "tiny_backbone_spec", "CheckpointMismatchError", "HubUnavailableError",
    "load_state_dict_strict", "read_state_dict", "create_model", "list_models", "register_model",
    "panderm_checkpoint_filter_fn",
]
