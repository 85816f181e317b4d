"""Covariate shift between two manifests (training vs test / deployment): can a classifier tell their images apart?

Why: an out-of-fold score predicts a test score only when the test images look like the training images
(the ISIC 2018 test images differ in colour from HAM10000's training images). A *domain classifier* is
trained to say which manifest an image came from; its cross-validated (out-of-fold) ROC AUC measures how
different the two sets are: 0.5 = no detectable shift, 1.0 = the sets are told apart perfectly. The 95% CI
is a stratified bootstrap over the out-of-fold predictions (it ignores the classifier's own training
variability, so read it as a lower bound on the uncertainty).

Two feature sets: model-free colour / texture statistics (`image_stats`), which say *what* differs
(the statistics with the largest standardised mean difference are listed), and — given a bundle — the
network's own embeddings (`features` of its output), which say whether the *model* sees a difference.
"""
from __future__ import annotations

import base64
import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .. import __version__
from ..console import make_progress
from ..data.images import ImageError, read_image
from ..data.manifest import IMAGE_COLUMNS, normalise
from ..data.transforms import COLOR_CONSTANCY
from ..errors import DermfusionError
from . import image_stats as S

DEFAULT_MAX_IMAGES = 1500
MIN_IMAGES = 10
THUMBNAILS = 6
CLASSIFIERS = ("logistic", "gbm")


class ShiftError(DermfusionError, ValueError):
    """Inputs the shift check cannot use; the message says what to do."""


@dataclass
class ShiftConfig:
    """How to run the check. `names` label the two manifests in the report (e.g. file names)."""
    modality: str = "dermoscopic"
    max_images: int = DEFAULT_MAX_IMAGES
    seed: int = 0
    color_constancy: str = "none"
    bundle: str | Path | None = None   # names the embedding model in the report
    # (rows, modality, description) -> N×D image embeddings; ``inference.embeddings.bundle_embedder(bundle)``
    embed: Callable[[pd.DataFrame, str, str], np.ndarray] | None = None
    classifier: str = "logistic"
    folds: int = 5
    n_bootstrap: int = 1000
    top_k: int = 10
    names: tuple[str, str] = ("reference", "other")


@dataclass
class ShiftResult:
    """`summary` is JSON-able (shift.json); thumbnails (base64 JPEGs per side) only go into the HTML."""
    summary: dict
    thumbnails: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- images
def sample_rows(df: pd.DataFrame, modality: str, max_images: int, seed: int, name: str) -> tuple[pd.DataFrame, int]:
    """Rows with an image of `modality`, at most `max_images` of them (fixed-seed random subset, manifest order).
    Returns (rows, number of rows with an image)."""
    if modality not in IMAGE_COLUMNS:
        raise ShiftError(f"unknown modality {modality!r}; use one of {', '.join(IMAGE_COLUMNS)}")
    col = IMAGE_COLUMNS[modality]
    paths = df[col].astype(str).str.strip() if col in df.columns else pd.Series("", index=df.index)
    has = (paths != "") & (paths.str.lower() != "nan")
    if not has.any():
        other = [m for m, c in IMAGE_COLUMNS.items() if m != modality and c in df.columns and (df[c].astype(str) != "").any()]
        raise ShiftError(f"{name}: no {modality} images (column {col} is empty)"
                         + (f"; it has {', '.join(other)} images: pass --modality {other[0]}" if other else
                            "; import it with --images so the manifest points to its image files"))
    rows = df[has]
    if max_images and len(rows) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_images, replace=False))
        rows = rows.iloc[keep]
    return rows.reset_index(drop=True), int(has.sum())


def _constancy(name: str):
    """A numpy H×W×3 uint8 → uint8 colour-constancy function, or None for "none"."""
    if name not in COLOR_CONSTANCY:
        raise ShiftError(f"unknown colour constancy {name!r}; use one of {', '.join(COLOR_CONSTANCY)}")
    cls = COLOR_CONSTANCY[name]
    if cls is None:
        return None
    import torch

    op = cls()
    return lambda a: op(torch.from_numpy(np.array(a)).permute(2, 0, 1)).permute(1, 2, 0).numpy()


@contextmanager
def _single_thread_torch():
    """One torch thread while transforming single images: on a busy machine, intra-op threads for a 224 px
    image cost ~40× more than they save (measured 80 ms vs 2 ms per image on 2 shared cores). Restored after."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _thumb(arr: np.ndarray, px: int = 96) -> str:
    from PIL import Image

    im = Image.fromarray(arr)
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def read_statistics(paths, color_constancy: str = "none", description: str = "reading images",
                    n_thumbnails: int = THUMBNAILS):
    """Statistics of each readable image → (stats frame, geometry frame, readable mask, failures, thumbnails).

    An unreadable file is skipped and listed (the safe decoder names the reason), never silently zero-filled."""
    cc = _constancy(color_constancy)
    stats, geo, ok, failures, thumbs = [], [], [], [], []
    with _single_thread_torch(), make_progress() as prog:
        task = prog.add_task(description, total=len(paths), info="")
        for p in paths:
            try:
                img = read_image(p)
            except ImageError as e:
                ok.append(False)
                failures.append(str(e))
            else:
                arr = S.prepare(img)
                if cc is not None:
                    arr = cc(arr)
                stats.append(S.image_statistics(arr))
                geo.append(S.geometry(img))
                ok.append(True)
                if len(thumbs) < n_thumbnails:
                    thumbs.append(_thumb(arr))
            prog.advance(task)
    return (pd.DataFrame(stats, columns=list(S.STATISTICS)), pd.DataFrame(geo, columns=list(S.GEOMETRY)),
            np.array(ok, bool), failures, thumbs)


# ---------------------------------------------------------------------------- the domain classifier
def _classifier(kind: str, n_features: int, n_train: int, seed: int):
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "gbm":
        return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1, max_leaf_nodes=15,
                                              early_stopping=False, random_state=seed)
    if kind != "logistic":
        raise ShiftError(f"unknown classifier {kind!r}; use one of {', '.join(CLASSIFIERS)}")
    steps = [StandardScaler()]
    n_comp = min(64, n_features, n_train - 1)
    if n_features > 64 and n_comp >= 2:  # embeddings: a few hundred dims on a few thousand images would overfit
        steps.append(PCA(n_components=n_comp, random_state=seed))
    return make_pipeline(*steps, LogisticRegression(C=1.0, max_iter=5000))


def shift_level(auc: float, ci_low: float | None) -> str:
    """A word for the AUC: the CI covering 0.5 means no shift could be detected with this many images."""
    if not np.isfinite(auc) or (ci_low is not None and ci_low <= 0.5):
        return "none detected"
    return "slight" if auc < 0.6 else "moderate" if auc < 0.75 else "strong"


def bootstrap_auc(score0: np.ndarray, score1: np.ndarray, n: int, seed: int = 0, chunk: int = 100) -> np.ndarray:
    """ROC AUCs of `n` stratified bootstrap resamples (each side resampled with replacement, sizes kept).

    AUC = P(score1 > score0) + ½ P(tie), computed from average ranks (Mann–Whitney) for a whole chunk of
    resamples at once — sklearn's roc_auc_score costs ~5 ms a call in validation alone."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    n0, n1 = len(score0), len(score1)
    out = []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        s = np.concatenate([score0[rng.integers(0, n0, (b, n0))], score1[rng.integers(0, n1, (b, n1))]], axis=1)
        r1 = rankdata(s, axis=1)[:, n0:].sum(1)
        out.append((r1 - n1 * (n1 + 1) / 2) / (n0 * n1))
    return np.concatenate(out) if out else np.zeros(0)


def domain_auc(X: np.ndarray, side: np.ndarray, *, classifier: str = "logistic", folds: int = 5, seed: int = 0,
               n_bootstrap: int = 1000) -> dict:
    """Out-of-fold ROC AUC of telling side 1 (other) from side 0 (reference), with a stratified bootstrap 95% CI."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    X, side = np.asarray(X, float), np.asarray(side, int)
    counts = np.bincount(side, minlength=2)
    if counts.min() < MIN_IMAGES:
        raise ShiftError(f"the shift check needs at least {MIN_IMAGES} readable images on each side "
                         f"(reference {counts[0]}, other {counts[1]})")
    X = np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
    k = int(min(folds, counts.min()))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    model = _classifier(classifier, X.shape[1], int(len(X) * (k - 1) / k), seed)
    oof = cross_val_predict(model, X, side, cv=cv, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(side, oof))
    boot = bootstrap_auc(oof[side == 0], oof[side == 1], n_bootstrap, seed)
    ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if len(boot) else [None, None]
    return {"auc": auc, "ci": ci, "level": shift_level(auc, ci[0]), "n_reference": int(counts[0]),
            "n_other": int(counts[1]), "n_features": int(X.shape[1]), "classifier": classifier, "folds": k,
            "n_bootstrap": int(n_bootstrap)}


def mean_differences(ref: pd.DataFrame, other: pd.DataFrame) -> list[dict]:
    """Per statistic: each set's mean and the standardised mean difference (other − reference over the pooled
    SD), sorted by |SMD|, largest first. |SMD| > 0.1 is the usual "imbalanced" mark, > 0.5 a large shift."""
    out = []
    for c in ref.columns:
        a, b = ref[c].to_numpy(float), other[c].to_numpy(float)
        sd = float(np.sqrt((np.nanvar(a, ddof=1) + np.nanvar(b, ddof=1)) / 2)) if min(len(a), len(b)) > 1 else 0.0
        diff = float(np.nanmean(b) - np.nanmean(a))
        smd = diff / sd if sd > 0 else (0.0 if diff == 0 else float("nan"))
        out.append({"statistic": c, "description": S.describe(c), "reference_mean": float(np.nanmean(a)),
                    "other_mean": float(np.nanmean(b)), "reference_sd": float(np.nanstd(a)),
                    "other_sd": float(np.nanstd(b)), "smd": smd})
    return sorted(out, key=lambda r: -abs(r["smd"]) if np.isfinite(r["smd"]) else 0.0)


# ---------------------------------------------------------------------------- entry point
def check_shift(reference: pd.DataFrame, other: pd.DataFrame, config: ShiftConfig | None = None) -> ShiftResult:
    """Run the whole check on two manifests → ShiftResult (summary for shift.json, thumbnails for the HTML)."""
    cfg = config or ShiftConfig()
    if cfg.max_images is not None and cfg.max_images < MIN_IMAGES:
        raise ShiftError(f"--max-images must be at least {MIN_IMAGES}, got {cfg.max_images}")
    _classifier(cfg.classifier, 1, 2, cfg.seed)  # validate names before minutes of image reading
    _constancy(cfg.color_constancy)
    if cfg.bundle is not None and cfg.embed is None:  # the embeddings are a function of the caller's (no upward import)
        raise ShiftError("ShiftConfig.bundle only names the embedding model: also pass "
                         "embed=dermfusion.inference.embeddings.bundle_embedder(bundle)")
    sides, stats, geo, thumbs = {}, {}, {}, {}
    for key, df, name in (("reference", reference, cfg.names[0]), ("other", other, cfg.names[1])):
        rows, n_with = sample_rows(normalise(df), cfg.modality, cfg.max_images, cfg.seed, name)
        col = IMAGE_COLUMNS[cfg.modality]
        st, ge, ok, failures, th = read_statistics(list(rows[col]), cfg.color_constancy, f"reading {key} images")
        rows = rows[ok].reset_index(drop=True)
        sides[key] = {"name": name, "n_rows": int(len(df)), "n_with_image": n_with, "n_sampled": int(len(ok)),
                      "n_used": int(ok.sum()), "n_unreadable": len(failures), "unreadable_examples": failures[:5],
                      "rows": rows}
        stats[key], geo[key], thumbs[key] = st, ge, th
    side = np.r_[np.zeros(len(stats["reference"]), int), np.ones(len(stats["other"]), int)]
    feature_sets = {"image_statistics": domain_auc(
        pd.concat([stats["reference"], stats["other"]]).to_numpy(float), side, classifier=cfg.classifier,
        folds=cfg.folds, seed=cfg.seed, n_bootstrap=cfg.n_bootstrap)}
    if cfg.embed is not None:
        emb = [cfg.embed(sides[k]["rows"], cfg.modality, f"embedding {k} images") for k in ("reference", "other")]
        feature_sets["embeddings"] = {**domain_auc(np.concatenate(emb), side, classifier=cfg.classifier,
                                                   folds=cfg.folds, seed=cfg.seed, n_bootstrap=cfg.n_bootstrap),
                                      "bundle": str(cfg.bundle or "embedding model"), "dim": int(emb[0].shape[1])}
    diffs = mean_differences(stats["reference"], stats["other"])
    summary = {
        "reference": {k: v for k, v in sides["reference"].items() if k != "rows"},
        "other": {k: v for k, v in sides["other"].items() if k != "rows"},
        "modality": cfg.modality, "color_constancy": cfg.color_constancy, "max_images": cfg.max_images,
        "seed": cfg.seed, "classifier": cfg.classifier,
        "feature_sets": feature_sets, "top_differences": diffs[:cfg.top_k], "all_differences": diffs,
        "geometry": mean_differences(geo["reference"], geo["other"]),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "version": __version__,
    }
    return ShiftResult(summary=summary, thumbnails=thumbs)
