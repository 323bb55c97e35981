"""The Triton backend: a fused forward (one pass per row; the gradient too when the row is on
chip), a recompute backward, an in-place scale of the fused gradient, the two row reductions.

Importing this registers the custom ops (op.py) without importing triton; the kernels and triton
load on the first call (launch.py).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..._contract import Flag
from ..._spec import check_target_range
from . import op


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1 (set before triton is imported) runs the Triton kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    name = "triton"
    auto_devices = ("cuda",)  # never "auto" on the CPU: the interpreter is for tests

    def unavailable(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "it needs the triton package, which is not installed"
        return None

    def device_error(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
            return None
        return (
            f"backend='triton' runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before "
            f"triton is imported; got a tensor on {device}"
        )

    def fits_on_chip(self, n_cols: int) -> bool:
        return op.launch_module().fits_on_chip(n_cols)

    def grad_into_logits(self, fused: bool, device: torch.device) -> bool:
        # A program owns whole rows (forward.py, backward.py). The recompute backward stores each
        # column tile's gradient from that tile's own loads (a layout change in between goes
        # through shared memory behind a barrier); the target logit z_y enters only the target
        # column's value (g_y, through the entropy term), computed by the thread that stores it;
        # the loop never reads a column it has written. The fused forward feeds z_y into every
        # column (through the sample weight), and on a GPU the thread that writes column y need
        # not wait for another thread's load of z_y (no barrier when a row lies within one warp):
        # a separate buffer there. The interpreter (CPU tensors) runs a program's loads and
        # stores one after another, on copies.
        return not fused or device.type == "cpu"

    def loss(self, logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags):
        if not flags & Flag.PROB_TARGET:  # the interpreter on CPU tensors: an IndexError, as the cpu backend
            check_target_range(target, logits.shape[-1], ignore_index)
        return op.policy_loss(
            logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags, self.fits_on_chip
        )

    def forward(self, *call, out=None):
        return op.launch_module().forward(*call, out=out)

    def backward(self, *args, out=None):
        return op.launch_module().backward(*args, out=out)

    def scale_(self, grad, grad_loss) -> None:
        op.launch_module().scale_(grad, grad_loss)


TRITON = TritonBackend()
