"""The optimizer of a task: built afresh at the start of every task, over what the task trains."""

from __future__ import annotations

from typing import Sequence

import torch

from .config import OptimConfig


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The paper's optimizer: Adam with `optim.lr`, `optim.betas`, `optim.weight_decay`."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
