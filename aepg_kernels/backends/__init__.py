"""The backends: one registry of the implementations of the op contract (aepg_kernels/_contract.py).

| name   | runs on                          | kernels                                        |
|--------|----------------------------------|------------------------------------------------|
| cuda   | CUDA tensors                     | C++/CUDA, csrc/cuda (backends/native.py)       |
| triton | CUDA tensors (CPU: interpreter)  | Triton, backends/triton/                       |
| cpu    | CPU tensors                      | C++, csrc/cpu (backends/native.py)             |
| eager  | any device                       | the PyTorch composite, backends/eager.py       |

The registry's order is the preference of backend="auto": the first backend that is available
here and lists the tensors' device type among its `auto_devices`.
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple, cast

import torch

from . import eager, native
from .base import Backend, KernelBackend
from .native import empty_cache
from .triton import TRITON, triton_interpreter

# cast: a NativeBackend's `loss` is None where the extension is not built, and then unavailable().
REGISTRY: Dict[str, Backend] = {
    b.name: b for b in (cast(Backend, native.CUDA), TRITON, cast(Backend, native.CPU), eager.EAGER)
}
BACKEND_NAMES: Tuple[str, ...] = ("auto",) + tuple(REGISTRY)
KERNEL_BACKENDS: Tuple[str, ...] = tuple(name for name, b in REGISTRY.items() if isinstance(b, KernelBackend))

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "KERNEL_BACKENDS",
    "KernelBackend",
    "REGISTRY",
    "available_backends",
    "check_backend",
    "empty_cache",
    "resolve",
    "resolve_backend",
    "triton_interpreter",
]


def check_backend(backend) -> str:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    return backend


def available_backends() -> Tuple[str, ...]:
    """Backends usable on this machine's devices, fastest first for the default device."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return tuple(
        name
        for name, b in REGISTRY.items()
        if b.unavailable() is None and any(b.device_error(d) is None for d in devices)
    )


@functools.lru_cache(maxsize=None)
def _resolve(backend: str, device: torch.device) -> Backend:
    if backend == "auto":
        for b in REGISTRY.values():
            if (b.auto_devices is None or device.type in b.auto_devices) and b.unavailable() is None:
                return b
    b = REGISTRY[check_backend(backend)]
    reason = b.device_error(device)
    if reason is not None:
        raise ValueError(reason)
    reason = b.unavailable()
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    return b


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that runs tensors on `device`, or a clear error why `backend` cannot. Cached
    per (name, device): what is built and installed does not change in a process (tests that
    pretend otherwise call `resolve.cache_clear()`)."""
    if type(backend) is not str:
        check_backend(backend)
    if torch.compiler.is_compiling():  # traced once per graph (Dynamo warns about lru_cache)
        b = _resolve.__wrapped__(backend, device)
        return b.traced() if hasattr(b, "traced") else b
    return _resolve(backend, device)


resolve.cache_clear = _resolve.cache_clear  # type: ignore[attr-defined]  # a function attribute, for the tests


def resolve_backend(backend: str, device: torch.device) -> str:
    """The name of `resolve(backend, device)`."""
    return resolve(backend, device).name
