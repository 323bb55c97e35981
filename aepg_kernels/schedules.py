"""Schedules for aEPG's alpha within a task (docs/math.md section 5): from CE (alpha ~ 1) to EPG.

A schedule counts optimizer steps: `.alpha` is the current value, `.step()` advances one step,
`.reset(total_steps)` starts a new task. By default the state is a Python int and `.alpha` a
float. With `device=...` the step counter and `.alpha` are 0-d tensors on that device, updated in
place by `.step()` / `.reset()`: `.alpha` is always the same tensor, so reading it costs nothing
per loss call, and a compiled or CUDA-graph-captured training step sees each new value without
recompiling or re-capturing.
"""
from __future__ import annotations

import math
from typing import Optional, Union

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
        if self._alpha is not None:
            self._alpha.copy_(self._current())

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
