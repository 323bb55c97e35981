"""Host side of the Triton backend: tile choice and kernel launches. No host synchronisation.

A "mean" forward is three launches: the denominator, the row kernel, the reduced loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

import torch
import triton
import triton.language as tl

from ..._contract import NUM_STATS, ONE_MINUS_CE_WEIGHT, Flag, LossSpec, Reduction, accumulation_dtype
from ..._spec import widen_targets
from .backward import policy_loss_bwd_kernel
from .forward import policy_loss_fwd_kernel
from .reduce import denominator_kernel, reduce_rows_kernel
from .scale import scale_grad_kernel


@dataclass
class TileConfig:
    """Tiling policy; tests shrink it to reach the chunked path with small C."""

    max_one_tile_cols: int = 16384  # a row of up to this many classes stays in registers
    chunk_cols: int = 4096  # chunk width of the streamed (large-C) path
    tile_elements: int = 4096  # elements per program for small C (several rows each)
    max_rows_per_program: int = 64
    scale_block: int = 4096
    reduce_block: int = 1024  # rows per step of the one-program reductions


CONFIG = TileConfig()


def fits_on_chip(n_cols: int) -> bool:
    return triton.next_power_of_2(n_cols) <= CONFIG.max_one_tile_cols


def _tiling(n_rows: int, n_cols: int):
    if fits_on_chip(n_cols):
        block_c = triton.next_power_of_2(n_cols)
        block_r = max(
            1, min(CONFIG.tile_elements // block_c, CONFIG.max_rows_per_program, triton.next_power_of_2(n_rows))
        )
    else:
        block_c, block_r = CONFIG.chunk_cols, 1
    elements = block_r * block_c
    num_warps = 4 if elements <= 4096 else 8 if elements <= 16384 else 16
    return block_r, block_c, num_warps


def _acc(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _coefficient_args(value, dummy: torch.Tensor):
    """(pointer, float value, from_pointer) for a coefficient given as float or 0-d tensor."""
    if isinstance(value, torch.Tensor):
        return value, 0.0, True
    return dummy, float(value), False


def _common_args(logits, target, weight, spec: LossSpec, w_total):
    dummy = logits
    a_ptr, a_value, a_from_ptr = _coefficient_args(spec.ce_weight, dummy)
    one_minus = spec.epg_weight is ONE_MINUS_CE_WEIGHT
    b_ptr, b_value, b_from_ptr = _coefficient_args(0.0 if one_minus else spec.epg_weight, dummy)
    q, q_stride = (target, target.stride(0)) if spec.prob_target else (dummy, 0)
    y = dummy if spec.prob_target else target
    args = (
        logits,
        logits.stride(0),
        y,
        q,
        q_stride,
        dummy if weight is None else weight,
        dummy if w_total is None else w_total,
        a_ptr,
        b_ptr,
        a_value,
        b_value,
        spec.entropy_weight,
        spec.label_smoothing,
    )
    flags = dict(
        PROB_TARGET=spec.prob_target,
        HAS_WEIGHT=weight is not None,
        SMOOTHING=spec.label_smoothing > 0,
        A_FROM_PTR=a_from_ptr,
        B_FROM_PTR=b_from_ptr,
        B_ONE_MINUS_A=one_minus,
        MEAN=spec.reduction == Reduction.MEAN,
        ACC=_acc(logits.dtype),
    )
    return args, flags


def _weight_total(weight: Optional[torch.Tensor], spec: LossSpec, dtype: torch.dtype):
    needed = weight is not None and (spec.label_smoothing > 0 or spec.prob_target)
    return cast(torch.Tensor, weight).to(dtype).sum() if needed else None  # needed: weight is not None


def _rows(logits, target, weight, spec: LossSpec):
    """The kernels' layout: unit column stride, contiguous targets and weights; int32 targets
    widened when ignore_index does not fit in int32 (it would wrap around in the comparison)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    target = target.contiguous() if spec.prob_target else widen_targets(target.contiguous(), spec.ignore_index)
    return logits, target, None if weight is None else weight.contiguous()


def _denominator(target, weight, spec: LossSpec, n_cols: int, acc: torch.dtype):
    denom = torch.empty((), dtype=acc, device=target.device)
    denominator_kernel[(1,)](
        target,
        target if weight is None else weight,
        denom,
        target.shape[0],
        n_cols,
        spec.ignore_index,
        PROB_TARGET=spec.prob_target,
        HAS_WEIGHT=weight is not None,
        BLOCK=CONFIG.reduce_block,
        ACC=_acc(acc),
    )
    return denom


def _reduce(row_loss, denom, spec: LossSpec, dtype: torch.dtype):
    if spec.reduction == Reduction.NONE:
        return row_loss.to(dtype)
    loss = torch.empty((), dtype=dtype, device=row_loss.device)
    reduce_rows_kernel[(1,)](
        row_loss,
        denom,
        loss,
        row_loss.shape[0],
        MEAN=spec.reduction == Reduction.MEAN,
        BLOCK=CONFIG.reduce_block,
        ACC=_acc(row_loss.dtype),
    )
    return loss


def forward(logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags, out=None):
    """The contract's forward (aepg_kernels/_contract.py): (loss, stats, grad, denominator), the
    gradient of the reduced loss for an upstream gradient of 1 when flags has WRITE_GRAD (into
    `out`, a contiguous tensor like the logits, when given)."""
    spec = LossSpec.unpack(ce_weight_t, epg_weight_t, scalars, ignore_index, flags)
    write_grad = bool(flags & Flag.WRITE_GRAD)
    logits, target, weight = _rows(logits, target, weight, spec)
    n_rows, n_cols = logits.shape
    acc = accumulation_dtype(logits.dtype)
    row_loss = torch.empty(n_rows, dtype=acc, device=logits.device)
    stats = torch.empty(NUM_STATS, n_rows, dtype=acc, device=logits.device)
    grad = _grad_buffer(out, logits) if write_grad else logits.new_empty((0,))
    if write_grad and (spec.reduction == Reduction.NONE or not fits_on_chip(n_cols)):
        raise ValueError(f"the fused gradient needs a reduced loss and a row on chip, got C={n_cols}")
    denom = _denominator(target, weight, spec, n_cols, acc)
    if n_rows:
        block_r, block_c, num_warps = _tiling(n_rows, n_cols)
        args, kernel_flags = _common_args(logits, target, weight, spec, _weight_total(weight, spec, acc))
        policy_loss_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            *args,
            spec.focal_gamma,
            spec.ignore_index,
            denom,
            row_loss,
            stats,
            grad if write_grad else logits,
            n_cols if write_grad else 0,
            n_rows,
            n_cols,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            ONE_TILE=fits_on_chip(n_cols),
            FOCAL=spec.focal_gamma > 0,
            ENTROPY=bool(flags & Flag.NEED_ENTROPY) or spec.has_entropy_term,
            ENTROPY_TERM=spec.has_entropy_term,
            WRITE_GRAD=write_grad,
            num_warps=num_warps,
            **kernel_flags,
        )
    return _reduce(row_loss, denom, spec, logits.dtype), stats, grad, denom


def _grad_buffer(out, logits):
    if out is None:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous tensor like the logits {tuple(logits.shape)} {logits.dtype}, got "
            f"{tuple(out.shape)} {out.dtype}"
        )
    return out


def backward(
    grad_loss, logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags, stats, denom, out=None
):
    """dL/dlogits from the saved stats (into `out` when given); grad_loss is 0-d ("mean"/"sum")
    or (R,) ("none")."""
    spec = LossSpec.unpack(ce_weight_t, epg_weight_t, scalars, ignore_index, flags)
    logits, target, weight = _rows(logits, target, weight, spec)
    n_rows, n_cols = logits.shape
    grad = _grad_buffer(out, logits)
    if n_rows == 0:
        return grad
    block_r, block_c, num_warps = _tiling(n_rows, n_cols)
    block_c = min(block_c, CONFIG.chunk_cols)
    acc = accumulation_dtype(logits.dtype)
    args, kernel_flags = _common_args(logits, target, weight, spec, _weight_total(weight, spec, acc))
    g_stride = grad_loss.stride(0) if grad_loss.dim() else 0
    policy_loss_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
        *args,
        spec.ignore_index,
        denom,
        stats,
        grad_loss,
        g_stride,
        grad,
        n_cols,
        n_rows,
        n_cols,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        ENTROPY_TERM=spec.has_entropy_term,
        num_warps=num_warps,
        **kernel_flags,
    )
    return grad


def scale_(grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """grad *= grad_loss in place, skipped on the device when grad_loss == 1."""
    numel = grad.numel()
    if numel == 0:
        return
    block = CONFIG.scale_block
    scale_grad_kernel[(triton.cdiv(numel, block),)](
        grad, grad_loss, numel, BLOCK=block, ACC=_acc(grad.dtype), num_warps=8
    )
