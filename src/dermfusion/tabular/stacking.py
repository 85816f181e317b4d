"""Stacking: a multinomial logistic meta-model on several runs' out-of-fold probabilities.

    res = fit_stack([oof_a, oof_b], manifest_df, "milk10k", folds)
    res.oof            second-level OOF (lesion_id, fold, <class…>): fold k's rows are predicted by a
                       meta-model fitted on the other folds' rows only
    res.meta           the final meta-model, fitted on all OOF rows (for the "stack" bundle)
    write_stack_bundle(out, res, member_bundles, task)

Meta features: log-probabilities of every member (+ optionally the concept scores and age,
median-imputed), standardised. The meta-model is stored as plain JSON (`meta.json`), never pickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..bundle import write_bundle
from ..data.manifest import ManifestError, concept_columns, targets
from ..errors import DermfusionError
from ..evaluation import calibration as _cal, metrics as _met
from ..tasks import TaskSpec, get_task

META_FILE = "meta.json"
_EPS = 1e-6


class StackError(DermfusionError, ValueError):
    pass


class MetaModel:
    """Standardised log-probabilities (+ extras) -> multinomial logistic regression."""

    def __init__(self, num_classes: int, n_members: int, extra_columns: list[str] | None = None, C: float = 0.1,
                 max_iter: int = 2000):
        self.num_classes, self.n_members = int(num_classes), int(n_members)
        self.extra_columns = list(extra_columns or [])
        self.C, self.max_iter = float(C), int(max_iter)
        self.state: dict = {}

    def _design(self, probs: list[np.ndarray], df: pd.DataFrame | None, fitting: bool = False) -> np.ndarray:
        if len(probs) != self.n_members:
            raise StackError(f"meta-model expects {self.n_members} member probability arrays, got {len(probs)}")
        parts = [np.log(np.clip(np.asarray(p, float), _EPS, 1.0)) for p in probs]
        if self.extra_columns:
            if df is None:
                raise StackError(f"this meta-model also reads {self.extra_columns[:3]}…; pass the manifest rows")
            ex = np.stack([pd.to_numeric(df[c], errors="coerce").to_numpy(float) if c in df.columns
                           else np.full(len(df), np.nan) for c in self.extra_columns], axis=1)
            if fitting:
                self.state["median"] = np.nan_to_num(np.nanmedian(ex, axis=0)).tolist() if len(ex) else []
            ex = np.where(np.isnan(ex), np.asarray(self.state["median"])[None, :], ex)
            parts.append(ex)
        Z = np.concatenate(parts, axis=1)
        if fitting:
            mean, scale = Z.mean(0), Z.std(0)
            scale[scale < 1e-8] = 1.0
            self.state["mean"], self.state["scale"] = mean.tolist(), scale.tolist()
        return (Z - np.asarray(self.state["mean"])) / np.asarray(self.state["scale"])

    def fit(self, probs: list[np.ndarray], y_idx: np.ndarray, df: pd.DataFrame | None = None,
            sample_weight=None) -> "MetaModel":
        from sklearn.linear_model import LogisticRegression

        Z = self._design(probs, df, fitting=True)
        lr = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(Z, y_idx, sample_weight=sample_weight)
        coef = np.zeros((self.num_classes, Z.shape[1]))
        icpt = np.full(self.num_classes, -30.0)  # a class never seen in training gets ~0 probability
        if len(lr.classes_) > 2:
            coef[lr.classes_], icpt[lr.classes_] = lr.coef_, lr.intercept_
        else:  # binary sklearn parametrisation -> symmetric two-class softmax
            coef[lr.classes_] = np.r_[-lr.coef_, lr.coef_] / 2
            icpt[lr.classes_] = np.r_[-lr.intercept_, lr.intercept_] / 2
        self.state.update(coef=coef.tolist(), intercept=icpt.tolist())
        return self

    def predict_proba(self, probs: list[np.ndarray], df: pd.DataFrame | None = None) -> np.ndarray:
        if "coef" not in self.state:
            raise StackError("meta-model is not fitted")
        z = self._design(probs, df) @ np.asarray(self.state["coef"]).T + np.asarray(self.state["intercept"])
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / META_FILE).write_text(json.dumps({"num_classes": self.num_classes, "n_members": self.n_members,
                                               "extra_columns": self.extra_columns, "C": self.C,
                                               "max_iter": self.max_iter, "state": self.state}))

    @classmethod
    def load(cls, directory: str | Path) -> "MetaModel":
        f = Path(directory) / META_FILE
        if not f.exists():
            raise StackError(f"{directory} has no {META_FILE}")
        d = json.loads(f.read_text())
        m = cls(d["num_classes"], d["n_members"], d["extra_columns"], d["C"], d["max_iter"])
        m.state = d["state"]
        return m


@dataclass
class StackResult:
    oof: pd.DataFrame            # lesion_id, fold, <class…>
    meta: MetaModel
    member_names: list[str]
    metrics: dict


def align_oof(oof: pd.DataFrame, lesion_ids: pd.Series, task: TaskSpec, name: str = "run") -> np.ndarray:
    """N x C probabilities of an OOF frame in the manifest's row order; errors on missing lesions."""
    missing_cols = [c for c in task.classes if c not in oof.columns]
    if missing_cols or "lesion_id" not in oof.columns:
        raise StackError(f"OOF frame {name!r} needs lesion_id and class columns {missing_cols or ''}")
    if oof["lesion_id"].duplicated().any():
        raise StackError(f"OOF frame {name!r} has duplicate lesion ids")
    idx = oof.set_index("lesion_id")
    missing = ~pd.Index(lesion_ids).isin(idx.index)
    if missing.any():
        raise StackError(f"OOF frame {name!r} has no prediction for {int(missing.sum())} lesion(s), e.g. "
                         f"{list(pd.Index(lesion_ids)[missing][:3])}; stack runs trained on the same manifest")
    return idx.loc[list(lesion_ids), list(task.classes)].to_numpy(float)


def fit_stack(oof_frames: list[pd.DataFrame], manifest_df: pd.DataFrame, task: str | TaskSpec, folds=None, *,
              names: list[str] | None = None, C: float = 0.1, use_concepts: bool = False,
              use_metadata: bool = False, eval_size: int | None = None) -> StackResult:
    """Fold-aware stacking. `folds` (one per manifest row) defaults to the manifest's `fold` column."""
    task = get_task(task) if isinstance(task, str) else task
    if not oof_frames:
        raise StackError("fit_stack needs at least one OOF frame")
    df = manifest_df.reset_index(drop=True)
    folds = df["fold"].to_numpy(int) if folds is None else np.asarray(folds, int)
    if folds.shape != (len(df),) or (folds < 0).any():
        raise ManifestError("fit_stack needs one fold >= 0 per manifest row")
    names = names or [f"run{i}" for i in range(len(oof_frames))]
    probs = [align_oof(o, df["lesion_id"], task, n) for o, n in zip(oof_frames, names)]
    y_true = targets(df, task)
    y = y_true.argmax(1)
    extra = (concept_columns(df) if use_concepts else []) + (["age"] if use_metadata and "age" in df else [])

    def new():
        return MetaModel(task.num_classes, len(probs), extra, C=C)

    oof2 = np.zeros((len(df), task.num_classes))
    for k in np.unique(folds):
        tr, te = folds != k, folds == k  # the meta-model never sees the rows it predicts
        m = new().fit([p[tr] for p in probs], y[tr], df[tr])
        oof2[te] = m.predict_proba([p[te] for p in probs], df[te])
    meta = new().fit(probs, y, df)
    out = pd.DataFrame(oof2, columns=list(task.classes))
    out.insert(0, "fold", folds)
    out.insert(0, "lesion_id", df["lesion_id"].to_numpy())
    metrics = {"log_loss": _met.log_loss(y, oof2), "balanced_accuracy": _met.balanced_accuracy(y, oof2)}
    if task.metric == "milk10k_dice":
        metrics["nested_cut_score"] = _cal.nested_cut_estimate(oof2, y_true, folds, eval_size=eval_size)["score"]
    return StackResult(oof=out, meta=meta, member_names=names, metrics=metrics)


def relative_members(out: Path, member_bundles: list[str | Path]) -> list[str]:
    return [os.path.relpath(Path(p).resolve(), out.resolve()) for p in member_bundles]


def write_stack_bundle(out: str | Path, result: StackResult, member_bundles: list[str | Path],
                       task: str | TaskSpec, calibration: dict | None = None, name: str = "stack"):
    """Bundle kind "stack": members.json (paths relative to `out`) + meta.json."""
    task = get_task(task) if isinstance(task, str) else task
    out = Path(out)
    if len(member_bundles) != result.meta.n_members:
        raise StackError(f"stack has {result.meta.n_members} members but {len(member_bundles)} bundles were given")
    out.mkdir(parents=True, exist_ok=True)
    members = [{"name": n, "path": p} for n, p in zip(result.member_names, relative_members(out, member_bundles))]

    def write(d: Path):
        (d / "members.json").write_text(json.dumps(members, indent=2))
        result.meta.save(d)

    return write_bundle(out, config={"kind": "stack", "task": task.name, "name": name, "members": members,
                                     "meta": {"C": result.meta.C, "extra_columns": result.meta.extra_columns}},
                        write_model=write, calibration=calibration or {}, metrics=result.metrics)
