"""Per-row math shared by the Triton forward and backward kernels (docs/math.md sections 1 and 2).

Every formula of the loss family lives here once for the Triton backend:
  * `tile_sums`: a tile's contribution to the running row statistics,
  * `merge_sums`: the online rescale when the running max moves (chunked rows),
  * `row_results`: loss, entropy, p_target, sample weight from the finished statistics,
  * `row_grad_coefficients` and `grad_tile`: the gradient from p, log p and those results.
Tiles are [BLOCK_R, BLOCK_C]; per-row values are [BLOCK_R] vectors.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def exp_shifted(z, m_ref):
    """exp(z - m) as one FMA and an exp2; -inf entries give exactly 0."""
    return tl.exp2((z - m_ref[:, None]) * LOG2E)


@triton.jit
def safe_ref(m):
    """A finite reference to subtract: the running max, or 0 while a row has seen only -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def tile_sums(
    z,
    e,
    m_ref,
    r_ref,
    cols,
    y,
    wq,
    wq_smooth,
    q,
    PROB_TARGET: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    """Sums of one tile relative to the row's max m_ref (exponential sums) and its fixed
    reference r_ref (the linear smoothing sum). Masked classes (z = -inf, e = 0) add 0."""
    s = tl.sum(e, 1)
    t = tl.zeros_like(s)
    if ENTROPY:
        t = tl.sum(tl.where(e > 0, (z - m_ref[:, None]) * e, 0.0), 1)
    s_other = tl.zeros_like(s)  # index targets: sum over k != y, for an exact 1 - p_y
    u = tl.zeros_like(s)  # probability targets: sum_k w_k q_k e_k
    pq = tl.zeros_like(s)  # probability targets: sum_k q_k e_k
    if PROB_TARGET:
        u = tl.sum(wq * e, 1)
        pq = tl.sum(q * e, 1)
    else:
        s_other = tl.sum(tl.where(cols[None, :] == y[:, None], 0.0, e), 1)
    zs = tl.zeros_like(s)  # sum_k wq'_k (z_k - r) with 0 * log 0 = 0
    if SMOOTHING or PROB_TARGET:
        zs = tl.sum(tl.where(wq_smooth != 0, wq_smooth * (z - r_ref[:, None]), 0.0), 1)
    return s, t, s_other, u, pq, zs


@triton.jit
def merge_sums(m_old, m_new, s, t, s_other, u, pq):
    """Rescales the running exponential sums from max m_old to m_new (docs/math.md section 2):
    S <- e^d S, T <- e^d (T + d S), d = m_old - m_new. Rows that saw only -inf are all zero."""
    seen = m_old != float("-inf")
    d = tl.where(seen, m_old - safe_ref(m_new), 0.0)
    f = tl.where(seen, tl.exp2(d * LOG2E), 0.0)
    t = f * (t + d * s)
    return f * s, t, f * s_other, f * u, f * pq


@triton.jit
def log1p(x):
    """log(1 + x) without libdevice (the interpreter has none): exact where 1 + x rounds to 1."""
    u = 1 + x
    return tl.where(u == 1, x, tl.log(u) * (x / tl.where(u == 1, 1.0, u - 1)))


@triton.jit
def log_p_target(z_y, m_ref, log_s, om):
    """log p_y: from 1 - p_y when p_y > 1/2 (confident rows, where (z_y - m) - log S would lose
    the digits of a log S close to 0), otherwise directly."""
    direct = (z_y - m_ref) - log_s
    return tl.where(om < 0.5, log1p(-tl.where(om < 0.5, om, 0.0)), direct)


@triton.jit
def focal_factors(om, p_y, logp_y, gamma):
    """(1 - p)^g and the focal sample weight (1-p)^g (1 - g p log p / (1 - p)); gamma > 0."""
    om_pow = tl.exp2(gamma * tl.log2(om))  # om = 0 gives exp2(-inf) = 0
    ratio = tl.where(om > 0, logp_y / om, -1.0)
    return om_pow, om_pow * (1 - gamma * p_y * ratio)


@triton.jit
def row_results(
    m_ref,
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
    PROB_TARGET: tl.constexpr,
    SMOOTHING: tl.constexpr,
    FOCAL: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    """Loss (before row masking), log S, entropy, p_target, sample weight, AUX and log p_y.

    m_ref: safe row max, r: reference of zs, z_y: full-precision target logit, w_y: weight of
    the target class, w_total: sum_k w_k, wq_total: sum_k w_k q_k (probability targets).
    Logs are taken relative to m_ref so that shifted rows (z ~ 1e4) lose nothing."""
    log_s = tl.log2(s) * LN2
    entropy = tl.zeros_like(s) + float("nan")
    if ENTROPY:
        entropy = log_s - t / s
    inv_s = 1.0 / s
    if PROB_TARGET:
        wq_smooth_total = (1 - eps) * wq_total + eps / n_cols * w_total
        ce = wq_smooth_total * ((m_ref - r) + log_s) - zs
        r_wq = u * inv_s  # sum_k w_k q_k p_k
        p_target = pq * inv_s
        loss = a * ce + b * (wq_total - r_wq)
        if ENTROPY:
            loss += beta * wq_total * entropy
        sample_weight = a * (1 - eps) + b * p_target
        return loss, log_s, entropy, p_target, sample_weight, r_wq, tl.zeros_like(s)
    om = s_other * inv_s  # 1 - p_y, exact near p_y = 1
    logp_y = log_p_target(z_y, m_ref, log_s, om)
    p_y = tl.exp2(logp_y * LOG2E)
    ce = -logp_y
    w_focal = tl.full(ce.shape, 1.0, ce.dtype)
    if FOCAL:
        om_pow, w_focal = focal_factors(om, p_y, logp_y, gamma)
        ce = om_pow * ce
    loss = a * (1 - eps) * ce + b * om
    if ENTROPY:
        loss += beta * entropy
    loss = w_y * loss
    if SMOOTHING:
        loss += a * eps / n_cols * (w_total * ((m_ref - r) + log_s) - zs)
    sample_weight = a * (1 - eps) * w_focal + b * p_y
    return loss, log_s, entropy, p_y, sample_weight, om, logp_y


@triton.jit
def row_grad_coefficients(
    a,
    b,
    beta,
    eps,
    n_cols,
    w_y,
    w_total,
    entropy,
    p_y,
    logp_y,
    aux,
    sample_weight,
    wq_total,
    PROB_TARGET: tl.constexpr,
    ENTROPY_TERM: tl.constexpr,
):
    """Per-row coefficients of dL/dz (docs/math.md section 1); aux is 1 - p_y (index targets) or
    sum_k w_k q_k p_k (probability targets), as `row_results` returns it.

    index:  G_k = c_p p_k - c_e p_k (log p_k + H) - c_w w_k, and G_y = g_y computed directly
            from 1 - p_y so that the true-class term never cancels near p_y = 1.
    prob:   G_k = c_p p_k - c_e p_k (log p_k + H) - a w_k q'_k - b w_k q_k p_k."""
    if PROB_TARGET:
        c_p = a * ((1 - eps) * wq_total + eps / n_cols * w_total) + b * aux
        c_e = beta * wq_total
        return c_p, c_e, tl.zeros_like(c_p), tl.zeros_like(c_p)
    c_w = tl.zeros_like(w_y) + a * eps / n_cols  # per row: every return path has the same types
    c_p = w_y * sample_weight + c_w * w_total
    c_e = w_y * beta
    g_y = -w_y * sample_weight * aux + c_w * (w_total * p_y - w_y)
    if ENTROPY_TERM:
        g_y -= c_e * tl.where(p_y > 0, p_y * (logp_y + entropy), 0.0)
    return c_p, c_e, c_w, g_y


@triton.jit
def grad_tile(
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
    PROB_TARGET: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ENTROPY_TERM: tl.constexpr,
):
    """g_row * dL/dz for a tile, from p, log p and the row coefficients."""
    grad = c_p[:, None] * p
    if ENTROPY_TERM:
        grad -= c_e[:, None] * tl.where(p > 0, p * (logp + entropy[:, None]), 0.0)
    if PROB_TARGET:
        grad -= a * wq_smooth + b * wq * p
    else:
        if SMOOTHING:
            grad -= c_w[:, None] * w
        grad = tl.where(cols[None, :] == y[:, None], g_y[:, None], grad)
    return g_row[:, None] * grad
