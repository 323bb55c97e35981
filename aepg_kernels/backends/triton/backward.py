"""Recompute backward: one read of the logits and one write of the gradient, from the per-row
statistics the forward saved and the per-row upstream gradient (reduction "none", rows too long
to keep on chip, or a forward that ran without a gradient)."""

import triton
import triton.language as tl

from ._row_math import LOG2E, grad_tile, log_p_target, row_grad_coefficients
from ._tiles import (
    as_acc,
    load_coefficients,
    load_row_stats,
    load_row_targets,
    load_tile,
    load_weight_total,
    store_grad_tile,
)


@triton.jit
def policy_loss_bwd_kernel(
    x_ptr,
    x_stride,
    y_ptr,
    q_ptr,
    q_stride,
    w_ptr,
    w_total_ptr,
    a_ptr,
    b_ptr,
    a_value: tl.float64,
    b_value: tl.float64,
    beta: tl.float64,
    eps: tl.float64,
    ignore_index,
    denom_ptr,
    stats_ptr,
    g_ptr,
    g_stride,
    grad_ptr,
    grad_stride,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ENTROPY_TERM: tl.constexpr,
    A_FROM_PTR: tl.constexpr,
    B_FROM_PTR: tl.constexpr,
    B_ONE_MINUS_A: tl.constexpr,
    MEAN: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    a, b = load_coefficients(a_ptr, b_ptr, a_value, b_value, A_FROM_PTR, B_FROM_PTR, B_ONE_MINUS_A, ACC)
    beta, eps = as_acc(beta, ACC), as_acc(eps, ACC)  # fp64 arguments
    w_total = load_weight_total(w_total_ptr, n_cols, HAS_WEIGHT and (SMOOTHING or PROB_TARGET), ACC)
    y, counted, bad, z_y, w_y = load_row_targets(
        x_ptr, x_stride, y_ptr, w_ptr, rows, row_ok, ignore_index, n_cols, PROB_TARGET, HAS_WEIGHT, ACC
    )
    entropy, p_target, sample_weight, row_weight, aux, m, log_s = load_row_stats(stats_ptr, rows, row_ok, n_rows)
    entropy, p_target, sample_weight = entropy.to(ACC), p_target.to(ACC), sample_weight.to(ACC)
    aux, m, log_s, row_weight = aux.to(ACC), m.to(ACC), log_s.to(ACC), row_weight.to(ACC)

    g_row = tl.load(g_ptr + rows * g_stride, mask=row_ok, other=0.0).to(ACC)  # g_stride 0: one scalar
    if MEAN:
        g_row = g_row / tl.load(denom_ptr).to(ACC)
    g_row = tl.where(counted, g_row, 0.0)
    logp_y = log_p_target(z_y, m, log_s, aux)  # aux = 1 - p_y for index targets
    c_p, c_e, c_w, g_y = row_grad_coefficients(
        a,
        b,
        beta,
        eps,
        n_cols,
        w_y,
        w_total,
        entropy,
        p_target,
        logp_y,
        aux,
        sample_weight,
        row_weight,
        PROB_TARGET,
        ENTROPY_TERM,
    )
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        z, w, q, wq, wq_smooth = load_tile(
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
            PROB_TARGET,
            HAS_WEIGHT,
            SMOOTHING,
            ACC,
        )
        logp = (z - m[:, None]) - log_s[:, None]
        p = tl.exp2(logp * LOG2E)
        grad = grad_tile(
            p,
            logp,
            entropy,
            c_p,
            c_e,
            c_w,
            g_y,
            g_row,
            cols,
            y,
            w,
            wq,
            wq_smooth,
            a,
            b,
            PROB_TARGET,
            SMOOTHING,
            ENTROPY_TERM,
        )
        store_grad_tile(grad_ptr, grad_stride, rows, row_ok, cols, n_cols, grad, counted, bad)
