"""Shared constants and argument validation: the one place every backend agrees on.

`canonicalize` turns the public arguments of `policy_loss` into a `LossSpec` and a 2-D view
(rows x classes) of the logits, raising a clear error for every bad input. Everything below
it (eager reference, kernels, custom op) can then assume well-formed, 2-D, contiguous-rows data.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

Coefficient = Union[float, torch.Tensor]


class Reduction(enum.IntEnum):
    """Same numbering as ATen's at::Reduction."""

    NONE = 0
    MEAN = 1
    SUM = 2


class Stat(enum.IntEnum):
    """Rows of the per-row statistics tensor of shape (NUM_STATS, n_rows) the kernels write."""

    LSE = 0            # log-sum-exp of the row
    ENTROPY = 1        # H(p) (NaN when the caller did not ask for it)
    P_TARGET = 2       # p_y (index targets) or sum_k q_k p_k (probability targets)
    SAMPLE_WEIGHT = 3  # per-row factor of (p - e_y) in the gradient
    ROW_WEIGHT = 4     # w_y for a counted row, 0 when ignored; sum_k w_k q_k for probability targets
    AUX = 5            # 1 - p_y, accurate near p_y = 1 (index); sum_k w_k q_k p_k (probability)
    ROW_MAX = 6        # the row max m (0 for a row of -inf), so that log p = (z - m) - log S
    LOG_SUM = 7        # log S = log sum_k exp(z_k - m): backward recomputes p without cancellation


NUM_STATS = len(Stat)
BACKENDS = ("auto", "triton", "cuda", "cpu", "eager")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LossSpec:
    """Hyper-parameters of one call, validated. ce/epg weights may be 0-d tensors."""

    ce_weight: Coefficient = 1.0
    epg_weight: Coefficient = 0.0
    entropy_weight: float = 0.0
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    ignore_index: int = -100
    reduction: Reduction = Reduction.MEAN
    prob_target: bool = False

    @property
    def has_entropy_term(self) -> bool:
        return self.entropy_weight != 0.0

    def coefficient_args(self):
        """(a tensor or None, b tensor or None, a float, b float): the custom ops' form of the
        coefficients, each either a 0-d tensor (its float then unused) or a float."""
        a, b = self.ce_weight, self.epg_weight
        a_t, a = (a, 0.0) if isinstance(a, torch.Tensor) else (None, float(a))
        b_t, b = (b, 0.0) if isinstance(b, torch.Tensor) else (None, float(b))
        return a_t, b_t, a, b


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp16/bf16/fp32, fp64 math for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_real_number(name: str, value, *, low=-math.inf, high=math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not (low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value}")
    return value


def _check_coefficient(name: str, value, device: torch.device) -> Coefficient:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} must be on the input's device ({device}), got {value.device}")
        return value.detach()
    return _check_real_number(name, value)


def _check_reduction(reduction) -> Reduction:
    names = {"none": Reduction.NONE, "mean": Reduction.MEAN, "sum": Reduction.SUM}
    if not isinstance(reduction, str) or reduction not in names:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return names[reduction]


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def _check_input(input) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor of logits, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64 logits, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")


def _check_target(input: torch.Tensor, target) -> bool:
    """Returns True for class-probability targets, False for class indices."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target must be on the input's device ({input.device}), got {target.device}")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError("target of class probabilities must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        if target.dtype not in FLOAT_DTYPES:
            raise TypeError(f"target probabilities must be a float dtype, got {target.dtype}")
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError("target: gradients with respect to probability targets are not supported; "
                             "pass target.detach()")
        return True
    if target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"target must hold int64/int32 class indices or float class probabilities, "
                        f"got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"target of class indices must have shape {tuple(expected)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return False


def _check_weight(weight, input: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a 1-d tensor of per-class weights or None, got {type(weight).__name__}")
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if weight.dim() != 1 or weight.shape[0] != n_classes:
        raise ValueError(f"weight must be a 1-d tensor of length C={n_classes}, got shape {tuple(weight.shape)}")
    if weight.device != input.device:
        raise ValueError(f"weight must be on the input's device ({input.device}), got {weight.device}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight: gradients with respect to class weights are not supported "
                         "(nor in nn.CrossEntropyLoss); pass weight.detach()")
    return weight.contiguous()  # the kernels index classes without a stride


def _check_target_range(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raises IndexError for an out-of-range class index. Only where it costs no device sync
    (CPU tensors, outside tracing); on CUDA the kernels mark such rows NaN instead."""
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.stack(torch.aminmax(target)).tolist()
    if 0 <= low and high < n_classes:  # the common case, in one reduction
        return
    counted = target[target != ignore_index]
    bad = counted[(counted < 0) | (counted >= n_classes)]
    if bad.numel():
        raise IndexError(f"target: class index {int(bad[0])} is out of bounds for C={n_classes} "
                         f"(and is not ignore_index={ignore_index})")


def canonicalize(input, target, *, weight, ce_weight, epg_weight, entropy_weight, label_smoothing,
                 focal_gamma, ignore_index, reduction):
    """Validates every argument and flattens (N, C, d1, ...) to rows of C classes.

    Returns (logits_2d, target_rows, weight, spec, row_shape) where target_rows is (R,) for
    indices or (R, C) for probabilities and row_shape is the shape of a per-row result.
    """
    _check_input(input)
    prob_target = _check_target(input, target)
    weight = _check_weight(weight, input)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    spec = LossSpec(
        ce_weight=_check_coefficient("ce_weight", ce_weight, input.device),
        epg_weight=_check_coefficient("epg_weight", epg_weight, input.device),
        entropy_weight=_check_real_number("entropy_weight", entropy_weight),
        label_smoothing=_check_real_number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        focal_gamma=_check_real_number("focal_gamma", focal_gamma, low=0.0),
        ignore_index=ignore_index,
        reduction=_check_reduction(reduction),
        prob_target=prob_target,
    )
    if prob_target and spec.focal_gamma > 0:
        raise ValueError("focal_gamma > 0 is defined for class-index targets only, "
                         "got class-probability targets")

    if input.dim() == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
        row_shape = torch.Size([])
    else:
        row_shape = input.shape[:1] + input.shape[2:]
    if input.dim() > 2:  # (N, C, d1, ...) -> (N * d1 * ..., C)
        input = input.movedim(1, -1)
        target = target.movedim(1, -1) if prob_target else target
    n_classes = input.shape[-1]
    if n_classes == 0:
        raise ValueError("input must have at least one class (C >= 1), got C=0")
    logits = input.reshape(-1, n_classes)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if prob_target:
        target = target.reshape(-1, n_classes).contiguous()
    else:
        target = target.reshape(-1).contiguous()
        if target.dtype == torch.int32 and not -2**31 <= ignore_index < 2**31:
            target = target.long()  # compared in int32, a wide ignore_index would wrap around
        _check_target_range(target, n_classes, ignore_index)
    return logits, target, weight, spec, row_shape
