"""LesionDataset: manifest rows -> Batch dicts (see docs/CONTRACTS.md), with presence masks for
every missing input, and a class-balanced sampler."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from ..criteria import criteria_column, get_criteria
from ..tasks import TaskSpec
from .features import FeatureSpec
from .images import DecodeCache, load_rgb_array, resize_short_side
from .manifest import IMAGE_COLUMNS, ManifestError
from .samplers import DistributedWeightedSampler
from .transforms import Preprocess, eval_transform, train_transform


class LesionDataset(Dataset):
    """Manifest rows -> Batch items. Indexed by position ``i``, or — for a training loader that streams many
    epochs through one set of worker processes — by ``(epoch, i)`` keys from
    :class:`~dermfusion.data.samplers.EpochBatchSampler`: the item then takes that epoch's input size from ``epoch_sizes`` (progressive resizing; the last size
    repeats) and, with ``seed`` set, draws its augmentation from a generator seeded by (seed, epoch, i), so a
    lesion's augmented view does not depend on the number of loader workers, on which worker loads it, or on
    whether training was resumed."""

    def __init__(self, df: pd.DataFrame, task: TaskSpec, spec: FeatureSpec, preprocess: dict[str, Preprocess],
                 train: bool = False, cache_dir: str | None = None, aug_strength: float = 1.0,
                 with_targets: bool | None = None, epoch_sizes: Sequence[int] | None = None,
                 seed: int | None = None):
        self.df = df.reset_index(drop=True)
        self.task, self.spec, self.train = task, spec, train
        self.preprocess = preprocess
        self.seed = seed
        self.epoch_sizes = [int(x) for x in epoch_sizes] if epoch_sizes else []
        self.lesion_ids = self.df["lesion_id"].astype(str).tolist()
        # an image column holds file paths, or — for in-memory rows (the clinical engine's stacks) — PIL images
        self.paths = {m: [v if isinstance(v, Image.Image) else ("" if v is None else str(v))
                          for v in self.df[IMAGE_COLUMNS[m]].tolist()] for m in spec.modalities}
        self.numeric, self.numeric_present = spec.encode_numeric(self.df)
        self.categorical = spec.encode_categorical(self.df)
        self.concepts, self.concepts_present = spec.encode_concepts(self.df)
        cols = task.label_columns()
        if with_targets is None:
            with_targets = all(c in self.df.columns for c in cols) and self.df[cols].notna().all(axis=None)
        self.targets = np.array(self.df[cols].to_numpy(np.float32)) if with_targets else None  # writable copy
        self.criteria = criteria_targets(self.df, task)  # multi-task targets (Derm7pt's 7-point criteria) or None
        self.aug_strength = aug_strength
        # one preprocessing (transforms + decode caches) per input size of the schedule, all built here, in the
        # parent process, so worker processes inherit primed caches instead of hashing every JPEG again
        self.cache_dir = cache_dir
        self._by_size: dict[int | None, tuple[dict[str, Preprocess], dict, dict]] = {}
        for size in (self.epoch_sizes or [None]):
            self._setup(size)

    def _setup(self, size: int | None) -> tuple[dict[str, Preprocess], dict, dict]:
        """(preprocessing, transforms, decode caches) at input ``size`` (None: the preprocessing's own)."""
        if size not in self._by_size:
            pre = self.preprocess if size is None else {m: dataclasses.replace(p, size=size)
                                                        for m, p in self.preprocess.items()}
            self._by_size[size] = (pre, self._transforms(pre), self._caches(pre, self.cache_dir))
        return self._by_size[size]

    @property
    def transforms(self) -> dict:
        return self._setup(None)[1]

    @property
    def caches(self) -> dict:
        return self._setup(None)[2]

    def _transforms(self, pre: dict[str, Preprocess]) -> dict:
        return {m: (train_transform(m, pre[m], self.aug_strength) if self.train else eval_transform(pre[m]))
                for m in self.spec.modalities}

    def _caches(self, pre: dict[str, Preprocess], cache_dir: str | None) -> dict:
        caches = {}
        if cache_dir:  # cache at a little above the input size so random crops still have detail
            for m in self.spec.modalities:
                caches[m] = DecodeCache(cache_dir, self._load_size(pre[m]), pre[m].interpolation)
                caches[m].prime(self.paths[m])
        return caches

    def _load_size(self, pre: Preprocess) -> int:
        """The short side images are decoded to: a little above the input size for training's random crops; for
        evaluation the resize before the centre crop (size / crop_pct)."""
        if self.train:
            return int(round(pre.size * 1.15))
        return pre.eval_resize

    def size_of_epoch(self, epoch: int) -> int | None:
        """The schedule's input size for ``epoch`` (None: the preprocessing's own)."""
        return scheduled_size(self.epoch_sizes, epoch)

    def __len__(self) -> int:
        return len(self.df)

    def load_image(self, modality: str, i: int) -> torch.Tensor | None:
        """Lesion ``i``'s decoded ``modality`` image (uint8 C×H×W, before transforms), or None when absent."""
        return self._load(modality, i, self.preprocess[modality], self.caches.get(modality))

    def _load(self, modality: str, i: int, pre: Preprocess, cache) -> torch.Tensor | None:
        path = self.paths[modality][i]
        if isinstance(path, Image.Image):  # in memory: resized as the decode cache resizes a file (never in training)
            return resized_uint8(path, self._load_size(pre), pre.interpolation)
        if not path or path == "nan":
            return None
        arr = load_rgb_array(path, cache, size=None if cache is not None else self._load_size(pre),
                             interpolation=pre.interpolation)
        arr = arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)
        return torch.from_numpy(arr).permute(2, 0, 1)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        pre, transforms, caches = self._setup(self.size_of_epoch(epoch) if epoch is not None else None)
        if epoch is not None and self.seed is not None:
            # the augmentation's own random stream; the caller's (dropout, the sampler) is left untouched
            with torch.random.fork_rng(devices=[]):
                # ints hash the same in every process; the CPU generator only — torch.manual_seed also queues
                # a lazy CUDA seeding with a formatted stack trace, 0.3–0.9 ms per item (benchmarks/item_seeding.py)
                torch.default_generator.manual_seed(hash((self.seed, epoch, i)))
                images, present = self._images(i, pre, transforms, caches)
        else:
            images, present = self._images(i, pre, transforms, caches)
        item = {
            "images": images,
            "image_present": torch.tensor(present, dtype=torch.bool),
            "concepts": torch.from_numpy(self.concepts[i]),
            "concepts_present": torch.from_numpy(self.concepts_present[i]),
            "numeric": torch.from_numpy(self.numeric[i]),
            "numeric_present": torch.from_numpy(self.numeric_present[i]),
            "categorical": torch.from_numpy(self.categorical[i]),
            "lesion_id": self.lesion_ids[i],
        }
        if self.targets is not None:
            item["target"] = torch.from_numpy(self.targets[i])
        if self.criteria is not None:
            item["criteria"] = torch.from_numpy(self.criteria[i])
        return item

    def _images(self, i: int, pre: dict, transforms: dict, caches: dict) -> tuple[dict, list[bool]]:
        images, present = {}, []
        for m in self.spec.modalities:
            img = self._load(m, i, pre[m], caches.get(m))
            if img is None:
                images[m] = torch.zeros(3, pre[m].size, pre[m].size)
                present.append(False)
            else:
                images[m] = transforms[m](img)
                present.append(True)
        return images, present


def criteria_targets(df: pd.DataFrame, task: TaskSpec) -> np.ndarray | None:
    """N×K grouped-label indices of the task's criteria (``aux_<criterion>`` columns; −1 = not annotated), or
    None when the task has no criteria set or the manifest carries none of its columns."""
    if not task.criteria:
        return None
    crit = get_criteria(task.criteria)
    if not any(criteria_column(c) in df.columns for c in crit):
        return None
    out = np.full((len(df), len(crit)), -1, np.int64)
    for j, c in enumerate(crit):
        if criteria_column(c) in df.columns:
            index = {label: k for k, label in enumerate(c.labels)}
            values = df[criteria_column(c)].fillna("").astype(str).str.strip().str.lower()
            out[:, j] = [index.get(v, -1) for v in values]
    return out


def scheduled_size(epoch_sizes, epoch: int) -> int | None:
    """Input size of training ``epoch`` under a progressive-resizing schedule (the last size repeats); None
    without a schedule."""
    return int(epoch_sizes[min(epoch, len(epoch_sizes) - 1)]) if epoch_sizes else None


def collate(items: list[dict]) -> dict:
    out = {"images": {m: torch.stack([it["images"][m] for it in items]) for m in items[0]["images"]},
           "lesion_id": [it["lesion_id"] for it in items]}
    for k in items[0]:
        if k not in out:
            out[k] = torch.stack([it[k] for it in items])
    return out


def class_balanced_weights(targets: np.ndarray, power: float = 0.5, within_class: np.ndarray | None = None
                           ) -> np.ndarray:
    """Per-sample weights ∝ count(class)^-power: 1 = fully balanced, 0.5 = square-root, 0 = natural.
    ``within_class`` (one factor per sample, e.g. ``hard_case_factors``) shifts weight between the lesions of one
    class; each class keeps its total, so the class mix drawn is the same with or without it."""
    y = targets.argmax(axis=1)
    counts = np.bincount(y, minlength=targets.shape[1]).astype(float)
    w = np.where(counts[y] > 0, counts[y], 1.0) ** (-power)
    if within_class is not None:
        f = np.asarray(within_class, dtype=float)
        per_class = np.bincount(y, weights=f, minlength=targets.shape[1])
        w = w * f * np.where(counts > 0, counts, 1.0)[y] / per_class[y]
    return w / w.sum()


def hard_case_factors(df: pd.DataFrame, hard_cases) -> np.ndarray | None:
    """Per-row sampling factors from ``train.hard_cases`` (column, level, factor): ``factor`` where the manifest's
    column equals the level, 1 elsewhere (missing values too); None when not configured."""
    if hard_cases is None:
        return None
    if hard_cases.column not in df.columns:
        raise ManifestError(f"train.hard_cases: the manifest has no column {hard_cases.column!r} "
                            f"(its columns: {', '.join(map(str, df.columns))})")
    col, level = df[hard_cases.column], hard_cases.level
    if isinstance(level, (int, float)) and not isinstance(level, bool):
        hit = pd.to_numeric(col, errors="coerce").eq(float(level)).to_numpy(bool)
    else:
        hit = col.astype("string").eq(str(level)).fillna(False).to_numpy(bool)
    if not hit.any():
        raise ManifestError(f"train.hard_cases: no training lesion has {hard_cases.column} = {hard_cases.level!r}")
    return np.where(hit, float(hard_cases.factor), 1.0)


def class_balanced_sampler(targets: np.ndarray, power: float = 0.5, num_samples: int | None = None,
                           seed: int = 0, *, rank: int = 0, world_size: int = 1, within_class: np.ndarray | None = None):
    """Weighted sampling with replacement, ``num_samples`` (default: one per lesion) per epoch
    (``class_balanced_weights``; ``within_class``: hard-case factors).

    Single process: a ``WeightedRandomSampler`` with a generator seeded by ``seed``. Under torchrun
    (``world_size > 1``): a ``DistributedWeightedSampler`` — every rank draws the same epoch from the same
    seed and keeps ``indices[rank::world_size]`` (see ``data.samplers``), so the ranks' shares of one
    global batch are those of the single-process batch.
    """
    w = torch.as_tensor(class_balanced_weights(targets, power, within_class), dtype=torch.double)
    if world_size > 1:
        return DistributedWeightedSampler(w, num_samples or len(targets), rank=rank, world_size=world_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(w, num_samples or len(targets), replacement=True, generator=g)


def image_tensor(img, pre: Preprocess) -> torch.Tensor:
    """A decoded RGB PIL image as the model's input (3×size×size float): the one evaluation path every prediction
    takes — the API's uploads, ``dermfusion predict``'s files, in-memory manifest rows. The image is resized exactly
    as the training's decode cache resizes a file for the out-of-fold pass (``resize_short_side`` to
    ``pre.eval_resize``, then the evaluation transform), so what is served is what the calibration, operating point
    and prediction sets were fitted on, pixel for pixel."""
    return eval_transform(pre)(resized_uint8(img, pre.eval_resize, pre.interpolation))


def resized_uint8(img, size: int, interpolation: str) -> torch.Tensor:
    """A PIL image resized as the decode cache resizes a file (short side to ``size``), as uint8 C×H×W."""
    arr = np.asarray(resize_short_side(img.convert("RGB"), size, interpolation), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def batch_from_lesions(images: Sequence[dict], metadata: Sequence[dict], spec: FeatureSpec,
                       preprocess: dict[str, Preprocess], lesion_ids: Sequence[str] | None = None) -> dict:
    """A Batch of N in-memory lesions: ``images[i]`` maps modality -> PIL RGB image (absent modalities are simply
    not in the dict), ``metadata[i]`` holds manifest-style fields (age, sex, skin_tone, site,
    concept_<modality>_<name> …; missing keys = unknown)."""
    n = len(images)
    if spec.numeric or spec.categorical or spec.concepts:
        frame = pd.DataFrame([{"age": float("nan"), "sex": "", "skin_tone": "", "site": "",
                               **{k: v for k, v in m.items() if v is not None}} for m in metadata])
        for c in spec.concepts:
            if c not in frame.columns:
                frame[c] = float("nan")
        numeric, numeric_present = spec.encode_numeric(frame)
        concepts, concepts_present = spec.encode_concepts(frame)
        categorical = spec.encode_categorical(frame)
    else:  # an image-only model: no DataFrame (~1 ms of a request's ~20)
        numeric = concepts = np.zeros((n, 0), np.float32)
        numeric_present = concepts_present = np.zeros((n, 0), bool)
        categorical = np.zeros((n, 0), np.int64)
    tensors, present = {}, []
    for m in spec.modalities:
        pre = preprocess[m]
        rows = []
        for imgs in images:
            img = imgs.get(m)
            rows.append(torch.zeros(3, pre.size, pre.size) if img is None else image_tensor(img, pre))
        tensors[m] = torch.stack(rows) if rows else torch.zeros(0, 3, pre.size, pre.size)
    present = [[imgs.get(m) is not None for m in spec.modalities] for imgs in images]
    return {"images": tensors, "image_present": torch.tensor(present, dtype=torch.bool).reshape(n, len(spec.modalities)),
            "concepts": torch.from_numpy(concepts), "concepts_present": torch.from_numpy(concepts_present),
            "numeric": torch.from_numpy(numeric), "numeric_present": torch.from_numpy(numeric_present),
            "categorical": torch.from_numpy(categorical),
            "lesion_id": list(lesion_ids) if lesion_ids is not None else ["request"] * n}


def batch_from_inputs(images: dict, metadata: dict, spec: FeatureSpec, preprocess: dict[str, Preprocess]) -> dict:
    """A one-lesion Batch from in-memory inputs (``batch_from_lesions`` of one)."""
    return batch_from_lesions([images], [metadata], spec, preprocess)
