"""Fused forward: one pass over each row gives the loss and every per-row statistic, and, when
the row is on chip and the upstream scale is known, the gradient too (1 read + 1 write).

A program owns BLOCK_R rows. ONE_TILE: the whole row is one [BLOCK_R, BLOCK_C] register tile and
each exponential is computed once, then reused for the gradient. Otherwise the row streams in
chunks of BLOCK_C with the online statistics of docs/math.md section 2 (statistics only; the
backward kernel recomputes the gradient from them).
"""

import triton
import triton.language as tl

from ._row_math import exp_shifted, grad_tile, merge_sums, row_grad_coefficients, row_results, safe_ref, tile_sums
from ._tiles import (
    as_acc,
    load_coefficients,
    load_row_targets,
    load_tile,
    load_weight_total,
    store_grad_tile,
    store_row_stats,
)


@triton.jit
def policy_loss_fwd_kernel(
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
    gamma: tl.float64,
    ignore_index,
    denom_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr,
    grad_stride,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_TILE: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    FOCAL: tl.constexpr,
    ENTROPY: tl.constexpr,
    ENTROPY_TERM: tl.constexpr,
    A_FROM_PTR: tl.constexpr,
    B_FROM_PTR: tl.constexpr,
    B_ONE_MINUS_A: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # offsets in int64: N * C may exceed 2^31
    a, b = load_coefficients(a_ptr, b_ptr, a_value, b_value, A_FROM_PTR, B_FROM_PTR, B_ONE_MINUS_A, ACC)
    beta, eps, gamma = as_acc(beta, ACC), as_acc(eps, ACC), as_acc(gamma, ACC)  # fp64 arguments
    w_total = load_weight_total(w_total_ptr, n_cols, HAS_WEIGHT and (SMOOTHING or PROB_TARGET), ACC)
    y, counted, bad, z_y, w_y = load_row_targets(
        x_ptr, x_stride, y_ptr, w_ptr, rows, row_ok, ignore_index, n_cols, PROB_TARGET, HAS_WEIGHT, ACC
    )
    zero = tl.zeros([BLOCK_R], ACC)
    wq_total = zero
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_C)
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
        m = safe_ref(tl.max(z, 1))
        r = m
        e = exp_shifted(z, m)
        s, t, s_other, u, pq, zs = tile_sums(z, e, m, r, cols, y, wq, wq_smooth, q, PROB_TARGET, SMOOTHING, ENTROPY)
        if PROB_TARGET:
            wq_total = tl.sum(wq, 1)
    else:
        m = zero + float("-inf")
        r = zero
        s, t, s_other, u, pq, zs = zero, zero, zero, zero, zero, zero
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
            m_new = tl.maximum(m, tl.max(z, 1))
            s, t, s_other, u, pq = merge_sums(m, m_new, s, t, s_other, u, pq)
            m = m_new
            if start == 0:  # the linear sum keeps the first chunk's max as its fixed reference
                r = safe_ref(m)
            e = exp_shifted(z, safe_ref(m))
            ds, dt, ds_other, du, dpq, dzs = tile_sums(
                z, e, safe_ref(m), r, cols, y, wq, wq_smooth, q, PROB_TARGET, SMOOTHING, ENTROPY
            )
            s, t, s_other, u, pq, zs = s + ds, t + dt, s_other + ds_other, u + du, pq + dpq, zs + dzs
            if PROB_TARGET:
                wq_total += tl.sum(wq, 1)
        m = safe_ref(m)

    loss, log_s, entropy, p_target, sample_weight, aux, logp_y = row_results(
        m,
        s,
        t,
        s_other,
        u,
        pq,
        zs,
        r,
        z_y,
        w_y,
        w_total,
        wq_total,
        a,
        b,
        beta,
        eps,
        gamma,
        n_cols,
        PROB_TARGET,
        SMOOTHING,
        FOCAL,
        ENTROPY,
    )
    row_weight = wq_total if PROB_TARGET else w_y
    store_row_stats(
        loss_ptr,
        stats_ptr,
        rows,
        row_ok,
        n_rows,
        counted,
        bad,
        loss,
        m + log_s,
        entropy,
        p_target,
        sample_weight,
        row_weight,
        aux,
        m,
        log_s,
    )

    if WRITE_GRAD:  # ONE_TILE only: z, e, w, q are still in registers
        g_row = tl.where(counted, 1.0, 0.0).to(ACC)
        if MEAN:
            g_row = g_row / tl.load(denom_ptr).to(ACC)  # the gradient of the "mean" loss
        p = e * (1.0 / s)[:, None]
        logp = (z - m[:, None]) - log_s[:, None]
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
            wq_total,
            PROB_TARGET,
            ENTROPY_TERM,
        )
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
