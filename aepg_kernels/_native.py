"""The native extension `aepg_kernels._C` (C++ CPU and CUDA kernels), when it is built.

Importing the package never fails because of it: `native_error()` says why it is missing."""
from __future__ import annotations

from typing import Optional

import importlib.util

_C = None
_IMPORT_ERROR: Optional[str] = "it is not built (pip install . builds it where a compiler is found)"
if importlib.util.find_spec(f"{__package__}._C") is not None:  # pragma: no cover - depends on the build
    try:
        from . import _C  # noqa: F401
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
