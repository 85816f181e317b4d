"""Bundles: a directory holding everything needed to predict, independent of the training run.

  model.<ext>        model.safetensors (networks), model.txt (LightGBM), members.json (ensembles) …
  config.yaml        the full resolved config: kind, task, classes, feature spec, model settings
  calibration.json   temperature, prior adjustment, per-class cuts (see evaluation.calibration)
  metrics.json       validation / out-of-fold metrics at save time
  VERSION            dermfusion version and bundle format
  HASH               sha256 over the model file(s) and config — shown by the API and in audits
  model_card.*       optional model card (json, md, html; ``card``) — documentation, not hashed
  drift_reference.json  optional input / output statistics of the validation lesions (service drift baseline)

This module reads and writes those files and knows nothing of models: ``inference.load_predictor(path)`` turns a
bundle into a Predictor, ``bundle.resolve`` finds the bundles of a training run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .. import __version__
from ..errors import DermfusionError
from ..tasks import TaskSpec, get_task

BUNDLE_FORMAT = 1


class BundleError(DermfusionError, ValueError):
    """A directory that is not a usable bundle (or training run), or bundles that cannot be combined."""


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


def hash_dir(path: Path) -> str:
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
    digest = hash_dir(out)
    (out / "HASH").write_text(digest + "\n")
    return read_bundle(out)


def update_calibration(path: str | Path, calibration: dict) -> None:
    (Path(path) / "calibration.json").write_text(json.dumps(calibration, indent=2))


def is_bundle(path: str | Path) -> bool:
    """A bundle directory: config.yaml and HASH (a training run's directory has a config.yaml too)."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "HASH").is_file()


def read_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    if not (path / "config.yaml").exists():
        raise BundleError(f"{path} is not a dermfusion bundle (no config.yaml); pass a bundle directory "
                          "written by `dermfusion train`, `stack` or `ensemble`")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if "kind" not in config or "task" not in config:
        raise BundleError(f"{path} is not a dermfusion bundle (its config.yaml has no 'kind' / 'task': a training "
                          "run's config?); pass a bundle directory or the run directory itself")
    calib = json.loads((path / "calibration.json").read_text()) if (path / "calibration.json").exists() else {}
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else {}
    version = (path / "VERSION").read_text().splitlines()[0] if (path / "VERSION").exists() else ""
    digest = (path / "HASH").read_text().strip() if (path / "HASH").exists() else ""
    return Bundle(path=path, config=config, calibration=calib, metrics=metrics, version=version, content_hash=digest)
