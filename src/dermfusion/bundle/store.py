"""Bundles: a directory holding everything needed to predict, independent of the training run.

  model.<ext>        model.safetensors (networks), model.txt (LightGBM), members.json (ensembles) …
  config.yaml        the full resolved config: kind, task, classes, feature spec, model settings, preprocessing
  calibration.json   posteriors: temperature, per-class bias and the prior they assume; the balanced rule's prior
                     strength; MILK10k per-class cuts (see evaluation.calibration)
  decisions.json     optional decision rules fitted on out-of-fold posteriors: the triage operating point and the
                     conformal differential's calibration (evaluation.decision_rules, evaluation.conformal; hashed)
  metrics.json       validation / out-of-fold metrics at save time
  VERSION            dermfusion version and bundle format
  SHA256SUMS         sha256 of every covered file (``sha256sum -c SHA256SUMS`` checks them)
  HASH               sha256 of SHA256SUMS: the content hash shown by the API and in audits
  model_card.*       optional model card (json, md, html; ``card``) — documentation, not hashed
  drift_reference.json  optional input / output statistics of the validation lesions (service drift baseline)
  embedding_reference.npz  optional: the "cannot assess" gate's familiarity reference (hashed: it changes answers)
  backend_check.json optional: each CPU's inference-backend check at load (speed, agreement) — not hashed
  oof.csv            a stack's / ensemble's out-of-fold predictions (written beside it by `stack` / `ensemble`)

The content hash covers every file of the directory except ``UNHASHED_FILES`` (the two hash files, documentation,
evaluation and monitoring data that change no prediction) and hidden files: the model file(s), ``config.yaml``
(with the preprocessing), ``calibration.json`` and ``VERSION``. Whatever rewrites a covered file re-seals the bundle
(``update_calibration``, ``seal_bundle``); ``verify_bundle`` recomputes the hash and names the file that differs.

This module reads and writes those files and knows nothing of models: ``inference.load_predictor(path)`` turns a
bundle into a Predictor, ``bundle.resolve`` finds the bundles of a training run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import yaml

from .. import __version__
from ..errors import DermfusionError
from ..tasks import TaskSpec, get_task

BUNDLE_FORMAT = 2   # 2: calibration.json is hashed, SHA256SUMS lists each covered file
SUMS_FILE = "SHA256SUMS"


class BundleError(DermfusionError, ValueError):
    """A directory that is not a usable bundle (or training run), or bundles that cannot be combined."""


class BundleIntegrityError(BundleError):
    """A bundle whose files do not match its recorded hash (changed, added or removed since it was sealed)."""


@dataclass
class Bundle:
    path: Path
    config: dict
    calibration: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    version: str = ""
    content_hash: str = ""
    decisions: dict = field(default_factory=dict)

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


# documentation, evaluation and monitoring data (written after training, changing no prediction: the out-of-fold
# predictions `stack` / `ensemble` keep beside their bundle too) and the hash files themselves
UNHASHED_FILES = frozenset({"HASH", SUMS_FILE, "metrics.json", "drift_reference.json", "oof.csv",
                            "oof_calibrated.csv", "oof_balanced.csv", "operating_point.json", "operating_point.png",
                            "model_card.json", "model_card.md", "model_card.html", "backend_check.json",
                            "training_lesions.txt"})   # a blend's record of its members' training lesions
                                                       # (training/lesion_record.py), beside its bundle too
# bundles of format 1 (no SHA256SUMS) left calibration.json out of the hash too
_LEGACY_UNHASHED = (UNHASHED_FILES - {SUMS_FILE}) | {"calibration.json"}


@dataclass(frozen=True)
class Integrity:
    """A verified bundle: its directory, its recomputed (= recorded) hash, and whether it is of format 1, whose
    hash does not cover calibration.json."""
    path: Path
    hash: str
    legacy: bool = False


def _update(h, f: Path):
    with open(f, "rb") as fh:  # streamed: a large weight file is never read into memory at once
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h


def _file_sha256(f: Path) -> str:
    return _update(hashlib.sha256(), f).hexdigest()


def file_sums(path: str | Path) -> dict[str, str]:
    """{file name: sha256} of the files the content hash covers."""
    return {f.name: _file_sha256(f) for f in sorted(Path(path).iterdir())
            if f.is_file() and f.name not in UNHASHED_FILES and not f.name.startswith(".")}


def _sums_text(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def hash_dir(path: str | Path) -> str:
    """The content hash of a bundle's files as they are now: sha256 of its SHA256SUMS text."""
    return hashlib.sha256(_sums_text(file_sums(path)).encode()).hexdigest()


def _legacy_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name not in _LEGACY_UNHASHED:
            h.update(f.name.encode())
            _update(h, f)
    return h.hexdigest()


def _write_atomic(f: Path, text: str) -> None:
    tmp = f.with_name(f".{f.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, f)


def seal_bundle(path: str | Path) -> str:
    """Write SHA256SUMS and HASH for the bundle's files as they are now; the new content hash. Only writers of
    a bundle call this, right after writing a covered file."""
    path = Path(path)
    text = _sums_text(file_sums(path))
    digest = hashlib.sha256(text.encode()).hexdigest()
    _write_atomic(path / SUMS_FILE, text)
    _write_atomic(path / "HASH", digest + "\n")
    return digest


def _listed_sums(path: Path) -> dict[str, str]:
    listed = {}
    for line in (path / SUMS_FILE).read_text().splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise BundleIntegrityError(f"{path}: {SUMS_FILE} is malformed; the bundle cannot be verified")
        listed[name] = digest
    return listed


def verify_bundle(path: str | Path, *, skip: Iterable[str] = ()) -> Integrity:
    """Recompute the bundle's hash from its files and compare it with HASH (and each file with SHA256SUMS);
    ``BundleIntegrityError`` naming the file(s) that differ. ``skip``: files about to be rewritten."""
    path, skip = Path(path), set(skip)
    if not (path / "HASH").is_file():
        raise BundleIntegrityError(f"{path}: no HASH file, so its content cannot be verified")
    lines = (path / "HASH").read_text().splitlines()
    recorded = lines[0].strip() if lines else ""
    if not (path / SUMS_FILE).is_file():  # format 1: one hash over model file(s), config.yaml, VERSION
        if _legacy_hash(path) != recorded:
            covered = sorted(f.name for f in path.iterdir() if f.is_file() and f.name not in _LEGACY_UNHASHED)
            raise BundleIntegrityError(
                f"{path}: its files do not match its HASH — one of {', '.join(covered)} was changed, added or "
                f"removed since the bundle was written (a bundle of format 1 has no {SUMS_FILE} to say which)")
        return Integrity(path, recorded, legacy=True)
    if hashlib.sha256((path / SUMS_FILE).read_bytes()).hexdigest() != recorded:
        raise BundleIntegrityError(f"{path}: {SUMS_FILE} does not match HASH (one of the two was edited)")
    listed, actual = _listed_sums(path), file_sums(path)
    changed = sorted(n for n in listed if n in actual and actual[n] != listed[n] and n not in skip)
    missing = sorted(n for n in listed if n not in actual and n not in skip)
    added = sorted(n for n in actual if n not in listed and n not in skip)
    if changed or missing or added:
        what = "; ".join(p for p in (f"changed: {', '.join(changed)}" if changed else "",
                                     f"missing: {', '.join(missing)}" if missing else "",
                                     f"not in {SUMS_FILE}: {', '.join(added)}" if added else "") if p)
        raise BundleIntegrityError(f"{path}: content differs from the hash recorded when it was written ({what}); "
                                   "refusing to use it — restore the bundle from its source")
    return Integrity(path, recorded, legacy=False)


def member_paths(path: str | Path) -> list[Path]:
    """The member bundle directories an average / ensemble / stack bundle names in members.json (relative paths)."""
    path = Path(path)
    f = path / "members.json"
    if not f.is_file():
        return []
    try:
        members = json.loads(f.read_text())
        return [(path / m["path"]).resolve() for m in members]
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{path}: members.json is not a list of {{'path': …}} entries ({e})") from None


def verify_tree(path: str | Path) -> list[Integrity]:
    """``verify_bundle`` on a bundle and, recursively, on every member bundle it names — each once."""
    out: list[Integrity] = []
    seen: set[Path] = set()

    def walk(p: Path) -> None:
        if p.resolve() in seen:
            return
        seen.add(p.resolve())
        out.append(verify_bundle(p))
        for m in member_paths(p):
            walk(m)

    walk(Path(path))
    return out


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
    seal_bundle(out)
    return read_bundle(out)


def update_calibration(path: str | Path, calibration: dict) -> None:
    """Rewrite a bundle's calibration.json and re-seal its hash — after checking that nothing else in it changed
    (a re-seal must never bless a tampered file)."""
    path = Path(path)
    verify_bundle(path, skip={"calibration.json"})
    _write_atomic(path / "calibration.json", json.dumps(calibration, indent=2))
    seal_bundle(path)


def update_files(path: str | Path, writers: dict[str, Callable[[Path], object]]) -> str:
    """Write several covered files of a bundle (``{name: write(path / name)}``) and re-seal it once — after checking
    that nothing else in it changed; the new content hash."""
    path = Path(path)
    verify_bundle(path, skip=set(writers))
    for name, write in writers.items():
        tmp = path / f".{name}.tmp"
        write(tmp)
        tmp.replace(path / name)
    return seal_bundle(path)


def update_file(path: str | Path, name: str, write: Callable[[Path], object]) -> str:
    """Write one covered file of a bundle (``write(path / name)``) and re-seal it — after checking that nothing
    else in it changed; the new content hash."""
    path = Path(path)
    verify_bundle(path, skip={name})
    write(path / name)
    return seal_bundle(path)


def upgrade_seal(path: str | Path) -> tuple[str, bool]:
    """A bundle of format 1 gets SHA256SUMS — after its legacy hash is verified, so the new seal blesses exactly
    what was written; (content hash, whether it was upgraded). A format-2 bundle is only verified."""
    integ = verify_bundle(path)
    if not integ.legacy:
        return integ.hash, False
    return seal_bundle(path), True


def is_bundle(path: str | Path) -> bool:
    """A bundle directory: config.yaml and HASH (a training run's directory has a config.yaml too)."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "HASH").is_file()


def read_bundle(path: str | Path) -> Bundle:
    """The bundle's files, as recorded (``verify_bundle`` checks them against the hash)."""
    path = Path(path)
    if not (path / "config.yaml").exists():
        raise BundleError(f"{path} is not a dermfusion bundle (no config.yaml); pass a bundle directory "
                          "written by `dermfusion train`, `stack` or `ensemble`")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if "kind" not in config or "task" not in config:
        raise BundleError(f"{path} is not a dermfusion bundle (its config.yaml has no 'kind' / 'task': a training "
                          "run's config?); pass a bundle directory or the run directory itself")
    calib = json.loads((path / "calibration.json").read_text()) if (path / "calibration.json").exists() else {}
    decisions = json.loads((path / "decisions.json").read_text()) if (path / "decisions.json").exists() else {}
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else {}
    version = (path / "VERSION").read_text().splitlines()[0] if (path / "VERSION").exists() else ""
    lines = (path / "HASH").read_text().splitlines() if (path / "HASH").exists() else []
    digest = lines[0].strip() if lines else ""
    return Bundle(path=path, config=config, calibration=calib, metrics=metrics, version=version, content_hash=digest,
                  decisions=decisions)
