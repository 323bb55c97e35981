"""The samples a task trains and evaluates on, and their order, each drawn from a seed derived from
its place in the run (`derive_seed`, never a random stream carried along), so a resumed run reads
exactly what an uninterrupted one does, whatever the number of workers or processes:

- `task_subsets`: one subset per task, its labels remapped to the scenario's class order;
- `EpochBatches`: an epoch's order, a permutation seeded by (seed, task, epoch), cut into global
  batches of which each rank takes an equal share;
- `SeededSamples`: each sample read with the CPU RNG seeded by its position in the epoch, so its
  random augmentation depends on that position only.
"""

from __future__ import annotations

import hashlib
import math
from typing import List

import torch
from torch.utils.data import Dataset, Sampler, default_collate

from .scenario import ClassIncrementalScenario


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes and Python versions
    (unlike hash() of a str)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RemappedSubset(Dataset):
    """`dataset[indices]` with each label replaced by its position in the scenario's class order."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, labels: torch.Tensor):
        self.dataset, self.indices, self.labels = dataset, indices.tolist(), labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x = self.dataset[self.indices[i]][0]
        return x, self.labels[i]


def task_subsets(scenario: ClassIncrementalScenario, dataset: Dataset, targets) -> List[RemappedSubset]:
    """One remapped subset per task of `dataset`, whose labels are `targets`."""
    remapped = scenario.remap(targets)
    subsets = []
    for task in range(scenario.num_tasks):
        indices = scenario.task_indices(targets, task)
        subsets.append(RemappedSubset(dataset, indices, remapped[indices]))
    return subsets


class SeededSamples(Dataset):
    """Reads a sample with torch's CPU RNG seeded by (*seed_parts, position) and restored after:
    a sample's random augmentation depends on where it sits in the epoch only, not on the worker
    process, the rank layout or a resumption. A key is `(position, index)` (training: the position
    in the epoch's order) or an index (its own position: evaluation)."""

    def __init__(self, dataset: Dataset, *seed_parts):
        self.dataset, self.seed_parts = dataset, seed_parts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key if isinstance(key, tuple) else (key, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(*self.seed_parts, position))
            return self.dataset[index]


class EpochBatches(Sampler):
    """This rank's share of every global batch of one epoch, as lists of `(position, index)` keys.

    The epoch's order is a permutation seeded by (seed, task, epoch), cut into global batches of
    `batch_size` rows; rank r of W takes rows [r m / W, (r+1) m / W) of a batch of m rows (m =
    batch_size except maybe the last batch, whose share may be empty). `start` skips the first
    batches without reading them (a resumed epoch)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        task: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ):
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} must be a multiple of the number of processes "
                f"(world size {world_size}): each rank takes batch_size / world_size rows"
            )
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.num_batches = math.ceil(num_samples / batch_size)
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start batch {start} out of range for {self.num_batches} batches")
        self.start = start
        order = torch.Generator().manual_seed(derive_seed(seed, "order", task, epoch))
        self.permutation = torch.randperm(num_samples, generator=order).tolist()

    def global_rows(self, batch: int) -> int:
        return min(self.batch_size, self.num_samples - batch * self.batch_size)

    def share(self, batch: int) -> range:
        """This rank's positions in the epoch for global batch `batch`."""
        first, rows = batch * self.batch_size, self.global_rows(batch)
        return range(first + self.rank * rows // self.world_size, first + (self.rank + 1) * rows // self.world_size)

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self):
        for batch in range(self.start, self.num_batches):
            yield [(p, self.permutation[p]) for p in self.share(batch)]


def collate_or_none(samples: list):
    """default_collate, or None for a rank's empty share of a short last batch."""
    return default_collate(samples) if samples else None
