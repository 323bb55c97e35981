"""Argument validation: the one gate between the public API and the backends.

`prepare` checks every argument of `policy_loss` from what is known without reading tensor data
(types, dtypes, shapes, devices) and returns the packed call of the op contract
(aepg_kernels/_contract.py) on rows of C classes. It runs no torch op for the common (N, C)
input, since at classification shapes host time is the whole cost of a call. What needs the data
(a class index out of range) is checked by the backends: in C++ on the CPU, by
`check_target_range` in the Python backends, as NaN rows on the GPU (no host synchronisation).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._contract import ONE_MINUS_CE_WEIGHT, Coefficient, EpgCoefficient, Reduction, pack
from ._torch_private import is_fake_tensor

FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
INDEX_DTYPES = frozenset((torch.int64, torch.int32))
_REDUCTIONS = {"none": Reduction.NONE, "mean": Reduction.MEAN, "sum": Reduction.SUM}


# A validated call: the op contract's eight arguments (logits (R, C), target (R,) or (R, C), weight,
# ce_weight_t, epg_weight_t, scalars, ignore_index, flags).
Call = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], list, int, int]


def check_real_number(name: str, value, *, low=-math.inf, high=math.inf) -> float:
    if value.__class__ is not float:  # the common case in one comparison; bool is an int, refused
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
    if not low <= value <= high or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value}")
    return value


def check_coefficient(name: str, value) -> Coefficient:
    """A CE or EPG weight: a finite real number or a floating 0-d tensor (detached); its device is
    checked against the input's by `check_coefficient_devices`."""
    if value.__class__ is float or not isinstance(value, Tensor):
        return check_real_number(name, value)
    if value.dim() != 0:
        raise ValueError(f"{name} must be a float or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value.detach() if value.requires_grad else value


def check_coefficient_devices(ce_weight, epg_weight, device: torch.device) -> None:
    for name, value in (("ce_weight", ce_weight), ("epg_weight", epg_weight)):
        if isinstance(value, Tensor) and value.device != device:
            raise ValueError(f"{name} must be on the input's device ({device}), got {value.device}")


def _check_reduction(reduction) -> Reduction:
    if reduction.__class__ is not str or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return _REDUCTIONS[reduction]


def _check_input(input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor of logits, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64 logits, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")


def _check_target(input: Tensor, target, device: torch.device) -> bool:
    """Returns True for class-probability targets, False for class indices."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != device:
        raise ValueError(f"target must be on the input's device ({device}), got {target.device}")
    dtype = target.dtype
    if dtype in INDEX_DTYPES:
        if input.dim() == 2:  # the common case without building Sizes
            if target.dim() == 1 and target.size(0) == input.size(0):
                return False
        elif target.shape == (input.shape[:1] + input.shape[2:] if input.dim() > 2 else ()):
            return False
        shape = input.shape
        expected = shape[:1] + shape[2:] if len(shape) >= 2 else torch.Size([])
        raise ValueError(
            f"target of class indices must have shape {tuple(expected)} for input of shape "
            f"{tuple(shape)}, got {tuple(target.shape)}"
        )
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"target must hold int64/int32 class indices or float class probabilities, got {dtype}")
    if target.shape != input.shape:
        raise ValueError(
            f"target of class probabilities must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "target: gradients with respect to probability targets are not supported; pass target.detach()"
        )
    return True


def _check_weight(weight, n_classes: int, device: torch.device) -> Optional[Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a 1-d tensor of per-class weights or None, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != n_classes:
        raise ValueError(f"weight must be a 1-d tensor of length C={n_classes}, got shape {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight must be on the input's device ({device}), got {weight.device}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight: gradients with respect to class weights are not supported "
            "(nor in nn.CrossEntropyLoss); pass weight.detach()"
        )
    return weight


def _rows(input: Tensor, target: Tensor, prob_target: bool):
    """(N, C, d1, ...) or (C,) input -> rows (R, C), targets (R,) or (R, C), the per-row shape."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0), torch.Size([])
    row_shape = input.shape[:1] + input.shape[2:]
    input = input.movedim(1, -1)
    target = target.movedim(1, -1) if prob_target else target
    n_classes = input.shape[-1]
    return (
        input.reshape(-1, n_classes),
        target.reshape(-1, n_classes) if prob_target else target.reshape(-1),
        row_shape,
    )


# Validated options of a call: (entropy_weight, label_smoothing, focal_gamma, ignore_index, reduction),
# in the order `_contract.pack` takes them after the coefficients. Modules keep theirs between calls.
Options = Tuple[float, float, float, int, int]


def check_options(entropy_weight, label_smoothing, focal_gamma, ignore_index, reduction) -> Options:
    if ignore_index.__class__ is not int:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        ignore_index = int(ignore_index)
    return (
        check_real_number("entropy_weight", entropy_weight),
        check_real_number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        check_real_number("focal_gamma", focal_gamma, low=0.0),
        ignore_index,
        int(_check_reduction(reduction)),
    )


def check_coefficients(ce_weight, epg_weight) -> Tuple[Coefficient, EpgCoefficient]:
    """The CE and EPG weights, checked (see `check_coefficient`); epg_weight may be
    ONE_MINUS_CE_WEIGHT with a tensor ce_weight."""
    if ce_weight.__class__ is float and epg_weight.__class__ is float and math.isfinite(ce_weight + epg_weight):
        return ce_weight, epg_weight  # the common case in one test (the sum of two finite floats is finite)
    a = check_coefficient("ce_weight", ce_weight)
    if epg_weight is ONE_MINUS_CE_WEIGHT and isinstance(a, Tensor):
        return a, epg_weight
    return a, check_coefficient("epg_weight", epg_weight)


def _check_coefficients(ce_weight, epg_weight, device: torch.device):
    a, b = check_coefficients(ce_weight, epg_weight)
    if a.__class__ is not float or b.__class__ is not float:
        check_coefficient_devices(a, b, device)
    return a, b


def is_plain_call(input, target) -> bool:
    """Whether a call is the common one: (N, C) float logits with C >= 1 and (N,) class indices
    on the same device (checked without building a Size)."""
    if (
        input.__class__ is not Tensor
        or target.__class__ is not Tensor
        or input.dtype not in FLOAT_DTYPES
        or target.dtype not in INDEX_DTYPES
    ):
        return False
    shape = input.shape
    return len(shape) == 2 and shape[1] > 0 and target.shape == shape[:1] and target.device == input.device


def prepare(
    input, target, weight, ce_weight, epg_weight, options: Options, need_entropy: bool
) -> Tuple[Call, Optional[torch.Size]]:
    """Validates the tensors and coefficients of a call and packs it with validated `options`
    (see the module docstring). Returns the call and the shape of a per-row result (None when
    the input is (N, C) already)."""
    if weight is None and is_plain_call(input, target):
        a, b = _check_coefficients(ce_weight, epg_weight, input.device)
        return (input, target, None, *pack(a, b, *options, False, need_entropy)), None
    return _prepare_checked(input, target, weight, ce_weight, epg_weight, options, need_entropy)


def _prepare_checked(input, target, weight, ce_weight, epg_weight, options, need_entropy):
    _check_input(input)
    device = input.device
    prob_target = _check_target(input, target, device)
    weight = _check_weight(weight, input.shape[1] if input.dim() >= 2 else input.shape[0], device)
    a, b = _check_coefficients(ce_weight, epg_weight, device)
    if prob_target and options[2] > 0:
        raise ValueError("focal_gamma > 0 is defined for class-index targets only, got class-probability targets")
    call = pack(a, b, *options, prob_target, need_entropy)
    if input.dim() == 2:
        if input.shape[1] == 0:
            raise ValueError("input must have at least one class (C >= 1), got C=0")
        return (input, target, weight, *call), None
    if input.shape[1 if input.dim() > 1 else 0] == 0:
        raise ValueError("input must have at least one class (C >= 1), got C=0")
    input, target, row_shape = _rows(input, target, prob_target)
    return (input, target, weight, *call), row_shape


def _check_linear_operands(input, linear_weight, linear_bias) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor of hidden states (..., H), got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (..., H), got a 0-d tensor")
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() != 2:
        shape = tuple(linear_weight.shape) if isinstance(linear_weight, Tensor) else type(linear_weight).__name__
        raise ValueError(f"linear_weight must be a 2-d tensor (V, H), got {shape}")
    if linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight must be (V, H) with H = input.shape[-1] = {input.shape[-1]}, got "
            f"{tuple(linear_weight.shape)}"
        )
    if linear_weight.shape[0] == 0:
        raise ValueError("linear_weight must have at least one class (V >= 1), got V=0")
    for name, other in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if other is None:
            continue
        if not isinstance(other, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(other).__name__}")
        if other.dtype != input.dtype:  # as F.linear
            raise TypeError(f"{name} must have the input's dtype ({input.dtype}), got {other.dtype}")
        if other.device != input.device:
            raise ValueError(f"{name} must be on the input's device ({input.device}), got {other.device}")
    if linear_bias is not None and tuple(linear_bias.shape) != (linear_weight.shape[0],):
        raise ValueError(
            f"linear_bias must have shape (V,) = ({linear_weight.shape[0]},), got {tuple(linear_bias.shape)}"
        )


def check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return chunk_size


def check_logit_transform(logit_scale, softcap) -> Tuple[float, float]:
    """(logit_scale, softcap) as the linear op takes them: softcap 0.0 for none."""
    scale = check_real_number("logit_scale", logit_scale)
    if scale == 0:
        raise ValueError("logit_scale must be a non-zero finite number, got 0")
    if softcap is None:
        return scale, 0.0
    cap = check_real_number("softcap", softcap)
    if cap <= 0:
        raise ValueError(f"softcap must be a positive number or None, got {cap}")
    return scale, cap


def prepare_linear(
    input, linear_weight, linear_bias, target, weight, ce_weight, epg_weight, options: Options, need_entropy: bool
):
    """Validates a call of the linear op (see the module docstring) and returns its rows: input
    (N, H), target (N,), the class weights, the packed hyperparameters (ce_weight_t, epg_weight_t,
    scalars, ignore_index, flags) and the shape of a per-row result."""
    _check_linear_operands(input, linear_weight, linear_bias)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must hold int64/int32 class indices, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"target must have shape input.shape[:-1] = {tuple(input.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.device != input.device:
        raise ValueError(f"target must be on the input's device ({input.device}), got {target.device}")
    hidden, n_classes = input.shape[-1], linear_weight.shape[0]
    weight = _check_weight(weight, n_classes, input.device)
    a, b = _check_coefficients(ce_weight, epg_weight, input.device)
    packed = pack(a, b, *options, False, need_entropy)
    return input.reshape(-1, hidden), target.reshape(-1), weight, packed, target.shape


def widen_targets(target: Tensor, ignore_index: int) -> Tensor:
    """int32 class indices as int64 when ignore_index does not fit in int32 (a comparison in
    int32 would wrap it around), for the Python backends."""
    if target.dtype == torch.int32 and not -(2**31) <= ignore_index < 2**31:
        return target.long()
    return target


def check_target_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Raises IndexError for an out-of-range class index, for the Python backends. Only where it
    costs no device sync (CPU tensors, outside tracing); on CUDA the kernels mark such rows NaN."""
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return
    if is_fake_tensor(target):
        return
    target = widen_targets(target, ignore_index)
    low, high = torch.stack(torch.aminmax(target)).tolist()
    if 0 <= low and high < n_classes:  # the common case, in one reduction
        return
    counted = target[target != ignore_index]
    bad = counted[(counted < 0) | (counted >= n_classes)]
    if bad.numel():
        raise IndexError(
            f"target: class index {int(bad[0])} is out of bounds for C={n_classes} "
            f"(and is not ignore_index={ignore_index})"
        )


__all__ = [
    "Call",
    "Options",
    "check_coefficient",
    "check_coefficient_devices",
    "check_coefficients",
    "check_options",
    "check_chunk_size",
    "check_logit_transform",
    "check_real_number",
    "check_target_range",
    "is_plain_call",
    "prepare",
    "prepare_linear",
    "widen_targets",
]
