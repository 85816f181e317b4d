"""LesionDataset: manifest rows -> Batch dicts (see docs/CONTRACTS.md), with presence masks for
every missing input, and a class-balanced sampler."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from ..tasks import TaskSpec
from .features import FeatureSpec
from .images import DecodeCache, load_rgb_array
from .manifest import IMAGE_COLUMNS
from .transforms import Preprocess, eval_transform, train_transform


class LesionDataset(Dataset):
    def __init__(self, df: pd.DataFrame, task: TaskSpec, spec: FeatureSpec, preprocess: dict[str, Preprocess],
                 train: bool = False, cache_dir: str | None = None, aug_strength: float = 1.0,
                 with_targets: bool | None = None):
        self.df = df.reset_index(drop=True)
        self.task, self.spec, self.train = task, spec, train
        self.preprocess = preprocess
        self.lesion_ids = self.df["lesion_id"].astype(str).tolist()
        self.paths = {m: self.df[IMAGE_COLUMNS[m]].astype(str).tolist() for m in spec.modalities}
        self.numeric, self.numeric_present = spec.encode_numeric(self.df)
        self.categorical = spec.encode_categorical(self.df)
        self.concepts, self.concepts_present = spec.encode_concepts(self.df)
        cols = task.label_columns()
        if with_targets is None:
            with_targets = all(c in self.df.columns for c in cols) and self.df[cols].notna().all(axis=None)
        self.targets = np.array(self.df[cols].to_numpy(np.float32)) if with_targets else None  # writable copy
        self.transforms = {m: (train_transform(m, preprocess[m], aug_strength) if train else eval_transform(preprocess[m]))
                           for m in spec.modalities}
        # cache at a little above the input size so random crops still have detail
        self.caches = {}
        if cache_dir:
            for m in spec.modalities:
                size = int(round(preprocess[m].size * (1.15 if train else 1.0)))
                self.caches[m] = DecodeCache(cache_dir, size)
                self.caches[m].prime(self.paths[m])

    def __len__(self) -> int:
        return len(self.df)

    def load_image(self, modality: str, i: int) -> torch.Tensor | None:
        path = self.paths[modality][i]
        if not path:
            return None
        pre = self.preprocess[modality]
        arr = load_rgb_array(path, self.caches.get(modality), size=None if modality in self.caches else
                             int(round(pre.size * (1.15 if self.train else 1.0))))
        arr = arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)
        return torch.from_numpy(arr).permute(2, 0, 1)

    def __getitem__(self, i: int) -> dict:
        images, present = {}, []
        for m in self.spec.modalities:
            img = self.load_image(m, i)
            size = self.preprocess[m].size
            if img is None:
                images[m] = torch.zeros(3, size, size)
                present.append(False)
            else:
                images[m] = self.transforms[m](img)
                present.append(True)
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
        return item


def collate(items: list[dict]) -> dict:
    out = {"images": {m: torch.stack([it["images"][m] for it in items]) for m in items[0]["images"]},
           "lesion_id": [it["lesion_id"] for it in items]}
    for k in items[0]:
        if k not in out:
            out[k] = torch.stack([it[k] for it in items])
    return out


def class_balanced_weights(targets: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-sample weights ∝ count(class)^-power: 1 = fully balanced, 0.5 = square-root, 0 = natural."""
    y = targets.argmax(axis=1)
    counts = np.bincount(y, minlength=targets.shape[1]).astype(float)
    w = np.where(counts[y] > 0, counts[y], 1.0) ** (-power)
    return w / w.sum()


def class_balanced_sampler(targets: np.ndarray, power: float = 0.5, num_samples: int | None = None,
                           seed: int = 0, *, rank: int = 0, world_size: int = 1):
    """Weighted sampling with replacement, ``num_samples`` (default: one per lesion) per epoch.

    Single process: a ``WeightedRandomSampler`` with a generator seeded by ``seed``. Under torchrun
    (``world_size > 1``): a ``DistributedWeightedSampler`` — every rank draws the same epoch from the same
    seed and keeps ``indices[rank::world_size]`` (see ``data.samplers``), so the ranks' shares of one
    global batch are those of the single-process batch.
    """
    w = torch.as_tensor(class_balanced_weights(targets, power), dtype=torch.double)
    if world_size > 1:
        from .samplers import DistributedWeightedSampler

        return DistributedWeightedSampler(w, num_samples or len(targets), rank=rank, world_size=world_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(w, num_samples or len(targets), replacement=True, generator=g)


def batch_from_inputs(images: dict, metadata: dict, spec: FeatureSpec, preprocess: dict[str, Preprocess]) -> dict:
    """A one-lesion Batch from in-memory inputs (the API path): `images` maps modality -> PIL RGB image
    (absent modalities are simply not in the dict), `metadata` holds manifest-style fields
    (age, sex, skin_tone, site, concept_<modality>_<name> …; missing keys = unknown)."""
    row = {"age": float("nan"), "sex": "", "skin_tone": "", "site": "", **{k: v for k, v in metadata.items() if v is not None}}
    frame = pd.DataFrame([row])
    for c in spec.concepts:
        if c not in frame.columns:
            frame[c] = float("nan")
    numeric, numeric_present = spec.encode_numeric(frame)
    concepts, concepts_present = spec.encode_concepts(frame)
    tensors, present = {}, []
    for m in spec.modalities:
        pre = preprocess[m]
        img = images.get(m)
        if img is None:
            tensors[m] = torch.zeros(1, 3, pre.size, pre.size)
            present.append(False)
        else:
            t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
            tensors[m] = eval_transform(pre)(t).unsqueeze(0)
            present.append(True)
    return {"images": tensors, "image_present": torch.tensor([present]),
            "concepts": torch.from_numpy(concepts), "concepts_present": torch.from_numpy(concepts_present),
            "numeric": torch.from_numpy(numeric), "numeric_present": torch.from_numpy(numeric_present),
            "categorical": torch.from_numpy(spec.encode_categorical(frame)), "lesion_id": ["request"]}
