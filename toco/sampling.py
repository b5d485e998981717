"""Reproducible, resumable sample order and augmentation.

The sampler yields *keys* `epoch * N + index`; the dataset wrapper seeds its random generators
from (seed, key) before building each sample. So the images of iteration t and their random
augmentations depend only on (seed, t, rank, world size): not on the number of data-loader
workers, and not on whether the run was interrupted and resumed at some iteration k.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Endless sample keys for one rank, shuffled per epoch with `seed + epoch`.

    Global batch t of an epoch is permutation[t*G:(t+1)*G] with G = batch_size * world_size
    (the remainder of each epoch is dropped); rank r takes the r-th slice of batch_size.

    Args:
        num_samples: dataset length N.
        batch_size: per-rank batch size.
        seed: base seed.
        rank, world_size: this process's place in the data-parallel group.
        start_iter: the first iteration to produce (for resuming).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_iter: int = 0) -> None:
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_iter = start_iter
        self.iters_per_epoch = num_samples // (batch_size * world_size)
        if self.iters_per_epoch == 0:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of "
                             f"{batch_size * world_size}")

    def __iter__(self) -> Iterator[int]:
        epoch, it = divmod(self.start_iter, self.iters_per_epoch)
        global_batch = self.batch_size * self.world_size
        while True:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=gen)
            for t in range(it, self.iters_per_epoch):
                start = t * global_batch + self.rank * self.batch_size
                for index in perm[start:start + self.batch_size].tolist():
                    yield epoch * self.n + index
            epoch, it = epoch + 1, 0


class SeededSamples(Dataset):
    """Wraps a dataset so that sample `key` is built with RNGs seeded from (seed, key).

    The global `random` and torch CPU generators are seeded for the duration of the call and
    restored afterwards, so using it in the main process (num_workers=0) leaves them untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int):
        index = key % len(self)
        sample_seed = (self.seed * 1_000_003 + key) % (2**63 - 1)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
