"""The backend registry and the runner every backend returns."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ...errors import DermfusionError

BackendFactory = Callable[..., "BackendRunner"]
BACKENDS: dict[str, BackendFactory] = {}
CPU_ONLY = {"int8", "onnx", "onnx-int8", "onnx-qdq"}


class UnknownBackendError(DermfusionError, KeyError):
    """A backend name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BackendError(DermfusionError, RuntimeError):
    """A backend cannot run this model here (missing library, unsupported device, export failure)."""


def register_backend(name: str):
    def deco(fn: BackendFactory) -> BackendFactory:
        BACKENDS[name] = fn
        return fn
    return deco


def list_backends() -> list[str]:
    return list(BACKENDS)


# ------------------------------------------------------------------------------------------ runners
@dataclass
class BackendRunner:
    """A prepared backend: ``runner(batch) -> {"logits": float32 B×C}``.

    ``module`` is the torch module actually run (None for ONNX Runtime), so benchmarks can time its
    encoders separately; ``info`` holds backend details (compile time, quantised layers …).
    """

    name: str
    fn: Callable[[dict], dict]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    module: nn.Module | None = None
    info: dict = field(default_factory=dict)

    def __call__(self, batch: dict) -> dict:
        return self.fn(batch)

    def eval(self) -> "BackendRunner":
        """No-op, so a runner can stand in for the model in ``predict_probs``."""
        return self

    def predict_proba(self, batch: dict) -> torch.Tensor:
        return torch.softmax(self(batch)["logits"].float(), dim=-1)


def as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def eager_runner(name: str, module: nn.Module, device: torch.device, ctx=contextlib.nullcontext, info=None):
    module.eval()

    def fn(batch: dict) -> dict:
        with torch.no_grad(), ctx():
            out = module(batch)
        return {**out, "logits": out["logits"].float()}

    return BackendRunner(name, fn, device, module, info or {})

