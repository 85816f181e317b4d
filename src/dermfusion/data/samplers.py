"""Samplers for multi-process (torchrun / DistributedDataParallel) training and evaluation.

``DistributedWeightedSampler`` — every rank draws the *same* weighted epoch (a generator seeded by
``seed + epoch``, identical on all ranks), pads it to a multiple of the world size and keeps
``indices[rank::world_size]``. The ranks' shares are disjoint slices of one global draw, so rank r's
k-th per-rank batch of size ``B / world`` together with the other ranks' k-th batches is exactly the
k-th global batch of size ``B`` of a single-process run with the same seed (with ``world_size = 1``
the sampler yields what ``torch.utils.data.WeightedRandomSampler`` yields for the same generator seed).

``ShardedEvalSampler`` — contiguous, *non-padded* shards for evaluation and prediction: every index
belongs to exactly one rank, so gathering the shards in rank order gives each lesion exactly once.

``EpochBatchSampler`` — the batches of many epochs, as ``(epoch, index)`` keys, in one stream: one training
loader iterator (and its worker processes) serves a whole fold.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items (sizes differ by at most one; none padded)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


class DistributedWeightedSampler(Sampler[int]):
    def __init__(self, weights: Sequence[float] | np.ndarray | torch.Tensor, num_samples: int | None = None, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, replacement: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.double)
        self.num_samples = int(num_samples or len(self.weights))
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.replacement = int(seed), int(epoch), replacement
        self.num_per_rank = math.ceil(self.num_samples / world_size)
        self.total_size = self.num_per_rank * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_indices(self) -> list[int]:
        """The whole epoch's draw (identical on every rank), padded by wrapping to a multiple of the world size."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples, self.replacement, generator=g).tolist()
        pad = self.total_size - len(idx)
        while pad > 0:
            idx += idx[:pad]
            pad = self.total_size - len(idx)
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank:self.total_size:self.world_size])

    def __len__(self) -> int:
        return self.num_per_rank


class ShardedEvalSampler(Sampler[int]):
    """Rank's contiguous, non-padded share of range(n), in order."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = int(n), rank, world_size
        self.start, self.stop = shard_bounds(self.n, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """The batches of several training epochs in one stream: epoch ``e``'s draw comes from
    ``make_sampler(e)`` and is cut into ``steps_per_epoch`` batches of ``batch_size`` ``(epoch, index)`` keys
    (a draw shorter than one batch gives one short batch; leftovers are dropped), then epoch ``e + 1`` follows.

    One loader iterator then serves a whole fold: its worker processes are forked once and decode the next
    epoch's first batches while the current epoch's last steps compute (a loader per epoch waits for both at
    every epoch start). ``LesionDataset`` reads the epoch from the key: that epoch's input size and
    augmentation seeds.
    """

    def __init__(self, make_sampler, batch_size: int, steps_per_epoch: int, epochs: range):
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError("batch_size and steps_per_epoch must be positive")
        self.make_sampler, self.batch_size, self.steps = make_sampler, int(batch_size), int(steps_per_epoch)
        self.epochs = epochs

    def epoch_batches(self, epoch: int) -> Iterator[list[tuple[int, int]]]:
        batch, n = [], 0
        for i in self.make_sampler(epoch):
            batch.append((epoch, int(i)))
            if len(batch) == self.batch_size:
                yield batch
                batch, n = [], n + 1
                if n == self.steps:
                    return
        if batch and n == 0:
            yield batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in self.epochs:
            yield from self.epoch_batches(epoch)

    def __len__(self) -> int:
        return self.steps * len(self.epochs)
