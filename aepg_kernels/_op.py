"""The custom operators `aepg::*` (torch.library): one forward and one recompute backward, with
fake implementations and an autograd formula, so that torch.compile(fullgraph=True) and CUDA
graphs see opaque, well-typed ops.

Eager calls skip the dispatcher: `PolicyLossFunction` (a torch.autograd.Function) runs the very
same forward, context and backward functions directly. The Python custom-op path cost about
340 us per forward + backward on a CPU (an 8 x 10 call: 496 us, 159 us without), ten times the
kernels of a small batch; tracing (Dynamo, make_fx, fake tensors) still sees the custom ops. The
in-place scale of a gradient written by the forward happens only in eager calls (a trace scales
out of place), so it needs no custom op.

Kernel backends ("triton", and the native "cpu"/"cuda" of native.py) share one interface:
forward, backward, scale_, fits_on_chip. The reduction and the "mean" denominator are part of the
op: only then is the upstream scale of every row known in the forward, which lets the gradient be
written there.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from . import reference
from ._spec import NUM_STATS, LossSpec, Reduction, accumulation_dtype

_LIB = "aepg"


def _kernels(backend: str):
    if backend == "triton":
        from . import triton as kernels
        return kernels
    if backend in ("cpu", "cuda"):
        from . import native
        return getattr(native, backend)
    raise RuntimeError(f"no kernels for backend {backend!r}")


def _spec(a_t, b_t, a, b, entropy_weight, label_smoothing, focal_gamma, ignore_index, reduction,
          prob_target) -> LossSpec:
    return LossSpec(ce_weight=a if a_t is None else a_t, epg_weight=b if b_t is None else b_t,
                    entropy_weight=entropy_weight, label_smoothing=label_smoothing,
                    focal_gamma=focal_gamma, ignore_index=ignore_index,
                    reduction=Reduction(reduction), prob_target=prob_target)


def _fuses_grad(backend: str, logits: Tensor, reduction: int, want_grad: bool) -> bool:
    """Gradient in the forward: needs a reduced loss (so every row's upstream scale is known)
    and a row that fits on chip. Decided from static facts only, identically in the fake."""
    return want_grad and reduction != Reduction.NONE and _kernels(backend).fits_on_chip(logits.shape[1])


def _tracing() -> bool:
    """Whether a graph is being captured (Dynamo, make_fx, fake or other dispatch modes): then the
    calls must go through the registered custom ops."""
    return (torch.compiler.is_compiling() or get_proxy_mode() is not None
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
            or bool(torch._C._len_torch_dispatch_stack()))


def _forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], ce_weight_t: Optional[Tensor],
             epg_weight_t: Optional[Tensor], ce_weight: float, epg_weight: float, entropy_weight: float,
             label_smoothing: float, focal_gamma: float, ignore_index: int, reduction: int,
             prob_target: bool, need_entropy: bool, want_grad: bool, backend: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, stats, grad, denominator): loss reduced (or per row) in the input dtype,
    stats (NUM_STATS, R), grad (R, C) when fused else empty, the "mean" denominator (0-d)."""
    spec = _spec(ce_weight_t, epg_weight_t, ce_weight, epg_weight, entropy_weight, label_smoothing,
                 focal_gamma, ignore_index, reduction, prob_target)
    acc = accumulation_dtype(logits.dtype)
    denom = reference.mean_denominator(target, weight, spec, acc)
    fused = _fuses_grad(backend, logits, reduction, want_grad)
    row_loss, stats, grad = _kernels(backend).forward(logits, target, weight, spec, denom,
                                                       need_entropy=need_entropy, write_grad=fused)
    loss = reference.reduce_rows(row_loss, denom, spec.reduction).to(logits.dtype)
    return loss, stats, grad, denom


policy_loss_fwd = torch.library.custom_op(f"{_LIB}::policy_loss_fwd", _forward, mutates_args=())


@policy_loss_fwd.register_fake
def _(logits, target, weight, ce_weight_t, epg_weight_t, ce_weight, epg_weight, entropy_weight,
      label_smoothing, focal_gamma, ignore_index, reduction, prob_target, need_entropy, want_grad, backend):
    n_rows = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((n_rows,) if reduction == Reduction.NONE else ())
    stats = logits.new_empty((NUM_STATS, n_rows), dtype=acc)
    fused = _fuses_grad(backend, logits, reduction, want_grad)
    grad = logits.new_empty(logits.shape if fused else (0,))
    return loss, stats, grad, logits.new_empty((), dtype=acc)


def _recompute_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                    ce_weight_t: Optional[Tensor], epg_weight_t: Optional[Tensor], ce_weight: float,
                    epg_weight: float, entropy_weight: float, label_smoothing: float, ignore_index: int,
                    reduction: int, prob_target: bool, stats: Tensor, denom: Tensor, backend: str) -> Tensor:
    """dL/dlogits recomputed from the saved per-row stats (1 read + 1 write)."""
    spec = _spec(ce_weight_t, epg_weight_t, ce_weight, epg_weight, entropy_weight, label_smoothing, 0.0,
                 ignore_index, reduction, prob_target)
    return _kernels(backend).backward(grad_loss, logits, target, weight, spec, stats, denom)


policy_loss_bwd = torch.library.custom_op(f"{_LIB}::policy_loss_bwd", _recompute_backward, mutates_args=())


@policy_loss_bwd.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _scale_grad(grad: Tensor, grad_loss: Tensor, backend: str) -> None:
    """grad *= grad_loss in place; a no-op decided on the device when grad_loss == 1."""
    _kernels(backend).scale_(grad, grad_loss)


def _setup_context(ctx, inputs, output):
    (logits, target, weight, a_t, b_t, a, b, beta, eps, _gamma, ignore_index, reduction, prob_target,
     _need_entropy, _want_grad, backend) = inputs
    _loss, stats, grad, denom = output
    ctx.fused = grad.dim() == 2
    ctx.args = (a, b, beta, eps, ignore_index, reduction, prob_target)
    ctx.backend = backend
    if ctx.fused:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, weight, a_t, b_t, stats, denom)
    ctx.mark_non_differentiable(stats, grad, denom)


def _scale_in_place_ok(tracing: bool) -> bool:
    """The saved gradient may be scaled in place only when nothing can read it again: not with
    retain_graph (true as well outside the autograd engine), and not while a graph is traced
    (AOTAutograd would see a backward mutating a forward output; out of place, Inductor fuses
    the product)."""
    return not tracing and not torch._C._autograd._get_current_graph_task_keep_graph()


def _backward(ctx, grad_loss, _grad_stats, _grad_grad, _grad_denom):
    tracing = _tracing()
    if ctx.fused:
        (grad,) = ctx.saved_tensors
        if _scale_in_place_ok(tracing):
            _scale_grad(grad, grad_loss, ctx.backend)
        else:
            grad = grad * grad_loss.to(grad.dtype)
    else:
        logits, target, weight, a_t, b_t, stats, denom = ctx.saved_tensors
        a, b, beta, eps, ignore_index, reduction, prob_target = ctx.args
        recompute = policy_loss_bwd if tracing else _recompute_backward
        grad = recompute(grad_loss, logits, target, weight, a_t, b_t, a, b, beta, eps, ignore_index,
                         reduction, prob_target, stats, denom, ctx.backend)
    return (grad,) + (None,) * 15


policy_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


class PolicyLossFunction(torch.autograd.Function):
    """The eager path: the custom op's forward, context and backward, without the dispatcher.
    (The old-style forward(ctx, ...): a separate setup_context makes apply() bind the signature
    with inspect on every call.)"""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def policy_loss(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, backend: str, *,
                need_entropy: bool):
    """Reduced loss and stats through the custom op, from canonical rows (see _spec.canonicalize)."""
    a_t, b_t, a, b = spec.coefficient_args()
    want_grad = logits.requires_grad and torch.is_grad_enabled()
    op = policy_loss_fwd if _tracing() else PolicyLossFunction.apply
    loss, stats, _grad, _denom = op(
        logits, target, weight, a_t, b_t, a, b, spec.entropy_weight, spec.label_smoothing, spec.focal_gamma,
        spec.ignore_index, int(spec.reduction), spec.prob_target, need_entropy, want_grad, backend)
    return loss, stats
