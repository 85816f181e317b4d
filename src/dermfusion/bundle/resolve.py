"""Where a training run keeps its bundles — the one place that knows the run layouts.

  network run   RUN/summary.json  {"bundles": ["fold_0/bundle", …]}  (``--folds full``: ["full/bundle"])
                RUN/fold_<k>/bundle, RUN/full/bundle — an ensemble recipe (``members:``): RUN/member_<i>/fold_<k>/bundle;
                RUN/config.yaml is the *experiment* config, not a bundle
  tabular run   RUN/summary.json  {"bundle": …, "fold_bundles": …}
                RUN/bundle        the full-data refit, calibrated on the out-of-fold predictions
                RUN/folds/fold<k> one bundle per fold (the models behind the out-of-fold predictions)
  either        RUN/bundle        of kind "average" for a network run (written when a run is stacked or
                                  ensembled: one bundle standing for the run's fold ensemble)

``resolve_run(target)``  the bundles that *predict* for a target (predict, serve, explain, drift, export, bench)
``run_bundles(target)``  every bundle of a target, with its run directory (card, calibrate write into them)
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from .store import Bundle, BundleError, is_bundle, read_bundle, write_bundle

Target = str | os.PathLike | Iterable[str | os.PathLike]


def _summary(run: Path) -> dict | None:
    try:
        s = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def _fold_number(path: Path) -> int:
    m = re.search(r"(\d+)$", path.name if path.name != "bundle" else path.parent.name)
    return int(m.group(1)) if m else -1


def resolve_run(target: Target) -> list[Path]:
    """The bundle directories that predict for ``target``, in order:

    a bundle directory (config.yaml + HASH)  → itself;
    a network run directory                  → the bundles its summary.json lists (the fold bundles, or full/bundle);
    a tabular run directory                  → RUN/bundle (the calibrated full-data refit), else its fold bundles;
    a directory holding only RUN/bundle      → RUN/bundle;
    a list of any of these                   → all of them, in the order given.

    Several bundles are averaged by the caller (``inference.load_run``). Raises ``BundleError`` saying what was
    expected."""
    if not isinstance(target, (str, os.PathLike)):
        out = [b for t in target for b in resolve_run(t)]
        if not out:
            raise BundleError("no bundle or run directory given")
        return out
    p = Path(target)
    if not p.exists():
        raise BundleError(f"{p} not found: pass a bundle directory or a training run directory")
    if is_bundle(p):
        return [p]
    summary = _summary(p)
    listed = [p / b for b in (summary or {}).get("bundles") or []]
    if listed:
        missing = [str(b) for b in listed if not is_bundle(b)]
        if missing:
            raise BundleError(f"{p}: summary.json lists bundle(s) that are not there: {', '.join(missing)}")
        return listed
    if is_bundle(p / "bundle"):
        return [p / "bundle"]
    folds = sorted((q for q in p.glob("folds/fold*") if is_bundle(q)), key=_fold_number)
    if folds:
        return folds
    if summary is None and any(is_bundle(q) for q in [*p.glob("fold_*/bundle"), *p.glob("member_*/fold_*/bundle"),
                                                       *p.glob("full/bundle"), *p.glob("member_*/full/bundle")]):
        raise BundleError(f"{p}: training has not finished (no summary.json, so no calibration yet); re-run the same "
                          "`dermfusion train` command to resume, or pass one fold bundle (RUN/fold_<k>/bundle)")
    raise BundleError(f"{p} is neither a bundle (config.yaml + HASH) nor a training run directory (summary.json "
                      "listing bundles, or RUN/bundle)")


def resolve_one(target: Target, what: str) -> Path:
    """The single bundle ``target`` stands for; a ``BundleError`` naming the candidates when it is several."""
    bundles = resolve_run(target)
    if len(bundles) > 1:
        listed = ", ".join(str(b) for b in bundles[:5]) + (" …" if len(bundles) > 5 else "")
        raise BundleError(f"{what} needs one bundle, and {target} stands for {len(bundles)} ({listed}); "
                          "pass one of them")
    return bundles[0]


def find_run_dir(bundle: str | Path) -> Path | None:
    """The training run a bundle belongs to: RUN/fold_k/bundle, RUN/full/bundle, RUN/bundle or RUN/folds/foldk."""
    bundle = Path(bundle)
    for d in (bundle.parent, bundle.parent.parent, bundle.parent.parent.parent):
        if (d / "summary.json").exists():
            return d
    return None


def run_bundles(target: str | Path) -> tuple[list[Path], Path | None]:
    """(every bundle, run directory or None) of a bundle or a training run directory: a network run's fold /
    full bundles, a tabular run's fold bundles and refit, and RUN/bundle — each once."""
    p = Path(target)
    summary = _summary(p)
    if summary is None:
        if is_bundle(p):
            return [p], find_run_dir(p)
        if is_bundle(p / "bundle"):
            return [p / "bundle"], p
        raise BundleError(f"{p} is neither a bundle nor a training run directory (no config.yaml + HASH or "
                          "summary.json)")
    found: list[Path] = []
    seen: set[Path] = set()
    folds = sorted(p.glob("folds/fold*"), key=_fold_number)
    for q in [p / n for n in summary.get("bundles") or []] + folds + [p / "bundle"]:
        if is_bundle(q) and q.resolve() not in seen:
            found.append(q)
            seen.add(q.resolve())
    return found, p


def write_average_bundle(run_dir: str | Path, fold_bundles: list[Path]) -> Bundle:
    """RUN/bundle: one bundle of kind "average" standing for a run's fold ensemble (members.json holds paths
    relative to it), with the run's calibration — so stacks and ensembles can name a run."""
    run_dir = Path(run_dir)
    out = run_dir / "bundle"
    out.mkdir(parents=True, exist_ok=True)
    members = [read_bundle(b) for b in fold_bundles]
    if any(m.calibration != members[0].calibration for m in members[1:]):
        raise BundleError(f"{run_dir}: the fold bundles carry different calibrations; re-run "
                          f"`dermfusion calibrate {run_dir} --manifest M` so they share the run's")
    first = members[0]
    paths = [{"path": os.path.relpath(Path(b).resolve(), out.resolve())} for b in fold_bundles]
    return write_bundle(out, config={"kind": "average", "task": first.task.name,
                                     "name": first.config.get("experiment", {}).get("name", run_dir.name),
                                     "members": paths},
                        write_model=lambda d: (d / "members.json").write_text(json.dumps(paths, indent=2)),
                        calibration=first.calibration, metrics=first.metrics)
