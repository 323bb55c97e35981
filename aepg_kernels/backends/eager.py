"""The eager PyTorch composite: the mathematical reference of every backend.

Plain differentiable PyTorch, in the accumulation dtype (fp32, or fp64 for fp64 inputs), written
for clarity and stability rather than speed. It is `backend="eager"`, runs on any device, and is
the parity target of the kernels in the tests. The formulas and their stable forms are in
docs/math.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._contract import NUM_STATS, ONE_MINUS_CE_WEIGHT, LossSpec, Reduction, Stat, accumulation_dtype
from .._spec import check_target_range, widen_targets


def _coefficient(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, torch.Tensor) else value


def coefficients(spec: LossSpec, dtype: torch.dtype):
    """(a, b) of a call in the accumulation dtype: floats, or tensors, b = 1 - a for aEPG."""
    a = _coefficient(spec.ce_weight, dtype)
    return a, 1 - a if spec.epg_weight is ONE_MINUS_CE_WEIGHT else _coefficient(spec.epg_weight, dtype)


def _index_masks(target: torch.Tensor, n_classes: int, ignore_index: int):
    """(counted, in_range, y) for class-index targets: rows not ignored, rows whose index is a
    class, and an index safe to read (0 where the row is ignored or out of range)."""
    counted = target != ignore_index
    in_range = (target >= 0) & (target < n_classes)
    return counted, in_range, torch.where(counted & in_range, target, 0).long()


def counted_row_weight(
    target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, dtype: torch.dtype
) -> torch.Tensor:
    """w_{y_i} for counted rows and 0 for ignored ones: the terms of the "mean" denominator.
    Out-of-range indices are treated as counted (their loss is NaN) and never read."""
    if weight is None:
        return (target != ignore_index).to(dtype)
    counted, _, y = _index_masks(target, weight.shape[0], ignore_index)
    return torch.where(counted, weight.to(dtype)[y], 0)


def mean_denominator(
    target: torch.Tensor, weight: Optional[torch.Tensor], spec: LossSpec, dtype: torch.dtype
) -> torch.Tensor:
    """What "mean" divides the summed loss by, as nn.CrossEntropyLoss: the summed weights of
    the counted rows for index targets, the number of rows for probability targets."""
    if spec.prob_target:
        return torch.full((), target.shape[0], dtype=dtype, device=target.device)
    return counted_row_weight(target, weight, spec.ignore_index, dtype).sum()


def reduce_rows(row_loss: torch.Tensor, denominator: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == Reduction.NONE:
        return row_loss
    total = row_loss.sum()
    return total / denominator if reduction == Reduction.MEAN else total


def _entropy(z: torch.Tensor, p: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # H = lse - sum_k p_k z_k; masked classes (z = -inf, p = 0) contribute 0, never 0 * inf.
    z_finite = torch.where(z == float("-inf"), 0.0, z)
    return lse - (p * z_finite).sum(-1)


def _poison_out_of_range(z: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Rows whose class index is out of range (and not ignored) become NaN, loss and gradient,
    as in the kernels: visible, and never an out-of-bounds read. (An addition, not a select,
    so that the NaN reaches the gradient too.)"""
    counted, in_range, _ = _index_masks(target, z.shape[-1], ignore_index)
    bad = counted & ~in_range
    return z + torch.where(bad, float("nan"), 0.0).to(z.dtype).unsqueeze(-1)


def _focal_sample_weight(p_y, om, logp_y, gamma: float):
    """w_f = (1-p)^g - g (1-p)^(g-1) p log p, written as (1-p)^g (1 - g p log(p) / (1-p))."""
    if gamma == 0.0:
        return torch.ones_like(p_y)
    ratio = torch.where(om > 0, logp_y / om, -1.0)
    return om.pow(gamma) * (1 - gamma * p_y * ratio)


def _one_minus(om, p_y):
    """1 - p_y with the value of om (the other classes' mass, exact near p_y = 1) and the
    gradient of -p_y, p_y (p - e_y). Differentiating om itself gives p_k - om p_k for k != y, which
    cancels to nothing when p_y is small (om ~ 1); p_y.detach() - p_y is exactly 0 in value."""
    return om.detach() + (p_y.detach() - p_y)


def _index_target_rows(z, logp, p, entropy, target, weight, spec: LossSpec, a, b):
    n_classes = z.shape[-1]
    counted, in_range, y = _index_masks(target, n_classes, spec.ignore_index)
    y = y.unsqueeze(-1)
    is_y = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, y, True)
    om = torch.where(is_y, 0.0, p).sum(-1)  # 1 - p_y as the other classes' mass: exact near p_y = 1
    logp_y = stable_log_p_target(om, logp.gather(-1, y).squeeze(-1))
    w = None if weight is None else weight.to(z.dtype)
    w_y = torch.ones_like(om) if w is None else w[y.squeeze(-1)]
    smooth = None
    if spec.label_smoothing > 0:  # weight 0 on a masked class: 0 * log 0 = 0, as everywhere else
        smooth = -(logp if w is None else torch.where(w != 0, logp * w, 0.0)).sum(-1)
    return index_rows_from_sums(logp_y, om, entropy, w_y, smooth, counted, counted & ~in_range, n_classes, spec, a, b)


def stable_log_p_target(om, logp_y):
    """log p_y from 1 - p_y (om) for confident rows, where log-softmax loses the digits of
    log S ~ 0 (the inner where keeps the unused branch's gradient finite)."""
    return torch.where(om < 0.5, torch.log1p(-torch.where(om < 0.5, om, 0.0)), logp_y)


def index_rows_from_sums(logp_y, om, entropy, w_y, smooth, counted, bad, n_classes: int, spec: LossSpec, a, b):
    """The per-row loss and stats of index targets from the rows' class sums: log p_y, om = 1 - p_y
    (the other classes' mass), H(p), w_y and smooth = -sum_k w_k log p_k (None without smoothing).
    Rows with an out-of-range target (`bad`) are NaN; ignored rows 0."""
    p_y = logp_y.exp()
    eps, gamma = spec.label_smoothing, spec.focal_gamma
    ce = -logp_y
    if gamma > 0:  # clamp keeps d(om^g)/d om finite at om = 0 for g < 1 (its true limit is 0)
        ce = om.clamp_min(torch.finfo(om.dtype).tiny).pow(gamma) * ce
    loss = a * (1 - eps) * ce + b * _one_minus(om, p_y)
    if spec.has_entropy_term:
        loss = loss + spec.entropy_weight * entropy
    loss = w_y * loss
    if eps > 0:
        loss = loss + a * eps / n_classes * smooth
    loss = torch.where(counted, loss, 0.0)  # bad rows are counted: NaN (see _poison_out_of_range)
    with torch.no_grad():
        sample_weight = a * (1 - eps) * _focal_sample_weight(p_y, om, logp_y, gamma) + b * p_y
        stats = {
            Stat.P_TARGET: torch.where(counted, p_y, 0.0),
            Stat.SAMPLE_WEIGHT: torch.where(counted, sample_weight, 0.0),
            Stat.ROW_WEIGHT: torch.where(counted, w_y, 0.0),
            Stat.AUX: torch.where(counted, om, 0.0),
        }
        for key in (Stat.P_TARGET, Stat.SAMPLE_WEIGHT):
            stats[key] = torch.where(bad, float("nan"), stats[key])
    return loss, stats


def _prob_target_rows(z, logp, p, entropy, q, weight, spec: LossSpec, a, b):
    n_classes = z.shape[-1]
    eps = spec.label_smoothing
    q = q.to(z.dtype)
    wq = q if weight is None else q * weight.to(z.dtype)
    wq_smooth = (1 - eps) * wq + eps / n_classes * (1 if weight is None else weight.to(z.dtype))
    # 0 * log 0 = 0: a masked class with zero target mass contributes nothing.
    ce = -torch.where(wq_smooth != 0, wq_smooth * logp, 0.0).sum(-1)
    return prob_rows_from_sums(ce, (wq * p).sum(-1), wq.sum(-1), (q * p).sum(-1), entropy, spec, a, b)


def prob_rows_from_sums(ce, wqp, w_total, p_target, entropy, spec: LossSpec, a, b):
    """The per-row loss and stats of probability targets from the rows' class sums: the CE term
    -sum_k w_k q'_k log p_k, sum_k w_k q_k p_k, sum_k w_k q_k and sum_k q_k p_k (no gradient)."""
    loss = a * ce + b * (w_total - wqp)
    if spec.has_entropy_term:
        loss = loss + spec.entropy_weight * w_total * entropy
    with torch.no_grad():
        p_target = p_target.detach()
        stats = {
            Stat.P_TARGET: p_target,
            Stat.SAMPLE_WEIGHT: a * (1 - spec.label_smoothing) + b * p_target,
            Stat.ROW_WEIGHT: w_total.detach(),
            Stat.AUX: wqp.detach(),
        }
    return loss, stats


def assemble_stats(named: dict, lse, row_max, entropy) -> torch.Tensor:
    """The (NUM_STATS, R) stats of rows shifted by row_max (their log-sum-exp lse after the
    shift, i.e. log S), from the per-target-kind ones in `named`."""
    stats = torch.empty(NUM_STATS, lse.shape[0], dtype=lse.dtype, device=lse.device)
    stats[Stat.LSE] = (lse + row_max).detach()
    stats[Stat.ROW_MAX] = row_max
    stats[Stat.LOG_SUM] = lse.detach()
    stats[Stat.ENTROPY] = entropy.detach()
    for key, value in named.items():
        stats[key] = value
    return stats


def policy_loss_rows(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], spec: LossSpec
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (differentiable, accumulation dtype) and the detached (NUM_STATS, R) stats.

    logits: (R, C); target: (R,) indices or (R, C) probabilities, as `_spec.canonicalize` returns.
    """
    acc = accumulation_dtype(logits.dtype)
    z = logits.to(acc)
    row_max = z.amax(-1, keepdim=True).detach() if z.shape[0] else z.new_zeros(0, 1)
    z = z - row_max  # shift invariance: same gradient, no cancellation for shifted rows
    if not spec.prob_target:
        z = _poison_out_of_range(z, target, spec.ignore_index)
    lse = torch.logsumexp(z, -1)
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    entropy = _entropy(z, p, lse)
    a, b = coefficients(spec, acc)
    rows = _prob_target_rows if spec.prob_target else _index_target_rows
    loss, named = rows(z, logp, p, entropy, target, weight, spec, a, b)

    row_max = torch.where(row_max == float("-inf"), 0.0, row_max).squeeze(-1)
    return loss, assemble_stats(named, lse, row_max, entropy)


def policy_loss(logits, target, weight, spec: LossSpec):
    """Reduced loss (input dtype) and the stats, from canonical rows."""
    acc = accumulation_dtype(logits.dtype)
    row_loss, stats = policy_loss_rows(logits, target, weight, spec)
    denominator = mean_denominator(target, weight, spec, acc)
    return reduce_rows(row_loss, denominator, spec.reduction).to(logits.dtype), stats


class EagerBackend:
    name = "eager"
    auto_devices = None  # every device: the fallback of "auto"

    def unavailable(self) -> Optional[str]:
        return None

    def device_error(self, device: torch.device) -> Optional[str]:
        return None

    def loss(self, logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags):
        spec = LossSpec.unpack(ce_weight_t, epg_weight_t, scalars, ignore_index, flags)
        if not spec.prob_target:
            target = widen_targets(target, ignore_index)
            check_target_range(target, logits.shape[-1], ignore_index)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        return policy_loss(logits, target, weight, spec)


EAGER = EagerBackend()
