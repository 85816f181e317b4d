"""The triage service: FastAPI app, triage policy, audit trail, metrics, drift monitoring, web page.

Light to import: the drift helpers (``compute_reference_stats``, ``write_reference_stats``) need no
web stack, so training can call them; ``create_app`` imports FastAPI on first use.
"""
from .drift import compute_reference_stats, read_reference_stats, write_reference_stats

__all__ = ["create_app", "ServiceConfig", "load_service_config", "compute_reference_stats",
           "write_reference_stats", "read_reference_stats", "Analyzer"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("ServiceConfig", "load_service_config"):
        from . import config
        return getattr(config, name)
    if name == "Analyzer":
        from .analyzer import Analyzer
        return Analyzer
    raise AttributeError(name)
