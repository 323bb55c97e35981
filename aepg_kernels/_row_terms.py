"""Per-row terms composed on the op's per-row results (docs/math.md section 7): token weights and
DFT's value convention. Every backend gains them at once, since they need only the per-row loss
and the stats the op returns.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._contract import Flag, Reduction, Scalar, Stat
from ._spec import Options

LOSS_VALUES = ("policy", "dft")


class RowTerms(NamedTuple):
    token_weight: Optional[Tensor]
    dft_value: bool


def check(token_weight, loss_value) -> Optional[RowTerms]:
    """The validated terms, or None when there are none (the op alone)."""
    if loss_value.__class__ is not str or loss_value not in LOSS_VALUES:
        raise ValueError(f"loss_value must be one of {', '.join(map(repr, LOSS_VALUES))}, got {loss_value!r}")
    if token_weight is None:
        return None if loss_value == "policy" else RowTerms(None, True)
    if not isinstance(token_weight, Tensor) or not token_weight.is_floating_point():
        kind = token_weight.dtype if isinstance(token_weight, Tensor) else type(token_weight).__name__
        raise TypeError(f"token_weight must be a floating-point tensor of per-row weights, got {kind}")
    if token_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("token_weight must not require grad (it is a detached multiplier); pass token_weight.detach()")
    return RowTerms(token_weight, loss_value == "dft")


def token_weight_rows(token_weight: Optional[Tensor], row_shape, device: torch.device) -> Optional[Tensor]:
    """The token weights as one value per row of the op (R,), after checking their shape."""
    if token_weight is None:
        return None
    if token_weight.shape != row_shape:
        raise ValueError(
            f"token_weight must have the per-row loss's shape {tuple(row_shape)}, got {tuple(token_weight.shape)}"
        )
    if token_weight.device != device:
        raise ValueError(f"token_weight must be on the input's device ({device}), got {token_weight.device}")
    return token_weight.reshape(-1)


def per_row(options: Options) -> Options:
    """The options with reduction="none": the terms apply to rows, the reduction comes after."""
    return options[:4] + (int(Reduction.NONE),)


def epg_coefficient(call):
    """b of a packed call: a float, a 0-d tensor, or 1 - a."""
    ce_weight_t, epg_weight_t, scalars, _, flags = call[3:8]
    if flags & Flag.EPG_ONE_MINUS_CE:
        return 1 - ce_weight_t
    return scalars[Scalar.EPG_WEIGHT] if epg_weight_t is None else epg_weight_t


def dft_rows(stats: Tensor, b) -> Tensor:
    """Per row, DFT's value b w_y (-p_y log p_y) from the stats (no gradient). log p_y comes from
    1 - p_y (AUX) where p_y > 1/2, as the kernels take it (docs/math.md section 2); ignored rows
    (w_y = 0, p_y = 0) get 0."""
    p_y, om, w_y = stats[Stat.P_TARGET], stats[Stat.AUX], stats[Stat.ROW_WEIGHT]
    logp_y = torch.where(om < 0.5, torch.log1p(-om.clamp(max=0.5)), torch.log(p_y))
    plogp = torch.where(p_y > 0, p_y * logp_y, 0.0)
    b = b.to(stats.dtype) if isinstance(b, Tensor) else b
    return b * w_y * -plogp


def dft_correction(stats: Tensor, b) -> Tensor:
    """Per row, what turns the EPG term's value b w_y (1 - p_y) into DFT's b w_y (-p_y log p_y)."""
    b_t = b.to(stats.dtype) if isinstance(b, Tensor) else b
    return dft_rows(stats, b) - b_t * stats[Stat.ROW_WEIGHT] * stats[Stat.AUX]


def _epg_only(call) -> bool:
    """Whether the op's value is its EPG term alone (no CE term, no entropy term)."""
    ce_weight_t, scalars, flags = call[3], call[5], call[7]
    return (
        ce_weight_t is None
        and not flags & Flag.EPG_ONE_MINUS_CE
        and scalars[Scalar.CE_WEIGHT] == 0.0
        and scalars[Scalar.ENTROPY_WEIGHT] == 0.0
    )


class _ValueWithGradOf(torch.autograd.Function):
    """`value` forward, the gradient of `loss` backward: a value computed apart (from the stats)
    on the op's gradient."""

    @staticmethod
    def forward(ctx, loss: Tensor, value: Tensor) -> Tensor:
        return value.detach().to(loss.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def reduce(rows: Tensor, stats: Tensor, reduction: int, prob_target: bool) -> Tensor:
    """The reduction of weighted rows: "mean" divides by the op's denominator (the summed w_y of
    the counted rows, or the number of rows for probability targets), untouched by token weights."""
    if reduction == Reduction.NONE:
        return rows
    total = rows.sum()
    if reduction == Reduction.SUM:
        return total
    return total / (rows.shape[0] if prob_target else stats[Stat.ROW_WEIGHT].sum())


def _weighted(rows: Tensor, token_weight: Optional[Tensor]) -> Tensor:
    return rows if token_weight is None else rows * token_weight.to(rows.dtype)


def apply(
    rows: Tensor,
    stats: Tensor,
    call,
    terms: RowTerms,
    token_weight: Optional[Tensor],
    reduction: int,
    prob_target: bool,
) -> Tensor:
    """The loss from the op's per-row losses `rows`: the DFT value, the token weights, the
    reduction, in the accumulation dtype; returned in the rows' dtype."""
    dtype, rows = rows.dtype, rows.to(stats.dtype)
    if terms.dft_value:
        rows = rows + dft_correction(stats, epg_coefficient(call))
    return reduce(_weighted(rows, token_weight), stats, reduction, prob_target).to(dtype)


def apply_to_reduced(
    loss: Tensor, stats: Tensor, call, terms: RowTerms, token_weight: Optional[Tensor], reduction: int
) -> Tensor:
    """`apply` for an op that weighted and reduced its rows itself (the linear op, index targets):
    the reduced loss plus the DFT value's correction, weighted and reduced the same way."""
    if not terms.dft_value:
        return loss
    b = epg_coefficient(call)
    if _epg_only(call):
        # DFT alone: loss + correction would be the difference of two near-equal sums (about the
        # number of rows each) for a value that can be 1e-4 of it; the stats give it whole
        return _ValueWithGradOf.apply(
            loss, reduce(_weighted(dft_rows(stats, b), token_weight), stats, reduction, False)
        )
    correction = _weighted(dft_correction(stats, b), token_weight)
    return loss + reduce(correction, stats, reduction, False).to(loss.dtype)
