"""The triage service: FastAPI app, triage policy, audit trail, metrics, drift monitoring, web page.

FastAPI, uvicorn, SQLAlchemy and prometheus-client are optional (the ``serve`` extra): ``create_app`` and
``Analyzer`` are imported on first use, so importing ``dermfusion.service.config`` or ``.triage`` needs none of
them.
"""

__all__ = ["create_app", "ServiceConfig", "load_service_config", "Analyzer"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app  # the optional web stack (FastAPI), imported on first use
        return create_app
    if name in ("ServiceConfig", "load_service_config"):
        from . import config  # pydantic models only; lazy like the others for a uniform package surface
        return getattr(config, name)
    if name == "Analyzer":
        from .analyzer import Analyzer  # torch + the explainer, imported on first use
        return Analyzer
    raise AttributeError(name)
