"""Built-in bundle kinds. Importing this module registers them with `bundle.load_predictor`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ..config import ExperimentConfig
from ..data.dataset import LesionDataset, collate
from ..data.features import FeatureSpec
from ..data.loading import BatchLoader
from ..data.transforms import Preprocess
from ..training.runtime import resolve_device
from .backends import list_backends
from .bundle import Bundle, Predictor, register_kind
from .predict_loop import predict_probs

try:  # optional kinds written by the tabular stage
    from . import loaders_tabular  # noqa: F401
except ImportError:  # pragma: no cover
    pass


class NetworkPredictor(Predictor):
    """A trained network bundle: rebuilds the model from config.yaml, loads model.safetensors strictly."""

    def __init__(self, bundle: Bundle, device: str = "cpu", batch_size: int = 32, num_workers: int = 0,
                 backend: str = "trained"):
        from ..training.engine import build_model

        self.bundle = bundle
        cfg = ExperimentConfig.model_validate(bundle.config["experiment"])
        self.spec = FeatureSpec.from_dict(bundle.config["feature_spec"])
        self.preprocess = {m: Preprocess(**p) for m, p in bundle.config["preprocess"].items()}
        self.device = resolve_device(device)
        self.model = build_model(cfg, bundle.task, self.spec, for_inference=True)
        state = load_file(str(bundle.file("model.safetensors")))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            from .bundle import BundleError
            raise BundleError(f"{bundle.path}: weights do not match the model (missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]})")
        self.model.to(self.device).eval()
        self.batch_size, self.num_workers = batch_size, num_workers
        # runner: what predict calls — the eager model, or a backend built on first use (it needs real lesions)
        self.runner, self.amp, self.selection, self.backend = None, None, None, backend
        if backend in {"trained", "fp32"}:
            self.runner = self.model
        if backend == "trained":  # the way the model was validated during training (bf16 autocast or fp32)
            from ..training.runtime import autocast_dtype

            bf16 = autocast_dtype(self.device, cfg.train.precision) is not None
            self.amp, self.backend = (torch.bfloat16, "autocast") if bf16 else (None, "fp32")
        elif backend != "auto" and backend not in list_backends():
            from .bundle import BundleError
            raise BundleError(f"unknown backend {backend!r}: use auto, trained or one of {', '.join(list_backends())}")

    # ------------------------------------------------------------------ backends
    def sample_batch(self, sample: pd.DataFrame) -> dict:
        """The first rows of a manifest as one model batch on this predictor's device."""
        from ..training.runtime import move_batch

        return move_batch(next(iter(self.loader(sample.head(SELECTION_ROWS)))), self.device)

    def choose_backend(self, sample: pd.DataFrame, candidates=None) -> str:
        """Pick the fastest backend whose probabilities on ``sample`` (real lesions) match fp32 eager
        (max |Δp| ≤ 0.02, argmax agreement ≥ 99 %); fp32 eager is the fallback. Returns its name."""
        from .backends import select_backend

        cands = candidates if candidates is not None else default_candidates(self.device)
        sel = select_backend(self.model, self.sample_batch(sample), cands, device=self.device)
        self.amp, self.backend, self.selection = None, sel.name, sel.candidates
        self.runner = self.model if sel.name == "fp32" else sel.runner
        return sel.name

    def use_backend(self, name: str, sample: pd.DataFrame | None = None) -> None:
        """Run with backend ``name`` (no accuracy check: a caller's explicit choice, or another rank's)."""
        from .backends import prepare_backend

        if name == self.backend and self.runner is not None:
            return
        if name == "fp32":
            self.runner, self.amp, self.backend = self.model, None, "fp32"
            return
        batch = self.sample_batch(sample) if sample is not None and len(sample) else None
        self.runner, self.amp, self.backend = prepare_backend(self.model, name, device=self.device,
                                                              sample_batch=batch), None, name

    def loader(self, df: pd.DataFrame) -> DataLoader:
        ds = LesionDataset(df, self.task, self.spec, self.preprocess, train=False, with_targets=False)
        return BatchLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        from ..console import track

        if self.runner is None:
            if self.backend == "auto":
                self.choose_backend(df)
            else:
                self.use_backend(self.backend, df)
        return predict_probs(self.runner, self.loader(df), self.device, self.amp, tta=tta,
                             modalities=self.spec.modalities, progress=track if progress else None)


SELECTION_ROWS = 32


def default_candidates(device) -> list[str]:
    """Backends worth trying: on CPU bf16 where it is native (AMX / AVX-512 BF16; emulated bf16 on an
    AVX2-only CPU is many times slower than fp32, not worth a check), int8 and, with onnxruntime
    installed, ONNX Runtime int8 (the fastest passing backend for ViT-S/16 and open_clip ViT-B/16 pairs in
    BENCHMARKS.md; preparing it exports the model once, ~30 s for a ViT-B pair); bf16 on CUDA."""
    import importlib.util

    from ..training.runtime import native_bf16

    device = torch.device(device)
    if device.type != "cpu":
        return ["bf16"]
    onnx = ["onnx-int8"] if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx") else []
    return (["bf16"] if native_bf16(device) else []) + ["int8"] + onnx


@register_kind("network")
def _load_network(bundle: Bundle, **kwargs) -> NetworkPredictor:
    return NetworkPredictor(bundle, **kwargs)


class AveragePredictor(Predictor):
    """Several bundles of the same task (the folds of one run): raw probabilities averaged, then the
    run's calibration (fitted on its out-of-fold predictions, the same for every fold) applied once."""

    def __init__(self, predictors: list[Predictor]):
        tasks = {p.task.name for p in predictors}
        if len(tasks) != 1:
            from .bundle import BundleError
            raise BundleError(f"cannot average bundles of different tasks: {sorted(tasks)}")
        self.members = predictors
        self.bundle = predictors[0].bundle

    def choose_backend(self, sample: pd.DataFrame, candidates=None) -> list[str]:
        return [p.choose_backend(sample, candidates) if hasattr(p, "choose_backend") else "" for p in self.members]

    def use_backend(self, names, sample: pd.DataFrame | None = None) -> None:
        for p, name in zip(self.members, names):
            if name and hasattr(p, "use_backend"):
                p.use_backend(name, sample)

    def predict_raw(self, df, *, tta=0, progress=False):
        return np.mean([p.predict_raw(df, tta=tta, progress=progress) for p in self.members], axis=0)


@register_kind("average")
def _load_average(bundle: Bundle, **kwargs) -> AveragePredictor:
    """The fold bundles of one cross-validated run, averaged (members.json, paths relative to the bundle)."""
    import json

    from .bundle import load_predictor

    members = json.loads(bundle.file("members.json").read_text())
    pred = AveragePredictor([load_predictor((bundle.path / m["path"]).resolve(), **kwargs) for m in members])
    pred.bundle = bundle
    return pred


def write_run_bundle(run_dir, fold_bundles) -> Bundle:
    """RUN/bundle: one bundle standing for a run's fold ensemble, so stacks and ensembles can name a run."""
    import json
    import os
    from pathlib import Path

    from .bundle import read_bundle, write_bundle

    run_dir = Path(run_dir)
    out = run_dir / "bundle"
    out.mkdir(parents=True, exist_ok=True)
    first = read_bundle(fold_bundles[0])
    members = [{"path": os.path.relpath(Path(b).resolve(), out.resolve())} for b in fold_bundles]
    return write_bundle(out, config={"kind": "average", "task": first.task.name,
                                     "name": first.config.get("experiment", {}).get("name", run_dir.name),
                                     "members": members},
                        write_model=lambda d: (d / "members.json").write_text(json.dumps(members, indent=2)),
                        calibration=first.calibration,
                        metrics=first.metrics)
