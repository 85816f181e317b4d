"""Bundles: a directory holding everything needed to predict, independent of the training run.

  model.<ext>        model.safetensors (networks), model.txt (LightGBM), members.json (ensembles) …
  config.yaml        the full resolved config: kind, task, classes, feature spec, model settings
  calibration.json   temperature, prior adjustment, per-class cuts (see evaluation.calibration)
  metrics.json       validation / out-of-fold metrics at save time
  VERSION            dermfusion version and bundle format
  HASH               sha256 over the model file(s) and config — shown by the API and in audits
  model_card.*       optional model card (json, md, html; evaluation.model_card) — documentation, not hashed
Each bundle kind registers a loader; `load_predictor(path)` returns a Predictor for any kind.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from .. import __version__
from ..tasks import TaskSpec, get_task

BUNDLE_FORMAT = 1
_LOADERS: dict[str, Callable[["Bundle"], "Predictor"]] = {}


class BundleError(ValueError):
    pass


@dataclass
class Bundle:
    path: Path
    config: dict
    calibration: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    version: str = ""
    content_hash: str = ""

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def task(self) -> TaskSpec:
        return get_task(self.config["task"])

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name)

    def file(self, name: str) -> Path:
        return self.path / name


# written after training (fitted or documentation), so not part of the content hash
UNHASHED_FILES = frozenset({"HASH", "metrics.json", "calibration.json", "drift_reference.json",
                            "model_card.json", "model_card.md", "model_card.html"})


def _hash_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name not in UNHASHED_FILES:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def write_bundle(out: str | Path, *, config: dict, write_model: Callable[[Path], None],
                 calibration: dict | None = None, metrics: dict | None = None) -> Bundle:
    """Write a bundle. `write_model(dir)` writes the model file(s) into the directory."""
    out = Path(out)
    if "kind" not in config or "task" not in config:
        raise BundleError("a bundle config needs 'kind' and 'task'")
    out.mkdir(parents=True, exist_ok=True)
    write_model(out)
    config = dict(config)
    config.setdefault("classes", list(get_task(config["task"]).classes))
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (out / "calibration.json").write_text(json.dumps(calibration or {}, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, default=float))
    (out / "VERSION").write_text(f"dermfusion {__version__}\nbundle_format {BUNDLE_FORMAT}\n")
    digest = _hash_dir(out)
    (out / "HASH").write_text(digest + "\n")
    return read_bundle(out)


def update_calibration(path: str | Path, calibration: dict) -> None:
    (Path(path) / "calibration.json").write_text(json.dumps(calibration, indent=2))


def read_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    if not (path / "config.yaml").exists():
        raise BundleError(f"{path} is not a dermfusion bundle (no config.yaml); pass a bundle directory "
                          "written by `dermfusion train`, `stack` or `ensemble`")
    config = yaml.safe_load((path / "config.yaml").read_text())
    calib = json.loads((path / "calibration.json").read_text()) if (path / "calibration.json").exists() else {}
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else {}
    version = (path / "VERSION").read_text().splitlines()[0] if (path / "VERSION").exists() else ""
    digest = (path / "HASH").read_text().strip() if (path / "HASH").exists() else ""
    return Bundle(path=path, config=config, calibration=calib, metrics=metrics, version=version, content_hash=digest)


def register_kind(kind: str):
    def deco(fn):
        _LOADERS[kind] = fn
        return fn
    return deco


def load_predictor(path: str | Path, **kwargs) -> "Predictor":
    from . import loaders  # noqa: F401  (registers the built-in kinds)

    bundle = read_bundle(path)
    if bundle.kind not in _LOADERS:
        raise BundleError(f"{path}: unknown bundle kind {bundle.kind!r}; known: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[bundle.kind](bundle, **kwargs)


class Predictor:
    """Turns manifest rows into class probabilities (calibrated with the bundle's calibration.json)."""

    bundle: Bundle

    @property
    def task(self) -> TaskSpec:
        return self.bundle.task

    def predict_raw(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        """N x C probabilities before calibration."""
        raise NotImplementedError

    def predict_proba(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        """N x C calibrated probabilities (temperature + prior adjustment; rows sum to 1)."""
        from ..evaluation.calibration import Calibration

        return Calibration.from_dict(self.bundle.calibration).apply(self.predict_raw(df, tta=tta, progress=progress))

    def predict_submission(self, df: pd.DataFrame, *, tta: int = 0, progress: bool = False) -> np.ndarray:
        """N x C scores for the multi-label submission: tuned per-class cuts rescaled to land at 0.5."""
        from ..evaluation.calibration import Calibration

        calib = Calibration.from_dict(self.bundle.calibration)
        return calib.apply(self.predict_raw(df, tta=tta, progress=progress), rescale_cuts=True)
