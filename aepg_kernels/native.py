"""The native backends "cpu" and "cuda": the operators torch.ops.aepg.native_* of the extension
aepg_kernels._C (csrc/), behind the interface of the Triton backend (forward, backward, scale_,
fits_on_chip). Calls go through torch.ops so that tracing sees registered operators."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import _native
from ._spec import LossSpec

# Rows up to this C stay in registers on the GPU (csrc/kernel_args.h cuda::kMaxOnChipCols); longer
# rows are streamed and their gradient recomputed.
CUDA_MAX_ON_CHIP_COLS = getattr(_native._C, "CUDA_MAX_ON_CHIP_COLS", 16384)


def forward(logits, target, weight, spec: LossSpec, denom, *, need_entropy: bool, write_grad: bool):
    """Per-row loss (accumulation dtype), stats (NUM_STATS, R) and, if write_grad, the gradient of
    the reduced loss for an upstream gradient of 1, as triton.forward."""
    a_t, b_t, a, b = spec.coefficient_args()
    return torch.ops.aepg.native_forward(
        logits, target, weight, a_t, b_t, a, b, spec.entropy_weight, spec.label_smoothing, spec.focal_gamma,
        spec.ignore_index, int(spec.reduction), spec.prob_target, denom, need_entropy, write_grad)


def backward(grad_loss, logits, target, weight, spec: LossSpec, stats, denom):
    """dL/dlogits recomputed from the saved stats; grad_loss 0-d or (R,) with any stride."""
    a_t, b_t, a, b = spec.coefficient_args()
    return torch.ops.aepg.native_backward(
        grad_loss, logits, target, weight, a_t, b_t, a, b, spec.entropy_weight, spec.label_smoothing,
        spec.ignore_index, int(spec.reduction), spec.prob_target, stats, denom)


def scale_(grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """grad *= grad_loss in place, skipped when grad_loss == 1."""
    torch.ops.aepg.native_scale_(grad, grad_loss)


@dataclass(frozen=True)
class NativeKernels:
    """One device's kernels; only the on-chip rule differs between CPU and CUDA."""

    fits_on_chip: Callable[[int], bool]
    forward: Callable = staticmethod(forward)
    backward: Callable = staticmethod(backward)
    scale_: Callable = staticmethod(scale_)


# CPU: a row is processed while it is in cache whatever C (its exponentials go to a per-thread
# buffer of C values, L2-resident up to C ~ 256K), so the forward always writes the gradient for
# a reduced loss: 1 read + 1 write, against 2 reads + 1 write for forward then recompute.
cpu = NativeKernels(fits_on_chip=lambda n_cols: True)
# CUDA: the row must stay in registers of one block.
cuda = NativeKernels(fits_on_chip=lambda n_cols: n_cols <= CUDA_MAX_ON_CHIP_COLS)
