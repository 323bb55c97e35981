"""The Triton backend's custom operators `aepg::triton_forward` / `aepg::triton_backward`
(torch.library), with fake implementations and an autograd formula, so that
torch.compile(fullgraph=True) and CUDA graphs see opaque, well-typed ops.

Eager calls skip the dispatcher: `TritonPolicyLoss` (a torch.autograd.Function) runs the very
same forward, context and backward functions directly, since a Python custom op costs hundreds of
microseconds of host time per call; tracing (Dynamo, make_fx, fake tensors) still sees the
registered ops. Triton itself is imported on the first call, not when the ops are registered.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..._contract import NUM_STATS, Flag, Reduction, accumulation_dtype, with_flag
from ..._torch_private import graph_keeps_saved_tensors, is_tracing

_NUM_CALL_ARGS = 8  # logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags


def launch_module():
    """The host side (launch.py), imported on first use: importing it imports triton."""
    from . import launch

    return launch


def _forward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ce_weight_t: Optional[Tensor],
    epg_weight_t: Optional[Tensor],
    scalars: List[float],
    ignore_index: int,
    flags: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch_module().forward(logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags)


triton_forward = torch.library.custom_op("aepg::triton_forward", _forward, mutates_args=())


@triton_forward.register_fake
def _(logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags):
    n_rows = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((n_rows,) if flags & Flag.REDUCTION == Reduction.NONE else ())
    stats = logits.new_empty((NUM_STATS, n_rows), dtype=acc)
    grad = logits.new_empty(logits.shape if flags & Flag.WRITE_GRAD else (0,))
    return loss, stats, grad, logits.new_empty((), dtype=acc)


def _backward_kernel(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ce_weight_t: Optional[Tensor],
    epg_weight_t: Optional[Tensor],
    scalars: List[float],
    ignore_index: int,
    flags: int,
    stats: Tensor,
    denom: Tensor,
) -> Tensor:
    return launch_module().backward(
        grad_loss, logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags, stats, denom
    )


triton_backward = torch.library.custom_op("aepg::triton_backward", _backward_kernel, mutates_args=())


@triton_backward.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, weight, a_t, b_t, scalars, ignore_index, flags = inputs
    _loss, stats, grad, denom = output
    ctx.call = (scalars, ignore_index, flags)
    ctx.fused = bool(flags & Flag.WRITE_GRAD)
    if ctx.fused:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, weight, a_t, b_t, stats, denom)
    ctx.mark_non_differentiable(stats, grad, denom)
    ctx.set_materialize_grads(False)  # else autograd fills an (R, C) tensor of zeros for `grad` in backward


def _scale_in_place_ok(tracing: bool) -> bool:
    """The saved gradient may be scaled in place only when nothing can read it again: not with
    retain_graph (true as well outside the autograd engine), and not while a graph is traced
    (AOTAutograd would see a backward mutating a forward output; out of place, Inductor fuses
    the product)."""
    return not tracing and not graph_keeps_saved_tensors()


def _backward(ctx, grad_loss, _grad_stats, _grad_grad, _grad_denom):
    if grad_loss is None:  # the loss took no part in what is differentiated
        return (None,) * _NUM_CALL_ARGS
    tracing = is_tracing()  # then the calls go through the registered custom ops
    if ctx.fused:
        (grad,) = ctx.saved_tensors
        if _scale_in_place_ok(tracing):
            launch_module().scale_(grad, grad_loss)
        else:
            grad = grad * grad_loss.to(grad.dtype)
    else:
        logits, target, weight, a_t, b_t, stats, denom = ctx.saved_tensors
        recompute = triton_backward if tracing else _backward_kernel
        grad = recompute(grad_loss, logits, target, weight, a_t, b_t, *ctx.call, stats, denom)
    return (grad,) + (None,) * (_NUM_CALL_ARGS - 1)


triton_forward.register_autograd(_backward, setup_context=_setup_context)


class TritonPolicyLoss(torch.autograd.Function):
    """The eager path: the custom op's forward, context and backward, without the dispatcher.
    (The old-style forward(ctx, ...): a separate setup_context makes apply() bind the signature
    with inspect on every call.)"""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def policy_loss(logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags, fits_on_chip):
    """(loss, stats) of a call, differentiable; the forward writes the gradient when the loss is
    reduced, the logits need a gradient and a row fits on chip (`fits_on_chip(C)`)."""
    write_grad = (
        logits.requires_grad
        and torch.is_grad_enabled()
        and flags & Flag.REDUCTION != Reduction.NONE
        and fits_on_chip(logits.shape[1])
    )
    flags = with_flag(flags, Flag.WRITE_GRAD, write_grad)
    op = triton_forward if is_tracing() else TritonPolicyLoss.apply
    loss, stats, _grad, _denom = op(logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags)
    return loss, stats
