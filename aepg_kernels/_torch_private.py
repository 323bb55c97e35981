"""The private torch APIs the package relies on, in one place.

Each is a probe that has no public equivalent. They were checked against torch 2.14.1 (the
release CI installs); a torch release may rename or remove any of them without notice, so an
upgrade of torch should start by running the tests named below.

- `is_tracing()`: whether a graph is being captured (Dynamo, make_fx, fake tensors or another
  torch dispatch mode). The Triton backend calls its kernels directly in eager mode and through
  its registered custom ops under a trace (backends/triton/op.py). If a probe disappears, the
  import fails; if one silently answers False under a trace, the trace sees an autograd.Function
  instead of the ops: tests/test_compile.py fails (fullgraph compile, make_fx holding the op).
- `graph_keeps_saved_tensors()`: whether the running backward was asked to keep its graph
  (retain_graph, or outside the autograd engine). Only when it was not may the Triton backward
  scale the gradient saved by the forward in place. A wrong answer scales the saved gradient
  again on a second backward: tests/test_kernel_parity.py (retain_graph) fails.
- `is_fake_tensor(t)`: a FakeTensor has no data to range-check (_spec.check_target_range).
- `legacy_reduction(size_average, reduce)`: the string reduction of the deprecated
  `size_average`/`reduce` arguments, as torch.nn's own losses map them (modules.py).
- `cpu_has_native_matmul(dtype)`: whether this CPU multiplies bf16/fp16 matrices natively (AMX
  tiles, AVX-512 BF16), where ATen's matmul in that dtype beats fp32; the fused LM head
  (_linear.compute_dtype) then computes in the dtype. The probes run once, at import (a traced
  call reads the answer, never calls them); if one disappears, the import fails. A wrong answer
  changes speed and the rounding of the matmuls (bf16 products, as PyTorch's own composite, or
  fp32 ones), never the op's contract: tests/test_linear.py runs both choices.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn._reduction
from torch.fx.experimental.proxy_tensor import get_proxy_mode

__all__ = ["cpu_has_native_matmul", "graph_keeps_saved_tensors", "is_fake_tensor", "is_tracing", "legacy_reduction"]


def is_tracing() -> bool:
    """True while a graph is captured: Dynamo, a proxy (make_fx) mode, a fake mode, or any other
    torch dispatch mode on the stack."""
    return (
        torch.compiler.is_compiling()
        or get_proxy_mode() is not None
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
        or bool(torch._C._len_torch_dispatch_stack())
    )


def graph_keeps_saved_tensors() -> bool:
    """True when the current backward keeps its graph for another backward (retain_graph=True),
    and also outside a backward (the engine's conservative answer)."""
    return bool(torch._C._autograd._get_current_graph_task_keep_graph())


def is_fake_tensor(tensor: torch.Tensor) -> bool:
    """True for a FakeTensor: metadata only, no values."""
    return isinstance(tensor, torch._subclasses.FakeTensor)


def legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    """ "mean", "sum" or "none" for the deprecated size_average/reduce pair, as torch.nn maps it
    (with its deprecation warning)."""
    return torch.nn._reduction.legacy_get_string(size_average, reduce)


# Matrix instructions of this CPU for a low-precision dtype, which oneDNN's matmuls use.
_NATIVE_MATMUL = {
    torch.bfloat16: bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()),
    torch.float16: bool(torch.cpu._is_amx_fp16_supported()),
}


def cpu_has_native_matmul(dtype: torch.dtype) -> bool:
    """True where this CPU has matrix instructions for `dtype` (bf16: AMX or AVX-512 BF16; fp16:
    AMX-FP16)."""
    return _NATIVE_MATMUL.get(dtype, False)
