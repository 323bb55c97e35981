"""Classifier heads grown per task, the local (current-task) loss, and per-sample prediction.

Label space: the scenario remaps labels so that task t owns the contiguous range
`[lo_t, hi_t)`; the heads' concatenated logits cover every class seen so far, in that order.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class TaskHeads(nn.Module):
    """One linear head per task; forward concatenates the logits of all tasks added so far. Heads
    start at N(0, init_std^2) (the config's default: `ModelConfig.head_init_std`)."""

    def __init__(self, in_features: int, init_std: float):
        super().__init__()
        self.in_features, self.init_std = in_features, init_std
        self.heads = nn.ModuleList()

    @property
    def num_classes(self) -> int:
        return sum(head.out_features for head in self.heads)

    def add_task(self, num_classes: int, device=None, dtype=None) -> Tuple[int, int]:
        """Adds the new task's head (N(0, init_std^2), bias 0) and freezes the older ones: with a
        local loss they get no gradient anyway, and a frozen head cannot drift through weight decay or
        optimizer state. Returns the new task's class range."""
        for p in self.heads.parameters():
            p.requires_grad_(False)
        head = nn.Linear(self.in_features, num_classes, device=device, dtype=dtype)
        nn.init.normal_(head.weight, std=self.init_std)
        nn.init.zeros_(head.bias)
        lo = self.num_classes
        self.heads.append(head)
        return lo, lo + num_classes

    def class_range(self, task: int) -> Tuple[int, int]:
        lo = sum(head.out_features for head in self.heads[:task])
        return lo, lo + self.heads[task].out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not len(self.heads):
            raise RuntimeError("TaskHeads has no task yet: call add_task first")
        return torch.cat([head(features) for head in self.heads], dim=-1)


def local_loss(
    criterion: nn.Module, logits: torch.Tensor, targets: torch.Tensor, class_range: Tuple[int, int], **kwargs
):
    """The criterion over the current task's classes only: the logits are sliced to
    `[lo, hi)` (not masked: -inf logits would put 0 * -inf into entropy terms) and the targets
    shifted into it, so p_y is the probability within the task. `kwargs` go to the criterion
    (e.g. return_stats=True)."""
    lo, hi = class_range
    return criterion(logits[:, lo:hi], targets - lo, **kwargs)


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Class-incremental prediction: argmax over every class seen so far, one sample at a time
    (no batch statistics, so the result cannot depend on batch size or order)."""
    return logits.argmax(dim=-1)
