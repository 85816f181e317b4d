"""How unlike the training lesions an image is, inside the network: the "cannot assess" gate's familiarity check.

The image checks (colour, exposure, blur, skin hue) and the confidence check cannot tell a skin-coloured
photograph of something else — a cat, a cup of coffee, a stained tissue slide — from a lesion, and the network is
often confident about such photos. Nor can the network's final features: fine-tuned on lesions, it maps them
among the lesions (BENCHMARKS.md). Its intermediate layers can: per probed layer (``models.layer_stats``) the
channel means and standard deviations of an image are standardised, projected on the layer's first `DIM`
principal components of the reference lesions, whitened, and their Euclidean length taken (a Mahalanobis
distance in that subspace, after Lee et al., NeurIPS 2018). Each layer's distance is divided by its median over
the reference lesions, and the *unfamiliarity score* is the mean over layers: ~1 for a typical lesion.

The reference (``embedding_reference.npz`` in the bundle, covered by its hash: it changes answers) holds each
layer's projection and the quantiles of the reference lesions' own scores, *cross-fitted* (each half scored by
the projection fitted on the other half, so they are out-of-sample like a new lesion's). The cut is the largest
cross-fitted score times a margin (`score_threshold`; service setting ``quality.familiarity_margin``). Which
lesions: a fold bundle's validation lesions (end of ``dermfusion train``), a full-data bundle's training lesions,
or any manifest via ``dermfusion bundle reference``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

REFERENCE_FILE = "embedding_reference.npz"
FORMAT = 1
DIM = 32
MAX_ROWS = 2000
MIN_ROWS = 40
LEVELS = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


class EmbeddingReferenceError(ValueError):
    """Reference statistics that cannot be used (too few lesions, not finite, wrong width)."""


def _fit_layer(x: np.ndarray, dim: int) -> dict:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    _, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    d = int(min(dim, len(s) - 1, x.shape[1]))
    scale = s[:d] / np.sqrt(max(len(x) - 1, 1))
    return {"mu": mu, "sd": sd, "center": z.mean(0), "components": vt[:d], "scale": np.maximum(scale, 1e-6)}


def _layer_distance(layer: dict, x: np.ndarray) -> np.ndarray:
    z = (x - layer["mu"]) / layer["sd"] - layer["center"]
    return np.sqrt((((z @ layer["components"].T) / layer["scale"]) ** 2).sum(1))


def _split(x: np.ndarray, dims) -> list[np.ndarray]:
    if x.shape[1] != sum(dims):
        raise EmbeddingReferenceError(f"layer statistics have {x.shape[1]} columns, the reference expects "
                                      f"{sum(dims)} (layers {list(dims)}): another model's reference?")
    return np.split(x, np.cumsum(dims)[:-1], axis=1)


def _fit(x: np.ndarray, dims, dim: int) -> list[dict]:
    layers = [_fit_layer(part, dim) for part in _split(x, dims)]
    for layer, part in zip(layers, _split(x, dims)):
        layer["median"] = float(np.median(_layer_distance(layer, part)))
    return layers


def _score(layers: list[dict], x: np.ndarray, dims) -> np.ndarray:
    x = np.asarray(x, np.float64)
    parts = _split(x if x.ndim == 2 else x.reshape(1, -1), dims)
    return np.mean([_layer_distance(l, p) / max(l["median"], 1e-9) for l, p in zip(layers, parts)], axis=0)


def fit_reference(stats, dims, *, layer_names=(), dim: int = DIM, max_rows: int = MAX_ROWS, seed: int = 0,
                  source: str = "") -> dict:
    """The reference of ``stats`` (N×S layer statistics of N lesions, layers of widths ``dims``)."""
    x = np.asarray(stats, dtype=np.float64)
    if x.ndim != 2 or len(x) < MIN_ROWS:
        raise EmbeddingReferenceError(f"a familiarity reference needs at least {MIN_ROWS} lesions, got {len(x)}")
    if not np.isfinite(x).all():
        raise EmbeddingReferenceError("reference layer statistics contain NaN or infinity")
    rng = np.random.default_rng(seed)
    if len(x) > max_rows:
        x = x[np.sort(rng.choice(len(x), max_rows, replace=False))]
    half = rng.permutation(len(x)) < len(x) // 2
    crossed = np.empty(len(x))
    for part in (half, ~half):  # each half scored by the projection fitted on the other half
        crossed[part] = _score(_fit(x[~part], dims, dim), x[part], dims)
    return {"format": FORMAT, "dims": list(map(int, dims)), "layer_names": list(layer_names), "dim": dim,
            "layers": _fit(x, dims, dim), "levels": np.asarray(LEVELS), "quantiles": np.quantile(crossed, LEVELS),
            "n": int(len(x)), "source": source}


def unfamiliarity(reference: dict, stats) -> np.ndarray:
    """Each row's unfamiliarity score (≈ 1 for a typical reference lesion; larger = less like them)."""
    x = np.asarray(stats, dtype=np.float64)
    return _score(reference["layers"], x, reference["dims"])


def score_threshold(reference: dict, margin: float = 1.0, level: float = 1.0) -> float:
    """The cut: ``margin`` × the cross-fitted reference score at quantile ``level`` (1.0: the largest)."""
    return float(margin * np.interp(level, reference["levels"], reference["quantiles"]))


# ------------------------------------------------------------------------------------------------ storage
_LAYER_KEYS = ("mu", "sd", "center", "components", "scale")


def write_reference(bundle_dir: str | Path, reference: dict) -> Path:
    arrays = {"format": np.int64(reference["format"]), "dims": np.asarray(reference["dims"], np.int64),
              "dim": np.int64(reference["dim"]), "levels": reference["levels"], "quantiles": reference["quantiles"],
              "n": np.int64(reference["n"]), "source": np.str_(reference.get("source", "")),
              "modality": np.str_(reference.get("modality", "")),
              "layer_names": np.asarray(reference.get("layer_names") or [""] * len(reference["dims"]), dtype=str),
              "medians": np.asarray([l["median"] for l in reference["layers"]])}
    for i, layer in enumerate(reference["layers"]):
        arrays.update({f"layer{i}_{k}": np.asarray(layer[k], np.float32) for k in _LAYER_KEYS})
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(bundle_dir) / REFERENCE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def read_reference(bundle_dir: str | Path | None) -> dict | None:
    path = Path(bundle_dir) / REFERENCE_FILE if bundle_dir is not None else None
    if path is None or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if int(z["format"]) != FORMAT:
            raise EmbeddingReferenceError(f"{path}: format {int(z['format'])}, this version reads {FORMAT}")
        dims = [int(d) for d in z["dims"]]
        layers = [{**{k: z[f"layer{i}_{k}"].astype(np.float64) for k in _LAYER_KEYS}, "median": float(z["medians"][i])}
                  for i in range(len(dims))]
        return {"format": FORMAT, "dims": dims, "dim": int(z["dim"]), "layers": layers, "levels": z["levels"],
                "quantiles": z["quantiles"], "n": int(z["n"]), "source": str(z["source"]), "modality": str(z["modality"]),
                "layer_names": [str(s) for s in z["layer_names"]]}
