"""Class-incremental scenarios from any labelled dataset (only its targets are needed).

The classes are put in an order (natural: sorted labels; permuted: a seeded permutation) and cut
into consecutive tasks. Labels are remapped to their position in that order, so task t owns the
contiguous range `[lo_t, hi_t)` of the growing classifier. The order is stored (`state_dict`) so
a run can be reproduced exactly and compared across methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


def _as_targets(targets) -> torch.Tensor:
    t = torch.as_tensor(targets)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"targets must be a 1-d sequence of integer labels, got shape {tuple(t.shape)} {t.dtype}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError("targets must be >= 0")
    return t.long()


@dataclass(frozen=True)
class ClassIncrementalScenario:
    class_order: Tuple[int, ...]  # original labels, in the order they are learned
    task_sizes: Tuple[int, ...]  # classes per task

    def __post_init__(self):
        if len(set(self.class_order)) != len(self.class_order):
            raise ValueError("class_order has duplicate labels")
        if sum(self.task_sizes) != len(self.class_order) or min(self.task_sizes, default=0) < 1:
            raise ValueError(f"task_sizes {self.task_sizes} must be >= 1 and sum to {len(self.class_order)} classes")

    @classmethod
    def create(
        cls,
        labels: Sequence[int],
        *,
        num_tasks: Optional[int] = None,
        classes_per_task: Optional[int] = None,
        order: str = "natural",
        seed: Optional[int] = None,
    ) -> "ClassIncrementalScenario":
        """From the set of class labels. Give exactly one of `num_tasks` (classes spread as evenly as
        possible, the first tasks taking one more when it does not divide) or `classes_per_task`
        (the last task takes the remainder). `order="permuted"` needs a `seed`."""
        labels = sorted(set(int(c) for c in labels))
        n = len(labels)
        if (num_tasks is None) == (classes_per_task is None):
            raise ValueError("give exactly one of num_tasks / classes_per_task")
        if num_tasks is not None:
            if not 1 <= num_tasks <= n:
                raise ValueError(f"num_tasks must be in [1, {n}] for {n} classes, got {num_tasks}")
            sizes = [n // num_tasks + (i < n % num_tasks) for i in range(num_tasks)]
        else:
            if not 1 <= classes_per_task <= n:
                raise ValueError(f"classes_per_task must be in [1, {n}] for {n} classes, got {classes_per_task}")
            full, rest = divmod(n, classes_per_task)
            sizes = [classes_per_task] * full + ([rest] if rest else [])
        if order == "natural":
            ordered = labels
        elif order == "permuted":
            if seed is None:
                raise ValueError("a permuted class order needs a seed")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            ordered = [labels[i] for i in perm.tolist()]
        else:
            raise ValueError(f"order must be 'natural' or 'permuted', got {order!r}")
        return cls(tuple(ordered), tuple(sizes))

    @classmethod
    def from_targets(cls, targets, **kwargs) -> "ClassIncrementalScenario":
        """The labels present in `targets` (e.g. a dataset's `.targets`); kwargs as `create`."""
        return cls.create(_as_targets(targets).unique().tolist(), **kwargs)

    @classmethod
    def from_config(cls, cfg, targets, seed: int) -> "ClassIncrementalScenario":
        """From a `ScenarioConfig`; `seed` (the run's) orders the classes unless cfg.order_seed is set."""
        return cls.from_targets(
            targets,
            num_tasks=cfg.num_tasks,
            classes_per_task=cfg.classes_per_task,
            order=cfg.class_order,
            seed=seed if cfg.order_seed is None else cfg.order_seed,
        )

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def class_range(self, task: int) -> Tuple[int, int]:
        """Task `task`'s classes in the remapped label space: `[lo, hi)`."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} tasks")
        lo = sum(self.task_sizes[:task])
        return lo, lo + self.task_sizes[task]

    def task_classes(self, task: int) -> Tuple[int, ...]:
        """Task `task`'s classes as original labels."""
        lo, hi = self.class_range(task)
        return self.class_order[lo:hi]

    def tasks(self) -> List[Tuple[int, ...]]:
        """Every task's classes as original labels, in task order."""
        return [self.task_classes(t) for t in range(self.num_tasks)]

    def remap(self, targets) -> torch.Tensor:
        """Original labels -> positions in the class order (the labels the heads are trained on)."""
        t = _as_targets(targets)
        table = torch.full((max(max(self.class_order), int(t.max()) if t.numel() else 0) + 1,), -1, dtype=torch.long)
        table[list(self.class_order)] = torch.arange(self.num_classes)
        out = table[t]
        if (out < 0).any():
            missing = sorted(set(t[out < 0].tolist()))
            raise ValueError(f"labels {missing[:10]} are not in the scenario's class order")
        return out

    def task_indices(self, targets, task: int) -> torch.Tensor:
        """Indices of the samples of task `task` (train or test targets alike), in dataset order."""
        lo, hi = self.class_range(task)
        position = self.remap(targets)
        return torch.nonzero((position >= lo) & (position < hi)).flatten()

    def state_dict(self) -> dict:
        return {"class_order": list(self.class_order), "task_sizes": list(self.task_sizes)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClassIncrementalScenario":
        return cls(tuple(state["class_order"]), tuple(state["task_sizes"]))
