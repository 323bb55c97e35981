"""Which backends exist on this machine, and which one "auto" picks for a device."""
from __future__ import annotations

import os
from typing import Tuple

import torch

from . import _native
from ._spec import check_backend


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1 (set before triton is imported) runs the Triton kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> Tuple[str, ...]:
    """Backends usable here, fastest first for the default device (CUDA if present)."""
    names = []
    if torch.cuda.is_available() and _native.has_cuda_kernels():
        names.append("cuda")
    if _triton_importable() and (torch.cuda.is_available() or triton_interpreter()):
        names.append("triton")
    if _native.has_cpu_kernels():
        names.append("cpu")
    names.append("eager")
    return tuple(names)


def resolve_backend(backend: str, device: torch.device) -> str:
    """A concrete backend for tensors on `device`, or a clear error why `backend` cannot run there."""
    check_backend(backend)
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if on_cuda:
            if _native.has_cuda_kernels():
                return "cuda"
            return "triton" if _triton_importable() else "eager"
        return "cpu" if device.type == "cpu" and _native.has_cpu_kernels() else "eager"
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not on_cuda and not (device.type == "cpu" and triton_interpreter()):
            raise ValueError(f"backend='triton' runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 "
                             f"is set before triton is imported; got a tensor on {device}")
    elif backend == "cuda":
        if not on_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got a tensor on {device}")
        if not _native.has_cuda_kernels():
            raise RuntimeError(f"backend='cuda' is not available: {_native.native_error()}")
    elif backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got a tensor on {device}")
        if not _native.has_cpu_kernels():
            raise RuntimeError(f"backend='cpu' is not available: {_native.native_error()}")
    return backend
