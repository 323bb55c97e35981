"""nn.Module wrappers of the functional API."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn import _reduction

from .functional import aepg_loss, policy_loss
from .schedules import AlphaSchedule


class PolicyLoss(nn.Module):
    """The fused EPG-family loss as a module. With the defaults it is a drop-in for
    ``nn.CrossEntropyLoss`` (same positional arguments, same results); the family's terms
    are keyword arguments (see ``policy_loss``)."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, ce_weight=1.0, epg_weight=0.0,
                 entropy_weight: float = 0.0, focal_gamma: float = 0.0, backend: str = "auto"):
        super().__init__()
        if size_average is not None or reduce is not None:  # the deprecated pair, as torch maps it
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.ce_weight = ce_weight
        self.epg_weight = epg_weight
        self.entropy_weight = entropy_weight
        self.focal_gamma = focal_gamma
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor, return_stats: bool = False):
        return policy_loss(input, target, ce_weight=self.ce_weight, epg_weight=self.epg_weight,
                           entropy_weight=self.entropy_weight, label_smoothing=self.label_smoothing,
                           focal_gamma=self.focal_gamma, weight=self.weight, ignore_index=self.ignore_index,
                           reduction=self.reduction, backend=self.backend, return_stats=return_stats)

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, epg_weight={self.epg_weight}, entropy_weight={self.entropy_weight}, "
                f"label_smoothing={self.label_smoothing}, focal_gamma={self.focal_gamma}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class AEPGLoss(PolicyLoss):
    """aEPG with alpha read from `schedule.alpha` on every call; the caller steps the schedule
    (once per optimizer step) and resets it at each task boundary."""

    def __init__(self, schedule: AlphaSchedule, **kwargs):
        if not isinstance(schedule, AlphaSchedule):
            raise TypeError(f"schedule must be an AlphaSchedule (e.g. SigmoidAnneal), got {type(schedule).__name__}")
        fixed = sorted({"ce_weight", "epg_weight"} & kwargs.keys())
        if fixed:
            raise TypeError(f"AEPGLoss sets ce_weight = alpha and epg_weight = 1 - alpha from the schedule; "
                            f"do not pass {', '.join(fixed)}")
        super().__init__(**kwargs)
        self.schedule = schedule

    def forward(self, input: Tensor, target: Tensor, return_stats: bool = False):
        return aepg_loss(input, target, self.schedule.alpha, entropy_weight=self.entropy_weight,
                         label_smoothing=self.label_smoothing, focal_gamma=self.focal_gamma, weight=self.weight,
                         ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                         return_stats=return_stats)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, " + super().extra_repr()
