"""Loads and stores shared by the Triton kernels: coefficients, per-row targets, tiles, stats."""

import triton
import triton.language as tl

from ..._contract import Stat

_LSE = tl.constexpr(Stat.LSE.value)
_ENTROPY = tl.constexpr(Stat.ENTROPY.value)
_P_TARGET = tl.constexpr(Stat.P_TARGET.value)
_SAMPLE_WEIGHT = tl.constexpr(Stat.SAMPLE_WEIGHT.value)
_ROW_WEIGHT = tl.constexpr(Stat.ROW_WEIGHT.value)
_AUX = tl.constexpr(Stat.AUX.value)
_ROW_MAX = tl.constexpr(Stat.ROW_MAX.value)
_LOG_SUM = tl.constexpr(Stat.LOG_SUM.value)


@triton.jit
def as_acc(value, ACC: tl.constexpr):
    """A scalar argument in the accumulation dtype. Float arguments are declared fp64 so that
    fp64 inputs see them exactly; fp32 kernels round them once here, not per element."""
    return (tl.zeros([], tl.float64) + value).to(ACC)


@triton.jit
def load_coefficient(ptr, value, FROM_PTR: tl.constexpr, ACC: tl.constexpr):
    """A loss coefficient given either as a float argument or as a 0-d device tensor."""
    if FROM_PTR:
        return tl.load(ptr).to(ACC)
    return as_acc(value, ACC)


@triton.jit
def load_coefficients(
    a_ptr,
    b_ptr,
    a_value,
    b_value,
    A_FROM_PTR: tl.constexpr,
    B_FROM_PTR: tl.constexpr,
    B_ONE_MINUS_A: tl.constexpr,
    ACC: tl.constexpr,
):
    """The CE and EPG weights (a, b); B_ONE_MINUS_A: b = 1 - a (aEPG with a tensor alpha)."""
    a = load_coefficient(a_ptr, a_value, A_FROM_PTR, ACC)
    if B_ONE_MINUS_A:
        b = 1.0 - a
    else:
        b = load_coefficient(b_ptr, b_value, B_FROM_PTR, ACC)
    return a, b


@triton.jit
def load_weight_total(w_total_ptr, n_cols, FROM_PTR: tl.constexpr, ACC: tl.constexpr):
    """sum_k w_k (a 0-d device tensor when weights are given; only smoothing needs it) or C."""
    if FROM_PTR:
        return tl.load(w_total_ptr).to(ACC)
    return tl.zeros([], ACC) + n_cols


@triton.jit
def load_row_targets(
    x_ptr,
    x_stride,
    y_ptr,
    w_ptr,
    rows,
    row_ok,
    ignore_index,
    n_cols,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per row: the target column (-1 when none), counted / out-of-range masks, the target logit
    in full precision and the target's class weight. Never reads outside the row."""
    if PROB_TARGET:
        y = tl.full(rows.shape, -1, tl.int64)
        counted = row_ok
        bad = row_ok & (y >= 0)  # all False
        z_y = tl.zeros(rows.shape, ACC)
        w_y = tl.full(rows.shape, 1.0, ACC)
        return y, counted, bad, z_y, w_y
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    counted = row_ok & (y != ignore_index)
    in_range = (y >= 0) & (y < n_cols)
    bad = counted & ~in_range
    ok = counted & in_range
    y = tl.where(ok, y, -1)
    z_y = tl.load(x_ptr + rows * x_stride + y, mask=ok, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_y = tl.load(w_ptr + y, mask=ok, other=0.0).to(ACC)
    else:
        w_y = tl.where(ok, 1.0, 0.0).to(ACC)
    return y, counted, bad, z_y, w_y


@triton.jit
def load_tile(
    x_ptr,
    x_stride,
    q_ptr,
    q_stride,
    w_ptr,
    rows,
    row_ok,
    cols,
    n_cols,
    eps,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ACC: tl.constexpr,
):
    """Logits (-inf outside the row), class weights w, and for probability targets q, w*q and
    w*q' with q' = (1 - eps) q + eps / C; for index targets with smoothing wq_smooth = w.
    Every weight-like tile is 0 outside the row, so padded lanes add nothing."""
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    z = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        w = tl.where(col_ok, 1.0, 0.0).to(ACC)[None, :]
    q = w
    wq = w
    wq_smooth = w
    if PROB_TARGET:
        q = tl.load(q_ptr + rows[:, None] * q_stride + cols[None, :], mask=mask, other=0.0).to(ACC)
        wq = w * q
        wq_smooth = (1 - eps) * wq + eps / n_cols * w
    return z, w, q, wq, wq_smooth


@triton.jit
def store_grad_tile(grad_ptr, grad_stride, rows, row_ok, cols, n_cols, grad, counted, bad):
    """Writes a gradient tile: zeros for ignored rows, NaN for out-of-range targets."""
    grad = tl.where(bad[:, None], float("nan"), tl.where(counted[:, None], grad, 0.0))
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_row_stats(
    loss_ptr,
    stats_ptr,
    rows,
    row_ok,
    n_rows,
    counted,
    bad,
    loss,
    lse,
    entropy,
    p_target,
    sample_weight,
    row_weight,
    aux,
    row_max,
    log_s,
):
    """Writes every per-row output: ignored rows get 0 loss and weight, out-of-range targets NaN."""
    nan = float("nan")
    loss = tl.where(bad, nan, tl.where(counted, loss, 0.0))
    p_target = tl.where(bad, nan, tl.where(counted, p_target, 0.0))
    sample_weight = tl.where(bad, nan, tl.where(counted, sample_weight, 0.0))
    row_weight = tl.where(counted, row_weight, 0.0)
    aux = tl.where(counted, aux, 0.0)
    dt = stats_ptr.dtype.element_ty
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_ok)
    tl.store(stats_ptr + _LSE * n_rows + rows, lse.to(dt), mask=row_ok)
    tl.store(stats_ptr + _ENTROPY * n_rows + rows, entropy.to(dt), mask=row_ok)
    tl.store(stats_ptr + _P_TARGET * n_rows + rows, p_target.to(dt), mask=row_ok)
    tl.store(stats_ptr + _SAMPLE_WEIGHT * n_rows + rows, sample_weight.to(dt), mask=row_ok)
    tl.store(stats_ptr + _ROW_WEIGHT * n_rows + rows, row_weight.to(dt), mask=row_ok)
    tl.store(stats_ptr + _AUX * n_rows + rows, aux.to(dt), mask=row_ok)
    tl.store(stats_ptr + _ROW_MAX * n_rows + rows, row_max.to(dt), mask=row_ok)
    tl.store(stats_ptr + _LOG_SUM * n_rows + rows, log_s.to(dt), mask=row_ok)


@triton.jit
def load_row_stats(stats_ptr, rows, row_ok, n_rows):
    """The saved statistics the backward needs (see `store_row_stats`)."""
    entropy = tl.load(stats_ptr + _ENTROPY * n_rows + rows, mask=row_ok, other=0.0)
    p_target = tl.load(stats_ptr + _P_TARGET * n_rows + rows, mask=row_ok, other=0.0)
    sample_weight = tl.load(stats_ptr + _SAMPLE_WEIGHT * n_rows + rows, mask=row_ok, other=0.0)
    row_weight = tl.load(stats_ptr + _ROW_WEIGHT * n_rows + rows, mask=row_ok, other=0.0)
    aux = tl.load(stats_ptr + _AUX * n_rows + rows, mask=row_ok, other=0.0)
    row_max = tl.load(stats_ptr + _ROW_MAX * n_rows + rows, mask=row_ok, other=0.0)
    log_s = tl.load(stats_ptr + _LOG_SUM * n_rows + rows, mask=row_ok, other=0.0)
    return entropy, p_target, sample_weight, row_weight, aux, row_max, log_s
