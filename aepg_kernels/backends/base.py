"""The interface every backend satisfies: the op contract of aepg_kernels/_contract.py, run on
some devices.

`loss` is the differentiable entry point the public API calls with a packed call (a method, or
the operator itself as an attribute); kernel backends also expose their kernels (forward,
backward, scale_) and their on-chip rule, which the custom-op glue and the tests use. A backend
whose eager entry point Dynamo cannot trace has `traced()`, the twin `resolve` returns while
compiling.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor

LossAndStats = Tuple[Tensor, Tensor]
ForwardOutputs = Tuple[Tensor, Tensor, Tensor, Tensor]  # loss, stats, grad, denominator


@runtime_checkable
class Backend(Protocol):
    # Read-only members (properties here), so that frozen dataclasses, properties and plain class
    # attributes of narrower types satisfy them.
    @property
    def name(self) -> str: ...

    @property
    def auto_devices(self) -> Optional[Tuple[str, ...]]:
        """The device types "auto" picks this backend for, in registry order (None: every device)."""

    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run on this machine, or None when it can."""

    def device_error(self, device: torch.device) -> Optional[str]:
        """Why it cannot run on tensors of `device`, or None when it can."""

    def loss(
        self,
        logits: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        ce_weight_t: Optional[Tensor],
        epg_weight_t: Optional[Tensor],
        scalars: List[float],
        ignore_index: int,
        flags: int,
    ) -> LossAndStats:
        """The loss (reduced, or per row) and the (NUM_STATS, R) stats of a call, differentiable
        with respect to the logits."""


@runtime_checkable
class KernelBackend(Backend, Protocol):
    def fits_on_chip(self, n_cols: int) -> bool:
        """Whether a row of `n_cols` classes stays on chip, so that the forward can write the
        gradient (1 read + 1 write)."""

    def grad_into_logits(self, fused: bool, device: torch.device) -> bool:
        """Whether `out` may be the logits themselves on `device`, the gradient written over
        them, on the path `fused` (the forward with WRITE_GRAD) or else the recompute backward:
        only where each value of a row that the gradient needs is read before any thread writes
        that element, and nothing reads the row after the pass (the linear op's chunks,
        docs/design.md section 8)."""

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        ce_weight_t: Optional[Tensor],
        epg_weight_t: Optional[Tensor],
        scalars: List[float],
        ignore_index: int,
        flags: int,
        out: Optional[Tensor] = None,
    ) -> ForwardOutputs:
        """The contract's forward: (loss, stats, grad, denominator), no autograd; with WRITE_GRAD
        the gradient goes into `out` when given (a contiguous tensor like the logits)."""

    def backward(
        self,
        grad_loss: Tensor,
        logits: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        ce_weight_t: Optional[Tensor],
        epg_weight_t: Optional[Tensor],
        scalars: List[float],
        ignore_index: int,
        flags: int,
        stats: Tensor,
        denom: Tensor,
        out: Optional[Tensor] = None,
    ) -> Tensor:
        """dL/dlogits recomputed from the saved stats (into `out` when given); grad_loss 0-d or (R,)."""

    def scale_(self, grad: Tensor, grad_loss: Tensor) -> None:
        """grad *= grad_loss (0-d) in place, skipped when grad_loss == 1 (decided on the device)."""
