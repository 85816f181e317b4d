"""A DataLoader whose worker processes hand batches over cheaply.

PyTorch moves every tensor a worker returns into its own shared-memory segment and passes its file
descriptor to the main process: ~0.5 ms per tensor, and a Batch holds about ten (images, presence masks,
concepts, metadata, targets). On a tiny CPU model that was ~5 ms of every step's wait. ``BatchLoader``
sends the small ones (under ``SMALL_BYTES``) as numpy arrays pickled through the worker's pipe instead
(~1 ms per batch in all) and turns them back into tensors, without copying, in the main process; image
batches above the limit keep the shared-memory path, which costs the same at any size.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader

SMALL_BYTES = 1 << 20


def _pack(value):
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and \
            value.numel() * value.element_size() < SMALL_BYTES:
        return value.numpy()
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    return value


def unpack(value):
    """The inverse of the worker-side packing: numpy arrays back to tensors (sharing their memory)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: unpack(v) for k, v in value.items()}
    return value


def _packed_collate(collate_fn, items):
    return _pack(collate_fn(items))


class _Unpacking:
    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        return unpack(next(self._it))

    def __len__(self):
        return len(self._it)

    def __getattr__(self, name):  # the underlying iterator's workers, state, …
        return getattr(self._it, name)


class BatchLoader(DataLoader):
    """``torch.utils.data.DataLoader`` with the cheap hand-over above when ``num_workers > 0``; batches
    come out exactly as ``collate_fn`` made them."""

    def __init__(self, dataset, *args, collate_fn=None, num_workers: int = 0, **kwargs):
        self.packed = num_workers > 0 and collate_fn is not None
        if self.packed:
            collate_fn = functools.partial(_packed_collate, collate_fn)
        super().__init__(dataset, *args, collate_fn=collate_fn, num_workers=num_workers, **kwargs)

    def __iter__(self):
        it = super().__iter__()
        return _Unpacking(it) if self.packed else it
