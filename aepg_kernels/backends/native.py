"""The native backends "cpu" and "cuda": the C++ operators of the extension aepg_kernels._C
(csrc/ops.cpp), when it is built. Importing the package never fails because of it:
`native_error()` says why it is missing.

`loss` is one C++ call: the operator aepg::policy_loss validates what needs the data (the target
range on the CPU), computes the "mean" denominator, runs the kernel and builds the autograd node,
whose backward is C++ as well. Under torch.compile the call goes through torch.ops so that Dynamo
sees the operator; everywhere else straight to the extension's binding of it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch

_C: Optional[ModuleType] = None
_IMPORT_ERROR: Optional[str] = "it is not built (pip install . builds it where a compiler is found)"
if importlib.util.find_spec(f"{__package__.rpartition('.')[0]}._C") is not None:  # pragma: no cover - build
    try:
        # registers the aepg:: operators; the compiled extension has no stub, and rebinds _C
        from .. import _C  # type: ignore[attr-defined, no-redef]

        _IMPORT_ERROR = None
    except ImportError as error:
        _IMPORT_ERROR = f"it failed to load: {error}"


def has_cpu_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "HAS_CPU", False))


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "HAS_CUDA", False))


def native_error() -> str:
    if _C is None:
        return f"the native extension aepg_kernels._C is unavailable: {_IMPORT_ERROR}"
    return "the native extension was built without these kernels"


def empty_cache() -> int:
    """Frees the memory that the `cpu` backend keeps for the next large gradient and returns its
    bytes (0 without the extension).

    A CPU gradient of 8 MiB or more comes from blocks that stay mapped after it is freed, so that
    the next gradient of the same shape and dtype skips the OS's page faults and zeroing. Kept
    and live blocks together never exceed the most gradient memory that was in use at once, but
    the kept ones stay mapped while other work runs, up to that much (csrc/cpu/gradient_blocks.h).
    This frees nothing in use and changes no result."""
    return int(_C.release_gradient_blocks()) if has_cpu_kernels() else 0  # type: ignore[union-attr]


# Rows up to this C stay in registers on the GPU (csrc/kernel_args.h cuda::kMaxOnChipCols); longer
# rows are streamed and their gradient recomputed. On the CPU a row is processed while it is in
# cache whatever C (its exponentials go to a per-thread buffer), so the forward always writes the
# gradient of a reduced loss.
CUDA_MAX_ON_CHIP_COLS: int = getattr(_C, "CUDA_MAX_ON_CHIP_COLS", 16384)


@dataclass(frozen=True)
class NativeBackend:
    """One device's operators; the kernels decide the fused gradient in C++ (csrc/ops.cpp
    fuses_grad), with the on-chip rule below. `loss` is the operator itself, called with no
    Python frame in between: the extension's binding in eager calls, torch.ops in `traced()`."""

    name: str
    device_type: str
    max_on_chip_cols: Optional[int]  # None: every row fits
    loss: Optional[Callable] = getattr(_C, "policy_loss", None)

    def traced(self) -> "NativeBackend":
        """The twin that Dynamo can trace: the same operator through torch.ops."""
        return dataclasses.replace(self, loss=torch.ops.aepg.policy_loss.default)

    @property
    def auto_devices(self) -> Tuple[str, ...]:
        return (self.device_type,)

    def unavailable(self) -> Optional[str]:
        built = has_cuda_kernels() if self.device_type == "cuda" else has_cpu_kernels()
        return None if built else native_error()

    def device_error(self, device: torch.device) -> Optional[str]:
        if device.type == self.device_type:
            return None
        return f"backend={self.name!r} needs {self.device_type.upper()} tensors, got a tensor on {device}"

    def fits_on_chip(self, n_cols: int) -> bool:
        return self.max_on_chip_cols is None or n_cols <= self.max_on_chip_cols

    def grad_into_logits(self, fused: bool, device: torch.device) -> bool:
        # CPU (csrc/cpu/policy_loss_cpu_kernels.h): a row belongs to one thread. The forward reads
        # all of it (max, sums, z_y) before its gradient pass, which reads z_k (and e_k) before it
        # writes element k and never reads another element; the backward reads z_y, then likewise.
        # CUDA (csrc/cuda/policy_loss_cuda.cu): every thread of a row reads the target logit x[y]
        # from memory, after the row's reductions (forward) or before its loop (backward), with no
        # barrier before the thread that owns column y writes it: a race, so a separate buffer.
        return self.device_type == "cpu" and device.type == "cpu"

    def forward(self, logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags, out=None):
        call = (logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags)
        if out is None:
            return torch.ops.aepg.native_forward.default(*call)
        loss, stats, denom = torch.ops.aepg.native_forward_out.default(out, *call)
        return loss, stats, out, denom

    def backward(
        self,
        grad_loss,
        logits,
        target,
        weight,
        ce_weight_t,
        epg_weight_t,
        scalars,
        ignore_index,
        flags,
        stats,
        denom,
        out=None,
    ):
        call = (logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags)
        if out is None:
            return torch.ops.aepg.native_backward.default(grad_loss, *call, stats, denom)
        torch.ops.aepg.native_backward_out.default(out, grad_loss, *call, stats, denom)
        return out

    def scale_(self, grad, grad_loss) -> None:
        torch.ops.aepg.native_scale_.default(grad, grad_loss)


CPU: NativeBackend = NativeBackend("cpu", "cpu", max_on_chip_cols=None)
CUDA: NativeBackend = NativeBackend("cuda", "cuda", max_on_chip_cols=CUDA_MAX_ON_CHIP_COLS)
