"""Schedules for aEPG's alpha within a task (docs/math.md section 5): from CE (alpha ~ 1) to EPG,
as a fixed function of the task's progress, or (`FeedbackAlpha`) driven by the model's confidence.

A schedule counts optimizer steps: `.alpha` is the current value, `.step()` advances one step,
`.reset(total_steps)` starts a new task. By default the state is a Python int and `.alpha` a
float. With `device=...` the step counter and `.alpha` are 0-d tensors on that device, updated in
place by `.step()` / `.reset()`: `.alpha` is always the same tensor, so reading it costs nothing
per loss call, and a compiled or CUDA-graph-captured training step sees each new value without
recompiling or re-capturing.
"""

from __future__ import annotations

import math
from typing import Optional, Union, cast

import torch

Alpha = Union[float, torch.Tensor]


def _check_total_steps(total_steps) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    return total_steps


class AlphaSchedule:
    """Base class: alpha as a function of the task's progress t / T in [0, 1]."""

    def __init__(self, total_steps: int, *, device: Optional[Union[str, torch.device]] = None):
        self.total_steps = _check_total_steps(total_steps)
        self.device = None if device is None else torch.device(device)
        self._step = 0 if self.device is None else torch.zeros((), dtype=torch.float32, device=self.device)
        self._alpha = None if self.device is None else torch.empty((), dtype=torch.float32, device=self.device)
        self._refresh()

    def _alpha_at(self, progress: Alpha) -> Alpha:
        raise NotImplementedError

    def _current(self) -> Alpha:
        progress = self._step / self.total_steps
        if isinstance(progress, torch.Tensor):
            return self._alpha_at(progress.clamp(max=1.0))
        return self._alpha_at(min(progress, 1.0))

    def _refresh(self) -> None:
        """Recomputes the device tensor alpha in place after the state changed."""
        if self._alpha is not None:  # with a device the step is a tensor, and so is the alpha
            self._alpha.copy_(cast(torch.Tensor, self._current()))

    @property
    def alpha(self) -> Alpha:
        return self._current() if self._alpha is None else self._alpha

    @property
    def step_count(self) -> int:
        return int(self._step)

    def step(self) -> None:
        if isinstance(self._step, torch.Tensor):
            self._step.add_(1)
            self._refresh()
        else:
            self._step += 1

    def reset(self, total_steps: Optional[int] = None) -> None:
        """Start a new task: step 0, and a new length if given."""
        if total_steps is not None:
            self.total_steps = _check_total_steps(total_steps)
        if isinstance(self._step, torch.Tensor):
            self._step.zero_()
            self._refresh()
        else:
            self._step = 0

    def state_dict(self) -> dict:
        return {"step": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.reset(state["total_steps"])
        if isinstance(self._step, torch.Tensor):
            self._step.fill_(state["step"])
            self._refresh()
        else:
            self._step = int(state["step"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(total_steps={self.total_steps}, step={self.step_count})"


def _ops(x: Alpha):
    return torch if isinstance(x, torch.Tensor) else math


class SigmoidAnneal(AlphaSchedule):
    """alpha = sigmoid(tau (1 - 2 t / T)): 0.9975 -> 0.5 -> 0.0025 for tau = 6 (the paper's)."""

    def __init__(self, total_steps: int, tau: float = 6.0, *, device=None):
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        self.tau = float(tau)
        super().__init__(total_steps, device=device)

    def _alpha_at(self, progress):
        return 1 / (1 + _ops(progress).exp(-self.tau * (1 - 2 * progress)))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.tau = float(state.get("tau", self.tau))
        super().load_state_dict(state)


class LinearAnneal(AlphaSchedule):
    """alpha = 1 - t / T."""

    def _alpha_at(self, progress):
        return 1 - progress


class CosineAnneal(AlphaSchedule):
    """alpha = 0.5 + 0.5 cos(pi t / T)."""

    def _alpha_at(self, progress):
        return 0.5 + 0.5 * _ops(progress).cos(math.pi * progress)


class ConstantAlpha(AlphaSchedule):
    """A fixed alpha (alpha = 1 is CE, alpha = 0 is EPG); reset() only restarts the count."""

    def __init__(self, alpha: float, *, device=None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        self.value = float(alpha)
        super().__init__(1, device=device)

    def _alpha_at(self, progress):
        return self.value + 0 * progress

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alpha": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state.get("alpha", self.value))
        super().load_state_dict(state)


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class FeedbackAlpha(AlphaSchedule):
    """alpha steered by the model's confidence instead of the clock: after each optimizer step,

        alpha <- clamp(alpha + gain (target(t) - mean p_y), 0, 1),

    target(t) rising linearly from target_start to target_end over the task. While the batch's
    mean p_y lags behind the target, alpha grows (more CE, which learns the low-p_y samples
    faster); once the model is ahead of it, alpha falls (more EPG, which down-weights them, noisy
    labels among them). `observe(stats)` takes the batch's LossStats (the loss called with
    return_stats=True), before `step()`. With `device=` the state is 0-d tensors updated in place
    (no host read, the same `.alpha` tensor for compiled or captured steps); `reset()` starts a
    task at alpha0.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        target_start: float = 0.5,
        target_end: float = 0.95,
        gain: float = 0.5,
        alpha0: float = 1.0,
        device=None,
    ):
        self.target_start = _check_unit("target_start", target_start)
        self.target_end = _check_unit("target_end", target_end)
        self.alpha0 = _check_unit("alpha0", alpha0)
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not (math.isfinite(gain) and gain >= 0):
            raise ValueError(f"gain must be a finite number >= 0, got {gain!r}")
        self.gain = float(gain)
        self._value = self.alpha0 if device is None else torch.full((), self.alpha0, device=device)
        super().__init__(total_steps, device=device)

    def _current(self) -> Alpha:
        return self._value

    def target(self) -> Alpha:
        """The mean p_y the controller steers to at the current step."""
        progress = self._step / self.total_steps
        progress = progress.clamp(max=1.0) if isinstance(progress, torch.Tensor) else min(progress, 1.0)
        return self.target_start + (self.target_end - self.target_start) * progress

    def observe(self, stats, counted: Optional[torch.Tensor] = None) -> None:
        """Moves alpha from a batch's stats (`LossStats`): its mean p_y over the counted rows
        (`counted`, else the rows with p_y > 0, since ignored rows have p_y = 0). A batch with no
        counted row changes nothing."""
        p_y = stats.p_target.detach().reshape(-1).float()
        counted = (p_y > 0) if counted is None else counted.reshape(-1)
        count = counted.sum()
        mean = torch.where(counted, p_y, 0.0).sum() / count.clamp(min=1)
        step = torch.where(count > 0, self.gain * (self.target() - mean), 0.0)
        if isinstance(self._value, torch.Tensor):
            self._value.add_(step.to(self._value.device)).clamp_(0.0, 1.0)
            self._refresh()
        else:
            self._value = min(max(self._value + float(step), 0.0), 1.0)

    def reset(self, total_steps: Optional[int] = None) -> None:
        if isinstance(self._value, torch.Tensor):
            self._value.fill_(self.alpha0)
        else:
            self._value = self.alpha0
        super().reset(total_steps)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "alpha": float(self._value),
            "target_start": self.target_start,
            "target_end": self.target_end,
            "gain": self.gain,
            "alpha0": self.alpha0,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("target_start", "target_end", "gain", "alpha0"):
            setattr(self, key, float(state.get(key, getattr(self, key))))
        super().load_state_dict(state)  # resets to alpha0, then the step
        value = float(state.get("alpha", self.alpha0))
        if isinstance(self._value, torch.Tensor):
            self._value.fill_(value)
            self._refresh()
        else:
            self._value = value
