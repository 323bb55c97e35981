"""The loss of a run by name, built on the public `aepg_kernels` API only."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import aepg_kernels as ak

from .config import LossConfig


def build_schedule(cfg: LossConfig, total_steps: int, device: Optional[torch.device] = None) -> ak.AlphaSchedule:
    """The aEPG schedule of `cfg`. `device`: where the feedback schedule keeps its state (0-d
    tensors updated in place, no host read per step); the schedules of the clock stay Python floats."""
    if cfg.schedule == "feedback":
        f = cfg.feedback
        return ak.FeedbackAlpha(total_steps, target_start=f.target_start, target_end=f.target_end, gain=f.gain,
                                alpha0=f.alpha0, device=device)
    if cfg.schedule == "sigmoid":
        return ak.SigmoidAnneal(total_steps, tau=cfg.tau)
    if cfg.schedule == "linear":
        return ak.LinearAnneal(total_steps)
    if cfg.schedule == "cosine":
        return ak.CosineAnneal(total_steps)
    return ak.ConstantAlpha(cfg.alpha)


def build_criterion(cfg: LossConfig, total_steps: int = 1, device: Optional[torch.device] = None) -> nn.Module:
    """ce, epg, aepg, cp (CE - beta H), ep (CE + beta H), ls, focal. For aepg the criterion holds
    its schedule as `.schedule`: the trainer steps it per optimizer step (a feedback schedule
    observes the step's stats first) and resets it per task."""
    common = dict(backend=cfg.backend)
    if cfg.name == "aepg":
        return ak.AEPGLoss(build_schedule(cfg, total_steps, device), **common)
    options = {
        "ce": {},
        "epg": dict(ce_weight=0.0, epg_weight=1.0),
        "cp": dict(entropy_weight=-cfg.entropy_weight),
        "ep": dict(entropy_weight=cfg.entropy_weight),
        "ls": dict(label_smoothing=cfg.label_smoothing),
        "focal": dict(focal_gamma=cfg.focal_gamma),
    }[cfg.name]
    return ak.PolicyLoss(**options, **common)


def criterion_schedule(criterion: nn.Module) -> Optional[ak.AlphaSchedule]:
    return getattr(criterion, "schedule", None)
