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
from ..data.transforms import Preprocess
from ..training.runtime import resolve_device
from .bundle import Bundle, Predictor, register_kind
from .predict_loop import predict_probs

try:  # optional kinds written by the tabular stage
    from . import loaders_tabular  # noqa: F401
except ImportError:  # pragma: no cover
    pass


class NetworkPredictor(Predictor):
    """A trained network bundle: rebuilds the model from config.yaml, loads model.safetensors strictly."""

    def __init__(self, bundle: Bundle, device: str = "cpu", batch_size: int = 32, num_workers: int = 0,
                 backend: str = "auto"):
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
        if backend == "auto":  # predict the way the model was validated during training
            trained = cfg.train.precision
            backend = "bf16" if trained == "bf16" or (trained == "auto" and self.device.type == "cuda") else "fp32"
        if backend not in {"fp32", "bf16"}:
            from .bundle import BundleError
            raise BundleError(f"unknown precision {backend!r}: use auto, fp32 or bf16")
        self.batch_size, self.num_workers, self.backend = batch_size, num_workers, backend

    def loader(self, df: pd.DataFrame) -> DataLoader:
        ds = LesionDataset(df, self.task, self.spec, self.preprocess, train=False, with_targets=False)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        from ..console import track

        amp = torch.bfloat16 if self.backend == "bf16" else None
        return predict_probs(self.model, self.loader(df), self.device, amp, tta=tta,
                             modalities=self.spec.modalities, progress=track if progress else None)


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
