"""Reproducible, resumable sample order and augmentation.

The sampler yields *keys* `epoch * N + index`; the dataset wrapper seeds its random generators
from (seed, key) before building each sample. So the images of iteration t and their random
augmentations depend only on (seed, t, rank, world size): not on the number of data-loader
workers, and not on whether the run was interrupted and resumed at some iteration k.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
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

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
    ) -> None:
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_iter = start_iter
        self.iters_per_epoch = num_samples // (batch_size * world_size)
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples are fewer than one global batch of "
                f"{batch_size * world_size}"
            )

    def __iter__(self) -> Iterator[int]:
        epoch, it = divmod(self.start_iter, self.iters_per_epoch)
        global_batch = self.batch_size * self.world_size
        while True:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=gen)
            for t in range(it, self.iters_per_epoch):
                start = t * global_batch + self.rank * self.batch_size
                for index in perm[start : start + self.batch_size].tolist():
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


class PairedResumableSampler(Sampler[int]):
    """Endless sample keys for one rank in anchor/partner pairs that share a class (MCIS).

    Each per-rank batch is [a_0, p_0, a_1, p_1, ...]: `batch_size // 2` anchors, each followed by
    its partner. Anchors follow the ResumableSampler scheme over anchor slots: global batch t of an
    epoch takes permutation[t*G:(t+1)*G] (G = pairs per rank x world size, permutation seeded with
    `seed + epoch`), rank r the r-th slice. Each anchor's partner is drawn per epoch from
    (seed, epoch) alone: with policy 'share_one', a uniformly random class of the anchor, then a
    uniformly random other image with that class (the anchor itself only if it is the class's
    sole image); with 'random' (or an anchor without classes), any other image.

    Keys keep `key % N == index` (what SeededSamples needs) and are distinct per (epoch, anchor,
    role), so partners get their own augmentation: anchor 2 (epoch N + a) N + a, partner
    (2 (epoch N + a) + 1) N + p. Batches depend only on (seed, iteration, rank, world size): the
    sampler resumes exactly at `start_iter`.

    Args:
        labels: (N, C-1) image-level labels of the training set (0/1).
        batch_size: per-rank batch size (even).
        seed, rank, world_size, start_iter: as for ResumableSampler.
        policy: 'share_one' or 'random'.
    """

    def __init__(
        self,
        labels,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        policy: str = "share_one",
    ) -> None:
        if batch_size % 2:
            raise ValueError(f"paired batches need an even per-rank batch size, got {batch_size}")
        if policy not in ("share_one", "random"):
            raise ValueError(f"unknown pair policy {policy!r}")
        self.labels = np.asarray(labels) > 0
        self.n = self.labels.shape[0]
        if self.n < 2:
            raise ValueError("pairing needs at least 2 training images")
        self.pairs = batch_size // 2
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.world_size, self.start_iter, self.policy = world_size, start_iter, policy
        self.iters_per_epoch = self.n // (self.pairs * world_size)
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"{self.n} samples are fewer than one global batch of "
                f"{self.pairs * world_size} anchors"
            )
        # Class -> member lists as one CSR table, members sorted by image index within a class.
        img, cls = np.nonzero(self.labels)
        order = np.argsort(cls, kind="stable")
        self._members = img[order]
        self._member_keys = cls[order].astype(np.int64) * self.n + self._members
        counts = np.bincount(cls, minlength=self.labels.shape[1])
        self._counts, self._offsets = counts, np.cumsum(counts) - counts

    def partners(self, epoch: int) -> np.ndarray:
        """(N,) partner of every anchor index for `epoch`."""
        n = self.n
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x4D43])
        anchors = np.arange(n)
        other = rng.integers(0, n - 1, size=n)
        partner = other + (other >= anchors)  # uniform over the other images
        u = rng.random(self.labels.shape)
        v = rng.random(n)
        has = self.labels.any(axis=1)
        if self.policy == "random" or not has.any():
            return partner
        cls = np.where(self.labels, u, -1.0).argmax(axis=1)  # a random class of each anchor
        count, offset = self._counts[cls], self._offsets[cls]
        pos_self = np.searchsorted(self._member_keys, cls.astype(np.int64) * n + anchors) - offset
        j = np.minimum((v * np.maximum(count - 1, 1)).astype(np.int64), np.maximum(count - 2, 0))
        j = np.where(count >= 2, j + (j >= pos_self), 0)  # skip the anchor itself
        shared = self._members[np.clip(offset + j, 0, len(self._members) - 1)]
        return np.where(has, shared, partner)

    def __iter__(self) -> Iterator[int]:
        epoch, it = divmod(self.start_iter, self.iters_per_epoch)
        per_global = self.pairs * self.world_size
        n = self.n
        while True:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=gen)
            partner = self.partners(epoch)
            for t in range(it, self.iters_per_epoch):
                start = t * per_global + self.rank * self.pairs
                for a in perm[start : start + self.pairs].tolist():
                    block = 2 * (epoch * n + a)
                    yield block * n + a
                    yield (block + 1) * n + int(partner[a])
            epoch, it = epoch + 1, 0


def dataset_labels(dataset) -> np.ndarray:
    """(N, C-1) image labels of a training dataset in index order (its `names` and `labels`)."""
    names, labels = getattr(dataset, "names", None), getattr(dataset, "labels", None)
    if names is None or labels is None:
        raise TypeError(f"{type(dataset).__name__} has no names/labels for class-aware pairing")
    return np.stack([np.asarray(labels[n]) for n in names])
