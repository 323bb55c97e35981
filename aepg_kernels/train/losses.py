"""The losses a run can train with: one registry, `LOSSES` (name -> description and builder), which
`LossConfig` validates `loss.name` against, and likewise `SCHEDULES` for aEPG's `loss.schedule`.
Built on the public `aepg_kernels` API only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch
from torch import nn

import aepg_kernels as ak

if TYPE_CHECKING:  # config.py imports this registry at run time
    from .config import LossConfig

# (loss config, steps of the alpha schedule, device of a feedback schedule's state) -> the criterion
LossBuilder = Callable[["LossConfig", int, Optional[torch.device]], nn.Module]
# (loss config, steps of a task, device of a feedback schedule's state) -> aEPG's alpha schedule
ScheduleBuilder = Callable[["LossConfig", int, Optional[torch.device]], ak.AlphaSchedule]


@dataclass(frozen=True)
class RegisteredLoss:
    """An entry of LOSSES: what the loss computes, in one line, and how to build it from the config."""

    description: str
    build: LossBuilder


def _feedback_schedule(cfg: LossConfig, total_steps: int, device: Optional[torch.device]) -> ak.AlphaSchedule:
    f = cfg.feedback
    return ak.FeedbackAlpha(
        total_steps, target_start=f.target_start, target_end=f.target_end, gain=f.gain, alpha0=f.alpha0, device=device
    )


SCHEDULES: Dict[str, ScheduleBuilder] = {  # loss.schedule, of aepg only
    "sigmoid": lambda cfg, steps, _device: ak.SigmoidAnneal(steps, tau=cfg.tau),
    "linear": lambda _cfg, steps, _device: ak.LinearAnneal(steps),
    "cosine": lambda _cfg, steps, _device: ak.CosineAnneal(steps),
    "constant": lambda cfg, _steps, _device: ak.ConstantAlpha(cfg.alpha),
    "feedback": _feedback_schedule,
}


def build_schedule(cfg: LossConfig, total_steps: int, device: Optional[torch.device] = None) -> ak.AlphaSchedule:
    """The aEPG schedule `loss.schedule` names (see SCHEDULES). `device`: where the feedback
    schedule keeps its state (0-d tensors updated in place, no host read per step); the schedules
    of the clock stay Python floats."""
    return SCHEDULES[cfg.schedule](cfg, total_steps, device)


def _aepg(cfg: LossConfig, total_steps: int, device: Optional[torch.device]) -> nn.Module:
    return ak.AEPGLoss(build_schedule(cfg, total_steps, device), backend=cfg.backend)


def _policy_loss(options: Callable[[LossConfig], dict]) -> LossBuilder:
    """A builder of `ak.PolicyLoss` with the keyword arguments `options(cfg)`."""

    def build(cfg: LossConfig, _total_steps: int, _device: Optional[torch.device]) -> nn.Module:
        return ak.PolicyLoss(**options(cfg), backend=cfg.backend)

    return build


LOSSES: Dict[str, RegisteredLoss] = {
    "ce": RegisteredLoss("cross-entropy", _policy_loss(lambda cfg: {})),
    "epg": RegisteredLoss("EPG, 1 - p_y", _policy_loss(lambda cfg: dict(ce_weight=0.0, epg_weight=1.0))),
    "aepg": RegisteredLoss("alpha CE + (1 - alpha) EPG, alpha from loss.schedule", _aepg),
    "cp": RegisteredLoss(
        "CE - beta H, beta = loss.entropy_weight (confidence penalty)",
        _policy_loss(lambda cfg: dict(entropy_weight=-cfg.entropy_weight)),
    ),
    "ep": RegisteredLoss(
        "CE + beta H, beta = loss.entropy_weight (entropy penalty)",
        _policy_loss(lambda cfg: dict(entropy_weight=cfg.entropy_weight)),
    ),
    "ls": RegisteredLoss(
        "CE with label smoothing loss.label_smoothing",
        _policy_loss(lambda cfg: dict(label_smoothing=cfg.label_smoothing)),
    ),
    "focal": RegisteredLoss(
        "focal loss, gamma = loss.focal_gamma", _policy_loss(lambda cfg: dict(focal_gamma=cfg.focal_gamma))
    ),
}
LOSS_NAMES = tuple(LOSSES)


def build_criterion(cfg: LossConfig, total_steps: int = 1, device: Optional[torch.device] = None) -> nn.Module:
    """The criterion `loss.name` names (see LOSSES). For aepg the criterion holds its schedule as
    `.schedule`: the trainer steps it per optimizer step (a feedback schedule observes the step's
    stats first) and resets it per task."""
    return LOSSES[cfg.name].build(cfg, total_steps, device)
