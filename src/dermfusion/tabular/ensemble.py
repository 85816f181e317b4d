"""Weighted ensembles of runs: simplex-constrained weight search, the "ensemble" bundle, a comparison table.

    w, score = search_weights([oof_a, oof_b, oof_c], y_true, metric_fn)   # metric_fn(y_true, probs), higher=better
    write_ensemble_bundle("runs/ens", [bundle_a, bundle_b, bundle_c], w, "milk10k", calibration=…)
    compare_table({"lgbm": oof_a, "stack": oof_s, "ensemble": oof_e}, y_true, folds, task)

Weights are softmax(z): always on the simplex, so Nelder–Mead can search freely. Every one-hot
vertex (= a single member) and the uniform mix are evaluated too, so the returned score is never
below the best member's score under `metric_fn` on the rows it was given.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from ..bundle import write_bundle
from ..errors import DermfusionError
from ..evaluation import calibration as _cal, metrics as _met
from ..tasks import TaskSpec, get_task
from .stacking import relative_members


class EnsembleError(DermfusionError, ValueError):
    pass


def blend(prob_list: list[np.ndarray], weights) -> np.ndarray:
    w = np.asarray(weights, float)
    return np.tensordot(w, np.stack(prob_list), axes=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def search_weights(oof_prob_list: list[np.ndarray], y_true: np.ndarray, metric_fn, *, n_restarts: int = 6,
                   seed: int = 0, max_iter: int = 300) -> tuple[np.ndarray, float]:
    """(weights on the simplex, metric) maximising metric_fn(y_true, Σ w_i P_i)."""
    if not oof_prob_list:
        raise EnsembleError("search_weights needs at least one probability array")
    shapes = {np.shape(p) for p in oof_prob_list}
    if len(shapes) != 1:
        raise EnsembleError(f"all members need the same N x C shape, got {sorted(shapes)}")
    P = np.stack([np.asarray(p, float) for p in oof_prob_list])
    M = len(P)
    cache: dict[tuple, float] = {}

    def score(w: np.ndarray) -> float:
        key = tuple(np.round(w, 6))
        if key not in cache:
            cache[key] = float(metric_fn(y_true, np.tensordot(w, P, axes=1)))
        return cache[key]

    candidates = [np.eye(M)[i] for i in range(M)] + [np.full(M, 1.0 / M)]
    best_w = max(candidates, key=score)
    if M == 1:
        return best_w, score(best_w)
    rng = np.random.default_rng(seed)
    starts = [np.zeros(M), np.log(np.maximum(best_w, 1e-3))] + [rng.normal(0, 1, M) for _ in range(n_restarts)]
    for z0 in starts:
        res = minimize(lambda z: -score(_softmax(z)), z0, method="Nelder-Mead",
                       options={"maxiter": max_iter, "xatol": 1e-3, "fatol": 1e-6})
        w = _softmax(res.x)
        if score(w) > score(best_w):
            best_w = w
    return best_w, score(best_w)


def write_ensemble_bundle(out: str | Path, member_bundles: list[str | Path], weights, task: str | TaskSpec, *,
                          names: list[str] | None = None, calibration: dict | None = None,
                          metrics: dict | None = None, name: str = "ensemble"):
    """Bundle kind "ensemble": members.json with paths relative to `out` and simplex weights."""
    task = get_task(task) if isinstance(task, str) else task
    w = np.asarray(weights, float)
    if len(w) != len(member_bundles):
        raise EnsembleError(f"{len(member_bundles)} member bundles but {len(w)} weights")
    if (w < 0).any() or w.sum() <= 0:
        raise EnsembleError("ensemble weights must be non-negative with a positive sum")
    w = w / w.sum()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = names or [Path(p).name for p in member_bundles]
    members = [{"name": n, "path": p, "weight": float(wi)}
               for n, p, wi in zip(names, relative_members(out, member_bundles), w)]

    def write(d: Path):
        (d / "members.json").write_text(json.dumps(members, indent=2))

    return write_bundle(out, config={"kind": "ensemble", "task": task.name, "name": name, "members": members},
                        write_model=write, calibration=calibration or {}, metrics=metrics or {})


def compare_rows(oofs: dict[str, np.ndarray], y_true: np.ndarray, folds: np.ndarray,
                 task: TaskSpec, eval_size: int | None = None) -> pd.DataFrame:
    """One row per run: official score as is (p > 0.5), nested cut-tuned score, balanced accuracy,
    macro-F1 (argmax), log loss — all on out-of-fold rows."""
    y_idx = y_true.argmax(1)
    rows = []
    for name, p in oofs.items():
        r = {"run": name, "official_raw": _met.milk10k_score(y_true, p)}
        if task.metric == "milk10k_dice":
            r["nested_cut"] = _cal.nested_cut_estimate(p, y_true, folds, eval_size=eval_size)["score"]
        r.update(balanced_acc=_met.balanced_accuracy(y_idx, p), macro_f1=_met.macro_f1(y_idx, p),
                 log_loss=_met.log_loss(y_idx, p))
        rows.append(r)
    return pd.DataFrame(rows).set_index("run")


def compare_table(oofs: dict[str, np.ndarray], y_true: np.ndarray, folds: np.ndarray, task: str | TaskSpec,
                  title: str = "out-of-fold comparison", print_table: bool = True,
                  eval_size: int | None = None) -> pd.DataFrame:
    """Compare members, stack and ensemble on OOF rows; prints a rich table (plain text without rich)."""
    task = get_task(task) if isinstance(task, str) else task
    df = compare_rows(oofs, y_true, folds, task, eval_size)
    if print_table:
        try:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=title)
            t.add_column("run")
            for c in df.columns:
                t.add_column(c, justify="right")
            best = {c: (df[c].min() if c == "log_loss" else df[c].max()) for c in df.columns}
            for name, r in df.iterrows():
                t.add_row(name, *[(f"[bold]{r[c]:.4f}[/bold]" if r[c] == best[c] else f"{r[c]:.4f}")
                                  for c in df.columns])
            Console().print(t)
        except ImportError:
            print(title)
            print(df.round(4).to_string())
    return df
