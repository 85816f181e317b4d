"""The network bundle kind: ``NetworkPredictor`` rebuilds the model from the bundle's config.yaml, loads its
weights strictly, and predicts in batches (test-time augmentation, an inference backend chosen per machine)."""
from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..bundle import Bundle, BundleError
from ..console import track
from ..data.dataset import LesionDataset, collate
from ..data.loading import BatchLoader
from ..models.checkpoint import CheckpointMismatchError
from ..models.factory import load_network
from ..runtime.device import cpu_name, move_batch, resolve_device
from .backend_policy import approved, read_record
from .backends import list_backends, prepare_backend, select_backend
from .predict_loop import predict_probs
from .predictor import Predictor
SELECTION_ROWS = 32
NETWORK_OPTIONS = ("device", "batch_size", "num_workers", "backend")


class NetworkPredictor(Predictor):
    """A trained network bundle: rebuilds the model from config.yaml, loads model.safetensors strictly."""

    def __init__(self, bundle: Bundle, device: str = "cpu", batch_size: int = 32, num_workers: int = 0,
                 backend: str = "trained"):
        self.bundle = bundle
        try:
            self.model, _, self.spec, self.preprocess = load_network(bundle.config, bundle.file("model.safetensors"))
        except CheckpointMismatchError as e:
            raise BundleError(f"{bundle.path}: weights do not match the model (missing {e.missing[:5]}, "
                              f"unexpected {e.unexpected[:5]})") from None
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.batch_size, self.num_workers = batch_size, num_workers
        # runner: what predict calls — the eager model, or a backend built on first use (it needs real lesions)
        self.runner, self.amp, self.selection, self.backend = None, None, None, backend
        if backend == "trained":  # as the out-of-fold predictions were made (training.out_of_fold): float32
            backend = self.backend = "fp32"
        if backend == "fp32":
            self.runner = self.model
        elif backend != "auto" and backend not in list_backends():
            raise BundleError(f"unknown backend {backend!r}: use auto, trained or one of {', '.join(list_backends())}")

    def mixture(self):
        return [(1.0, self)]

    # ------------------------------------------------------------------ backends
    def sample_batch(self, sample: pd.DataFrame) -> dict:
        """The first rows of a manifest as one model batch on this predictor's device."""
        return move_batch(next(iter(self.loader(sample.head(SELECTION_ROWS)))), self.device)

    def choose_backend(self, sample: pd.DataFrame, candidates=None, options: dict | None = None) -> str:
        """Pick the fastest backend the policy allows (``inference.backend_policy``: exact ones, plus approximate
        ones the bundle's agreement record approves) whose probabilities on ``sample`` (real lesions) match fp32
        eager (max |Δp| ≤ 0.02, argmax agreement ≥ 99 %); fp32 eager is the fallback. Returns its name. ``options``
        go to every candidate's factory (e.g. ``layer_stats``: the service's familiarity check)."""
        cands = candidates if candidates is not None else default_candidates(self.device, self.model, self.bundle)
        sel = select_backend(self.model, self.sample_batch(sample), cands, device=self.device,
                             backend_options={c: dict(options or {}) for c in cands})
        self.amp, self.backend, self.selection = None, sel.name, sel.candidates
        self.runner = self.model if sel.name == "fp32" else sel.runner
        write_backend_check(self.bundle, sel.name, sel.candidates, len(sample.head(SELECTION_ROWS)))
        return sel.name

    def use_backend(self, name: str, sample: pd.DataFrame | None = None, options: dict | None = None) -> None:
        """Run with backend ``name`` (no accuracy check: a caller's explicit choice, or another rank's)."""
        if name == self.backend and self.runner is not None:
            return
        if name == "fp32":
            self.runner, self.amp, self.backend = self.model, None, "fp32"
            return
        batch = self.sample_batch(sample) if sample is not None and len(sample) else None
        self.runner, self.amp, self.backend = prepare_backend(self.model, name, device=self.device,
                                                              sample_batch=batch, **(options or {})), None, name

    def loader(self, df: pd.DataFrame) -> DataLoader:
        ds = LesionDataset(df, self.task, self.spec, self.preprocess, train=False, with_targets=False)
        return BatchLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        if self.runner is None:
            if self.backend == "auto":
                self.choose_backend(df)
            else:
                self.use_backend(self.backend, df)
        eager = self.runner is self.model
        if eager and self.device.type in {"cpu", "cuda"}:  # NHWC: oneDNN's fast convolutions (3x for Lite0 bf16)
            self.model.to(memory_format=torch.channels_last)
        return predict_probs(self.runner, self.loader(df), self.device, self.amp, channels_last=eager, tta=tta,
                             modalities=self.spec.modalities, progress=track if progress else None)



def default_candidates(device, model=None, bundle=None) -> list[str]:
    """The backends ``auto`` may pick: the one policy of ``inference.backend_policy`` — exact ones (ONNX Runtime
    float32), plus the approximate ones the bundle's agreement record approves for this CPU; bf16 on CUDA."""
    device = torch.device(device)
    if device.type != "cpu":
        return ["bf16"]
    exact = ["onnx"] if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx") else []
    return exact + ([b for b in approved(read_record(bundle.path)) if b not in exact] if bundle is not None else [])


def load_network_bundle(bundle: Bundle, **options) -> NetworkPredictor:
    """The "network" kind's loader (``inference.load``): uses the network options, ignores others."""
    return NetworkPredictor(bundle, **{k: v for k, v in options.items() if k in NETWORK_OPTIONS})


def write_backend_check(bundle: Bundle, chosen: str, candidates: list[dict], lesions: int) -> None:
    """The backend check's figures, written into the bundle as ``backend_check.json`` (documentation: not covered
    by the hash) — per CPU, so one bundle served on two machines keeps both. Skipped on a read-only bundle."""
    path = bundle.path / "backend_check.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault(cpu_name(), {}).update({  # the agreement record (backend_policy) under the same key stays
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "chosen": chosen,
            "lesions_checked": lesions, "candidates": [{k: v for k, v in c.items() if k != "error"} for c in candidates]})
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float))
        tmp.replace(path)
    except OSError:  # a read-only model store: the figures are still logged and in /readyz
        pass
