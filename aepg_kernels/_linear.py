"""The fused linear + policy loss as custom ops: the logits `input @ linear_weight^T + linear_bias`
chunk by chunk, through a kernel backend's row op, never the whole (N, V) (docs/math.md section 6).

- `aepg::linear_forward` runs the chunk loop. For a reduced loss (every row's upstream scale is
  then known) it also returns the gradients with respect to the input, the weight and the bias,
  for an upstream gradient of 1; backward only scales them.
- `aepg::linear_backward` recomputes the chunks for reduction="none" (a per-row upstream gradient).

Per chunk: logits into one reused workspace; the row op's forward (writing the logits gradient
where the backend keeps the row on chip, else its recompute backward on the same workspace), the
gradient over the logits in the workspace itself where that is safe (`_grad_in_place`), else into
a second reused buffer; dX_c = dlogits @ W; dW += dlogits^T @ x_c into an fp32 accumulator; db +=
the column sums. Low-precision inputs are multiplied in their dtype (fp32 accumulation of dW
across chunks), except on a CPU without matrix instructions for it, where fp32 is faster.
"""

from __future__ import annotations

import enum
from typing import List, Optional, Tuple, cast

import torch
from torch import Tensor

from ._contract import NUM_STATS, Flag, Reduction, accumulation_dtype, with_flag
from ._torch_private import cpu_has_native_matmul
from .backends import REGISTRY, KernelBackend
from .backends.eager import counted_row_weight

# The fp32 logits of one chunk stay about this size (or the size of the input, when larger). Smaller
# chunks re-read W (V x H) once per chunk in each of the three matmuls (the measurement behind the
# size: docs/design.md section 8).
CHUNK_BUDGET_BYTES = 64 << 20


class Need(enum.IntFlag):
    """The `needs` word of the linear ops: which gradients to compute, and whether the rows that
    are ignored may be dropped before the matmul (their stats are then not returned)."""

    GRAD_INPUT = 1
    GRAD_WEIGHT = 2
    GRAD_BIAS = 4
    COMPACT = 8


_GRADS = int(Need.GRAD_INPUT | Need.GRAD_WEIGHT | Need.GRAD_BIAS)


def default_chunk_rows(n_rows: int, n_classes: int, hidden: int, element_size: int) -> int:
    """Rows per chunk: fp32 logits of about max(CHUNK_BUDGET_BYTES, the input's bytes)."""
    budget = max(CHUNK_BUDGET_BYTES, n_rows * hidden * element_size)
    return max(1, min(n_rows, budget // (4 * max(n_classes, 1))))


# A CPU matmul of bf16/fp16 operands has an output of their dtype: dW's chunk product is made
# this many bytes at a time and added to the fp32 accumulator (a small buffer, in cache).
PRODUCT_BLOCK_BYTES = 4 << 20


def compute_dtype(input: Tensor) -> torch.dtype:
    """The dtype of the matmuls: the input's, except fp16/bf16 on a CPU that has no matrix
    instructions for it (ATen's matmul in the dtype is then slower than in fp32)."""
    low = input.dtype in (torch.float16, torch.bfloat16)
    if low and input.device.type == "cpu" and not cpu_has_native_matmul(input.dtype):
        return torch.float32
    return input.dtype


def _grad_accumulator(like: Tensor, shape) -> Tensor:
    return torch.zeros(shape, dtype=accumulation_dtype(like.dtype), device=like.device)


def _add_matmul_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, accumulated in acc's dtype: fp32 out of bf16/fp16 operands (on the CPU each
    block's product is rounded to the operands' dtype once, then added in fp32)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type != "cpu":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        rows = max(1, PRODUCT_BLOCK_BYTES // (b.shape[1] * b.element_size()))
        for start in range(0, acc.shape[0], rows):
            acc[start : start + rows] += torch.mm(a[start : start + rows], b)


class _Chunks:
    """The operands of one call in the compute dtype, the chunk loop's workspace and the logits'
    transform z = softcap tanh(logit_scale (x W^T + b) / softcap) with its chain rule."""

    def __init__(
        self,
        input,
        linear_weight,
        linear_bias,
        chunk_size: int,
        logit_scale: float,
        softcap: float,
        in_place: bool,
    ):
        dtype = compute_dtype(input)
        self.x = input.to(dtype)
        self.w = linear_weight.to(dtype)
        self.b = None if linear_bias is None else linear_bias.to(dtype)
        self.size = chunk_size
        self.logit_scale, self.softcap = logit_scale, softcap
        n_rows, n_classes = input.shape[0], linear_weight.shape[0]
        self.workspace = torch.empty((min(chunk_size, n_rows), n_classes), dtype=dtype, device=input.device)
        self.in_place = in_place  # see _grad_in_place
        self.grad_buffer: Optional[Tensor] = None  # dlogits of a chunk when not in place, made on first use

    def grad_out(self, n_rows: int) -> Tensor:
        """Where the row op writes the gradient of the chunk's n_rows logits: over the logits
        themselves (the workspace) when in place, else a second buffer of the workspace's size."""
        if self.in_place:
            return self.workspace[:n_rows]
        if self.grad_buffer is None:
            self.grad_buffer = torch.empty_like(self.workspace)
        return self.grad_buffer[:n_rows]

    def bounds(self, n_rows: int):
        return [(start, min(start + self.size, n_rows)) for start in range(0, n_rows, self.size)]

    def logits(self, x_c: Tensor) -> Tensor:
        out = self.workspace[: x_c.shape[0]]
        scale = self.logit_scale
        if self.b is None:
            torch.mm(x_c, self.w.t(), out=out)
            if scale != 1.0:
                out.mul_(scale)
        else:
            torch.addmm(self.b, x_c, self.w.t(), beta=scale, alpha=scale, out=out)
        if self.softcap:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def through_softcap_(self, grad: Tensor) -> Tensor:
        """dL/d(scaled logits) from dL/dz, in place: times 1 - (z / softcap)^2. Consumes the
        workspace, which holds this chunk's z (the logit scale is applied once, at the end)."""
        if self.softcap:
            z = self.workspace[: grad.shape[0]]
            grad.mul_(z.div_(self.softcap).square_().neg_().add_(1))
        return grad


def _grad_in_place(kernels: KernelBackend, fused: bool, device: torch.device, softcap: float) -> bool:
    """Whether each chunk's logits gradient overwrites its logits, so that the loop holds one chunk
    buffer rather than two (docs/design.md section 8): where the backend's row op on this path
    (`fused`: its forward with WRITE_GRAD, else its recompute backward) reads every value of a row
    it needs before it writes any of the row (`grad_into_logits`, argued per backend there), and
    without softcap, whose chain rule reads z once the row op is done (`through_softcap_`)."""
    return softcap == 0.0 and kernels.grad_into_logits(fused, device)


def _summed(flags: int) -> int:
    """The flags of one chunk of a reduced loss: the chunk's rows summed (the call divides once)."""
    return (flags & ~int(Flag.REDUCTION)) | int(Reduction.SUM)


def _row_grad(
    backend: KernelBackend,
    logits: Tensor,
    target: Tensor,
    rest: tuple,
    fused: bool,
    out: Tensor,
    token_weight: Optional[Tensor],
):
    """(loss, stats, dlogits into `out`) of one chunk of a summed loss for an upstream gradient of 1
    (times the rows' token weights)."""
    weight, a_t, b_t, scalars, ignore_index, flags = rest
    if fused and token_weight is None:
        loss, stats, grad, _ = backend.forward(
            logits, target, weight, a_t, b_t, scalars, ignore_index, with_flag(flags, Flag.WRITE_GRAD, True), out=out
        )
        return loss, stats, grad
    if token_weight is not None:
        flags = _per_row(flags)
    loss, stats, _, denom = backend.forward(logits, target, weight, a_t, b_t, scalars, ignore_index, flags)
    upstream = torch.ones((), dtype=stats.dtype, device=logits.device) if token_weight is None else token_weight
    grad = backend.backward(
        upstream, logits, target, weight, a_t, b_t, scalars, ignore_index, flags, stats, denom, out=out
    )
    return _weighted(loss, token_weight, stats.dtype), stats, grad


def _chunk_loss(backend: KernelBackend, logits: Tensor, target: Tensor, rest: tuple, token_weight: Optional[Tensor]):
    """(loss, stats) of one chunk without gradients."""
    weight, a_t, b_t, scalars, ignore_index, flags = rest
    if token_weight is not None:
        flags = _per_row(flags)
    loss, stats, _, _ = backend.forward(logits, target, weight, a_t, b_t, scalars, ignore_index, flags)
    return _weighted(loss, token_weight, stats.dtype), stats


def _per_row(flags: int) -> int:
    return flags & ~int(Flag.REDUCTION)


def _weighted(loss: Tensor, token_weight: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """A chunk's summed loss: as the row op returns it, or its rows times their token weights."""
    return loss if token_weight is None else (loss.to(acc) * token_weight).sum()


def _add_chunk_grads(chunks: _Chunks, grad: Tensor, x_c: Tensor, grads: dict, rows) -> None:
    grad = grad.to(chunks.x.dtype)
    if "input" in grads:
        if rows.__class__ is slice:
            torch.mm(grad, chunks.w, out=grads["input"][rows])
        else:
            grads["input"].index_copy_(0, rows, torch.mm(grad, chunks.w))
    if "weight" in grads:
        _add_matmul_(grads["weight"], grad.t(), x_c)
    if "bias" in grads:
        grads["bias"] += grad.sum(0, dtype=grads["bias"].dtype)


def _empty(like: Tensor) -> Tensor:
    """The placeholder of a gradient that is not computed (no parameter of the op is 1-d and empty)."""
    return like.new_empty((0,))


def _is_placeholder(grad: Tensor) -> bool:
    return grad.dim() == 1 and grad.shape[0] == 0


@torch.library.custom_op("aepg::linear_forward", mutates_args=())
def linear_forward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ce_weight_t: Optional[Tensor],
    epg_weight_t: Optional[Tensor],
    scalars: List[float],
    ignore_index: int,
    flags: int,
    chunk_size: int,
    needs: int,
    backend: str,
    token_weight: Optional[Tensor],
    logit_scale: float,
    softcap: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, stats, grad_input, grad_weight, grad_bias, denominator) of input (N, H), linear_weight
    (V, H), target (N,); the gradients (of the loss as returned, for an upstream gradient of 1)
    only for a reduced loss and where `needs` asks, else empty. token_weight (N,) in the
    accumulation dtype scales the rows of a reduced loss (None: 1). The logits are
    softcap tanh(logit_scale (input W^T + b) / softcap), softcap 0 for none."""
    kernels = cast(KernelBackend, REGISTRY[backend])  # the linear op takes only KERNEL_BACKENDS
    n_rows, n_classes = input.shape[0], linear_weight.shape[0]
    acc = accumulation_dtype(input.dtype)
    reduction = Reduction(flags & Flag.REDUCTION)
    denom = (
        counted_row_weight(target, weight, ignore_index, acc).sum()
        if reduction == Reduction.MEAN
        else torch.ones((), dtype=acc, device=input.device)
    )
    grads = _grad_buffers(input, linear_weight, linear_bias, needs if reduction != Reduction.NONE else 0)
    fused = kernels.fits_on_chip(n_classes)
    in_place = _grad_in_place(kernels, fused and token_weight is None, input.device, softcap)  # _row_grad's path
    chunks = _Chunks(input, linear_weight, linear_bias, chunk_size, logit_scale, softcap, in_place)
    keep_stats = _keeps_stats(input, flags, needs)
    rows = None if keep_stats else _kept_rows(target, ignore_index)
    x, y, tw = chunks.x, target, token_weight
    if rows is not None:
        x, y = x.index_select(0, rows), y.index_select(0, rows)
        tw = None if tw is None else tw.index_select(0, rows)
    stats = torch.zeros((NUM_STATS, n_rows if keep_stats else 0), dtype=acc, device=input.device)
    losses = []
    rest = (
        weight,
        ce_weight_t,
        epg_weight_t,
        scalars,
        ignore_index,
        flags if reduction == Reduction.NONE else _summed(flags),
    )
    for start, end in chunks.bounds(x.shape[0]):
        logits = chunks.logits(x[start:end])
        tw_c = None if tw is None else tw[start:end]
        if grads:
            loss, chunk_stats, grad = _row_grad(
                kernels, logits, y[start:end], rest, fused, chunks.grad_out(end - start), tw_c
            )
            grad = chunks.through_softcap_(grad)
            _add_chunk_grads(chunks, grad, x[start:end], grads, slice(start, end) if rows is None else rows[start:end])
        else:
            loss, chunk_stats = _chunk_loss(kernels, logits, y[start:end], rest, tw_c)
        losses.append(loss.to(acc).reshape(-1))
        if keep_stats:
            stats[:, start:end] = chunk_stats
    loss = _reduce(losses, denom, reduction, input)
    return (loss, stats, *_finish_grads(grads, denom, reduction, input, linear_weight, linear_bias, logit_scale), denom)


def _grad_buffers(input, linear_weight, linear_bias, needs: int) -> dict:
    grads = {}
    if needs & Need.GRAD_INPUT:
        grads["input"] = torch.zeros(input.shape, dtype=compute_dtype(input), device=input.device)
    if needs & Need.GRAD_WEIGHT:
        grads["weight"] = _grad_accumulator(linear_weight, linear_weight.shape)
    if needs & Need.GRAD_BIAS and linear_bias is not None:
        grads["bias"] = _grad_accumulator(linear_bias, linear_bias.shape)
    return grads


def _keeps_stats(input: Tensor, flags: int, needs: int) -> bool:
    """Whether the forward returns the stats of every row: unless the caller lets it drop the
    ignored rows of a reduced loss (Need.COMPACT), which it does on the CPU only, where their count
    costs no device synchronisation."""
    reduced = flags & Flag.REDUCTION != Reduction.NONE
    return not (needs & Need.COMPACT and reduced and input.device.type == "cpu")


def _kept_rows(target: Tensor, ignore_index: int) -> Optional[Tensor]:
    """The indices of the counted rows, or None when every row counts."""
    kept = (target != ignore_index).nonzero().squeeze(1)
    return None if kept.shape[0] == target.shape[0] else kept


def _reduce(losses: List[Tensor], denom: Tensor, reduction: Reduction, input: Tensor) -> Tensor:
    rows = torch.cat(losses) if losses else denom.new_zeros((0,))
    if reduction == Reduction.NONE:
        return rows.to(input.dtype)
    total = rows.sum()
    return (total / denom if reduction == Reduction.MEAN else total).to(input.dtype)


def _finish_grads(
    grads: dict, denom: Tensor, reduction: Reduction, input, linear_weight, linear_bias, logit_scale: float
):
    """The summed-loss gradients times the logit scale, divided by the "mean" denominator, in the
    parameters' dtypes. With no counted row they are 0 (not 0 / 0), as nn.CrossEntropyLoss's."""
    scale: Optional[Tensor]
    if reduction == Reduction.MEAN:
        scale = torch.where(denom == 0, 0.0, logit_scale / denom)
    else:
        scale = None if logit_scale == 1.0 else torch.tensor(logit_scale, dtype=denom.dtype, device=denom.device)
    out = []
    for key, like in (("input", input), ("weight", linear_weight), ("bias", linear_bias)):
        if key not in grads:
            out.append(_empty(input))
            continue
        # In place (dW is V x H); the fp32 0-d scale is not rounded to a bf16/fp16 dX's dtype first.
        grad = grads[key] if scale is None else grads[key].mul_(scale)
        out.append(grad.to(like.dtype))
    return out


@linear_forward.register_fake
def _linear_forward_fake(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    ce_weight_t,
    epg_weight_t,
    scalars,
    ignore_index,
    flags,
    chunk_size,
    needs,
    backend,
    token_weight,
    logit_scale,
    softcap,
):
    reduced = flags & Flag.REDUCTION != Reduction.NONE
    acc = accumulation_dtype(input.dtype)
    n_rows = input.shape[0]
    keep_stats = _keeps_stats(input, flags, needs)
    grad_shapes = [(Need.GRAD_INPUT, input), (Need.GRAD_WEIGHT, linear_weight), (Need.GRAD_BIAS, linear_bias)]
    grads = [
        like.new_empty(like.shape) if reduced and needs & need and like is not None else _empty(input)
        for need, like in grad_shapes
    ]
    loss = input.new_empty(() if reduced else (n_rows,))
    stats = input.new_empty((NUM_STATS, n_rows if keep_stats else 0), dtype=acc)
    return (loss, stats, *grads, input.new_empty((), dtype=acc))


@torch.library.custom_op("aepg::linear_backward", mutates_args=())
def linear_backward(
    grad_loss: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ce_weight_t: Optional[Tensor],
    epg_weight_t: Optional[Tensor],
    scalars: List[float],
    ignore_index: int,
    flags: int,
    chunk_size: int,
    needs: int,
    backend: str,
    stats: Tensor,
    denom: Tensor,
    logit_scale: float,
    softcap: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of a per-row loss for the per-row upstream gradient
    grad_loss (N,), recomputing each chunk's logits; empty where `needs` does not ask."""
    kernels = cast(KernelBackend, REGISTRY[backend])  # the linear op takes only KERNEL_BACKENDS
    grads = _grad_buffers(input, linear_weight, linear_bias, needs)
    in_place = _grad_in_place(kernels, False, input.device, softcap)  # the recompute backward
    chunks = _Chunks(input, linear_weight, linear_bias, chunk_size, logit_scale, softcap, in_place)
    for start, end in chunks.bounds(input.shape[0]):
        x_c = chunks.x[start:end]
        grad = kernels.backward(
            grad_loss[start:end],
            chunks.logits(x_c),
            target[start:end],
            weight,
            ce_weight_t,
            epg_weight_t,
            scalars,
            ignore_index,
            flags,
            stats[:, start:end].contiguous(),
            denom,
            out=chunks.grad_out(end - start),
        )
        _add_chunk_grads(chunks, chunks.through_softcap_(grad), x_c, grads, slice(start, end))
    return tuple(_finish_grads(grads, denom, Reduction.NONE, input, linear_weight, linear_bias, logit_scale))


@linear_backward.register_fake
def _linear_backward_fake(
    grad_loss,
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    ce_weight_t,
    epg_weight_t,
    scalars,
    ignore_index,
    flags,
    chunk_size,
    needs,
    backend,
    stats,
    denom,
    logit_scale,
    softcap,
):
    shapes = [(Need.GRAD_INPUT, input), (Need.GRAD_WEIGHT, linear_weight), (Need.GRAD_BIAS, linear_bias)]
    return tuple(
        like.new_empty(like.shape) if needs & need and like is not None else _empty(input) for need, like in shapes
    )


def _setup_context(ctx, inputs, output) -> None:
    (
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        ce_weight_t,
        epg_weight_t,
        scalars,
        ignore_index,
        flags,
        chunk_size,
        needs,
        backend,
        token_weight,
        logit_scale,
        softcap,
    ) = inputs
    loss, stats, grad_input, grad_weight, grad_bias, denom = output
    ctx.reduced = flags & Flag.REDUCTION != Reduction.NONE
    ctx.has_bias = linear_bias is not None
    # Else autograd fills the outputs that take no part in the loss (stats, the saved gradients,
    # denom) with zeros in backward: a (V, H) tensor beside the dW accumulator, the call's peak.
    ctx.set_materialize_grads(False)
    if ctx.reduced:
        ctx.save_for_backward(grad_input, grad_weight, grad_bias)
        return
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, ce_weight_t, epg_weight_t, stats, denom)
    ctx.options = (scalars, ignore_index, flags, chunk_size, needs, backend, logit_scale, softcap)


def _scaled(grad: Tensor, grad_loss: Tensor) -> Optional[Tensor]:
    """A saved gradient times the 0-d upstream gradient; as it is when that is 1 on the CPU (read
    on the host for free; plain tensors only, never inside a trace)."""
    if _is_placeholder(grad):
        return None
    if type(grad_loss) is Tensor and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
        return grad
    return grad * grad_loss.to(grad.dtype)


def _backward(ctx, grad_loss, grad_stats, *unused):
    if grad_loss is None:  # only the stats (or nothing of the loss) took part: no gradient
        return (None,) * 16
    if ctx.reduced:
        grads = [_scaled(g, grad_loss) for g in ctx.saved_tensors]
    else:
        input, linear_weight, linear_bias, target, weight, a_t, b_t, stats, denom = ctx.saved_tensors
        scalars, ignore_index, flags, chunk_size, needs, backend, logit_scale, softcap = ctx.options
        grads = linear_backward(
            grad_loss,
            input,
            linear_weight,
            linear_bias,
            target,
            weight,
            a_t,
            b_t,
            scalars,
            ignore_index,
            flags,
            chunk_size,
            needs,
            backend,
            stats,
            denom,
            logit_scale,
            softcap,
        )
        grads = [None if _is_placeholder(g) else g for g in grads]
    grad_input, grad_weight, grad_bias = grads
    return (grad_input, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 13


linear_forward.register_autograd(_backward, setup_context=_setup_context)


def needs_of(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], compact: bool) -> int:
    """The `needs` word of a call: the gradients autograd will ask for, and Need.COMPACT."""
    needs = int(Need.COMPACT) if compact else 0
    if torch.is_grad_enabled():
        needs |= int(Need.GRAD_INPUT) if input.requires_grad else 0
        needs |= int(Need.GRAD_WEIGHT) if linear_weight.requires_grad else 0
        needs |= int(Need.GRAD_BIAS) if linear_bias is not None and linear_bias.requires_grad else 0
    return needs
