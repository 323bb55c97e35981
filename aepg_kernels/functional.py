"""The public functional API: the policy-gradient loss family as one fused op.

Per row, with index targets (docs/math.md):
    loss_i = w_y [a (1-eps) (1-p_y)^gamma (-log p_y) + b (1-p_y) + beta H(p)]
             + a eps / C * sum_k w_k (-log p_k)
"mean" divides the sum over counted rows by the sum of their w_y, as nn.CrossEntropyLoss.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _linear, _row_terms, _vocab_parallel
from ._contract import ONE_MINUS_CE_WEIGHT, Coefficient, Reduction, Stat, accumulation_dtype
from ._spec import (
    Options,
    check_chunk_size,
    check_logit_transform,
    check_options,
    check_target_range,
    prepare,
    prepare_linear,
)
from .backends import KernelBackend, resolve


class LossStats(NamedTuple):
    """Per-row statistics (no gradient), shaped like a reduction="none" loss."""

    entropy: Tensor  # H(p)
    p_target: Tensor  # p_y, or sum_k q_k p_k for probability targets; 0 for ignored rows
    sample_weight: Tensor  # the factor of (p - e_y) in the gradient: a(1-eps) w_focal + b p_y
    lse: Tensor  # log sum_k exp(z_k)
    p_max: Tensor  # max_k p_k = 1 / sum_k exp(z_k - max z): the target is the argmax where p_target is it

    def target_is_argmax(self, rtol: float = 1e-5) -> Tensor:
        """Per row, whether the target has the largest probability (token accuracy): p_target
        within a relative `rtol` of p_max, so that ties and rounding count as correct. False for
        ignored rows (p_target 0)."""
        return self.p_target >= self.p_max * (1 - rtol)


_STAT_ROWS = (Stat.ENTROPY, Stat.P_TARGET, Stat.SAMPLE_WEIGHT, Stat.LSE)  # LossStats' fields read as they are


def _loss_stats(stats: Tensor) -> LossStats:
    """LossStats of the op's stats (NUM_STATS, R): the rows as they are, p_max from log S."""
    # mypy cannot count the generator's four rows, the fields before p_max
    return LossStats(*(stats[key] for key in _STAT_ROWS), torch.exp(-stats[Stat.LOG_SUM]))  # type: ignore[call-arg]


def policy_loss(
    input: Tensor,
    target: Tensor,
    *,
    ce_weight: Coefficient = 1.0,
    epg_weight: Coefficient = 0.0,
    entropy_weight: float = 0.0,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: Optional[Tensor] = None,
    loss_value: str = "policy",
    backend: str = "auto",
    return_stats: bool = False,
    process_group=None,
    shard_sizes: Optional[Sequence[int]] = None,
):
    """The fused EPG-family loss. With the defaults it is exactly ``F.cross_entropy``.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ...); fp16, bf16, fp32 or fp64.
        target: class indices (int64/int32) of shape (), (N,) or (N, d1, ...), or class
            probabilities of the input's shape.
        ce_weight: a, the weight of the cross-entropy term (float or 0-d tensor).
        epg_weight: b, the weight of the EPG term 1 - p_y (float or 0-d tensor).
        entropy_weight: beta, the weight of H(p): > 0 lowers the entropy (EP), < 0 raises it (CP).
        label_smoothing: eps in [0, 1], PyTorch's convention.
        focal_gamma: gamma >= 0; the CE term becomes (1 - p_y)^gamma CE (index targets only).
        weight, ignore_index, reduction: as in ``nn.CrossEntropyLoss``.
        token_weight: a detached per-row multiplier shaped like a per-row loss: it scales each row's
            loss and gradient and leaves the "mean" denominator as it is (docs/math.md section 7).
        loss_value: "policy" (the family's values) or "dft": the EPG term reports DFT's value
            -sg(p_y) log p_y, its gradient unchanged (index targets only).
        backend: "auto", "triton", "cuda", "cpu" or "eager" (see ``available_backends()``).
        return_stats: also return ``LossStats`` (entropy, p_target, sample_weight, lse, p_max) per row.
        process_group: vocab-parallel (docs/math.md section 8): the input holds this rank's
            contiguous shard of the classes (N, C_local), ``weight`` and probability targets the same
            shard, index targets are global and the same on every rank; the loss and stats are the
            unsharded op's on every rank, the gradient this shard's. One all-gather of O(N) floats.
        shard_sizes: every rank's C_local, in rank order (gathered, one more collective, if None).
        A DTensor input (N, C) sharded on the classes over a 1-d mesh (torchtitan's loss_parallel)
        takes the same path: the mesh's group, the local shards of it, of a probability target
        and of weight (index targets replicated); the loss is a plain tensor.
    """
    options = check_options(entropy_weight, label_smoothing, focal_gamma, ignore_index, reduction)
    terms = _row_terms.check(token_weight, loss_value)
    if input.__class__ is not Tensor and _vocab_parallel.is_class_sharded(input):  # a DTensor, Shard(1)
        input, target, weight, process_group = _vocab_parallel.local_shards(input, target, weight)
    if process_group is not None:
        op = _vocab_parallel.VocabParallel(process_group, shard_sizes, backend)
        return run_op(op, input, target, weight, ce_weight, epg_weight, options, return_stats, terms)
    return run(input, target, weight, ce_weight, epg_weight, options, backend, return_stats, terms)


def run(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ce_weight,
    epg_weight,
    options: Options,
    backend: str,
    return_stats: bool,
    terms: Optional[_row_terms.RowTerms] = None,
):
    """`policy_loss` with its options validated already (the modules keep theirs)."""
    return run_op(backend, input, target, weight, ce_weight, epg_weight, options, return_stats, terms)


def run_op(
    op,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ce_weight,
    epg_weight,
    options: Options,
    return_stats: bool,
    terms: Optional[_row_terms.RowTerms] = None,
):
    """`run` through `op`: a backend name (resolved for the input's device once the call is
    checked), a backend, or the vocab-parallel op, whose `loss(*call)` gives (loss, stats)."""
    if terms is not None:
        return _run_with_terms(op, input, target, weight, ce_weight, epg_weight, options, return_stats, terms)
    call, row_shape = prepare(input, target, weight, ce_weight, epg_weight, options, return_stats)
    loss, stats = _resolved(op, input).loss(*call)
    return _with_stats(loss, stats, return_stats, row_shape)


def _resolved(op, input: Tensor):
    """A backend name resolved for the input's device; a backend or the vocab-parallel op as it is
    (anything else: resolve's error for a bad backend name)."""
    if op.__class__ is not str and hasattr(op, "loss"):
        return op
    return resolve(op, input.device)


def _run_with_terms(op, input, target, weight, ce_weight, epg_weight, options, return_stats, terms):
    """The op per row, then the DFT value and the token weights on the rows, then the reduction."""
    call, row_shape = prepare(input, target, weight, ce_weight, epg_weight, _row_terms.per_row(options), return_stats)
    prob_target = call[1].dim() == 2
    if terms.dft_value and prob_target:
        raise ValueError('loss_value="dft" is defined for class-index targets only, got class-probability targets')
    token_weight = _row_terms.token_weight_rows(
        terms.token_weight, row_shape if row_shape is not None else call[1].shape[:1], input.device
    )
    rows, stats = _resolved(op, input).loss(*call)
    loss = _row_terms.apply(rows, stats, call, terms, token_weight, options[4], prob_target)
    return _with_stats(loss, stats, return_stats, row_shape)


def _with_stats(loss: Tensor, stats: Tensor, return_stats: bool, row_shape: Optional[torch.Size]):
    if row_shape is not None and loss.dim():
        loss = loss.reshape(row_shape)
    if not return_stats:
        return loss
    loss_stats = _loss_stats(stats)
    if row_shape is None:
        return loss, loss_stats
    return loss, LossStats(*(field.reshape(row_shape) for field in loss_stats))


def linear_policy_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    ce_weight: Coefficient = 1.0,
    epg_weight: Coefficient = 0.0,
    entropy_weight: float = 0.0,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: Optional[Tensor] = None,
    loss_value: str = "policy",
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    return_stats: bool = False,
    process_group=None,
    shard_sizes: Optional[Sequence[int]] = None,
):
    """``policy_loss(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits:
    they are computed chunk by chunk (docs/math.md section 6), so an LM head over 32k-256k tokens
    costs a few chunks of memory, not (N, V).

    Args:
        input: hidden states (..., H).
        linear_weight: (V, H), the parameter itself (tied embeddings get their gradient).
        target: class indices of shape input.shape[:-1].
        linear_bias: (V,) or None.
        logit_scale, softcap: the logits are softcap tanh(logit_scale (input W^T + b) / softcap)
            (Gemma's final-logit softcapping; softcap=None: logit_scale (input W^T + b)).
        token_weight, loss_value: as in ``policy_loss``, shaped like the target.
        chunk_size: rows per chunk; by default the fp32 logits of a chunk are about 64 MiB or the
            input's size, whichever is larger. Results do not depend on it beyond rounding.
        backend: the row kernels ("auto", "cpu", "cuda", "triton"); "eager" materialises the logits
            (the reference).
        process_group, shard_sizes: vocab-parallel, as in ``policy_loss``: linear_weight (and
            linear_bias, weight) hold this rank's rows of the head (V_local, H), the input is the same
            on every rank; the gradient of linear_weight stays local, the input's is summed over
            the ranks in backward. This rank's (N, V_local) logits are materialised.
        The other arguments are ``policy_loss``'s, with the loss per row shaped like the target.
    """
    options = check_options(entropy_weight, label_smoothing, focal_gamma, ignore_index, reduction)
    terms, transform = _row_terms.check(token_weight, loss_value), check_logit_transform(logit_scale, softcap)
    if process_group is not None:
        if chunk_size is not None:
            raise ValueError("chunk_size applies to the fused (single-device) path, not to process_group")
        op = _vocab_parallel.VocabParallel(process_group, shard_sizes, backend)
        return run_linear_materialised(
            op,
            input,
            linear_weight,
            linear_bias,
            target,
            weight,
            ce_weight,
            epg_weight,
            options,
            return_stats,
            terms,
            transform,
        )
    return run_linear(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        ce_weight,
        epg_weight,
        options,
        check_chunk_size(chunk_size),
        backend,
        return_stats,
        terms,
        transform,
    )


def run_linear(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    ce_weight,
    epg_weight,
    options: Options,
    chunk_size: Optional[int],
    backend: str,
    return_stats: bool,
    terms: Optional[_row_terms.RowTerms] = None,
    transform: Tuple[float, float] = (1.0, 0.0),
):
    """`linear_policy_loss` with its options validated already (the module keeps them)."""
    x, y, weight, packed, row_shape = prepare_linear(
        input, linear_weight, linear_bias, target, weight, ce_weight, epg_weight, options, return_stats
    )
    token_weight = None if terms is None else _row_terms.token_weight_rows(terms.token_weight, row_shape, input.device)
    kernels = resolve(backend, input.device)
    if not isinstance(kernels, KernelBackend):  # the reference: the logits, materialised
        return run_linear_materialised(
            kernels,
            input,
            linear_weight,
            linear_bias,
            target,
            weight,
            ce_weight,
            epg_weight,
            options,
            return_stats,
            terms,
            transform,
        )
    check_target_range(y, linear_weight.shape[0], packed[3])
    if chunk_size is None:
        chunk_size = _linear.default_chunk_rows(
            x.shape[0], linear_weight.shape[0], x.shape[1], torch.finfo(_linear.compute_dtype(x)).bits // 8
        )
    reduced = options[4] != Reduction.NONE
    dft_value = terms is not None and terms.dft_value
    needs = _linear.needs_of(x, linear_weight, linear_bias, compact=not (return_stats or dft_value))
    op_weight = token_weight.to(accumulation_dtype(x.dtype)) if reduced and token_weight is not None else None
    loss, stats, *_ = torch.ops.aepg.linear_forward(
        x, linear_weight, linear_bias, y, weight, *packed, chunk_size, needs, kernels.name, op_weight, *transform
    )
    if terms is not None:
        call = (x, y, weight, *packed)
        loss = (
            _row_terms.apply_to_reduced(loss, stats, call, terms, token_weight, options[4])
            if reduced
            else _row_terms.apply(loss, stats, call, terms, token_weight, options[4], False)
        )
    return _with_stats(loss, stats, return_stats, row_shape)


def run_linear_materialised(
    op,
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    ce_weight,
    epg_weight,
    options: Options,
    return_stats: bool,
    terms: Optional[_row_terms.RowTerms],
    transform: Tuple[float, float],
):
    """The linear loss through the logits, materialised: the eager reference, or this rank's shard
    of them for the vocab-parallel op (whose input's gradient is summed over the ranks)."""
    x, y, weight, _, row_shape = prepare_linear(
        input, linear_weight, linear_bias, target, weight, ce_weight, epg_weight, options, return_stats
    )
    if terms is not None:
        terms = terms._replace(token_weight=_row_terms.token_weight_rows(terms.token_weight, row_shape, input.device))
    if isinstance(op, _vocab_parallel.VocabParallel):
        x = op.replicated(x)
    logits = _transformed(torch.nn.functional.linear(x, linear_weight, linear_bias), *transform)
    return _reshaped(run_op(op, logits, y, weight, ce_weight, epg_weight, options, return_stats, terms), row_shape)


def _transformed(logits: Tensor, logit_scale: float, softcap: float) -> Tensor:
    """The reference logit transform (the linear op applies it chunk by chunk)."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _reshaped(out, row_shape):
    """A per-row result of the flattened rows in the shape of the target."""
    if isinstance(out, tuple):
        loss, stats = out
        return (loss.reshape(row_shape) if loss.dim() else loss), LossStats(*(t.reshape(row_shape) for t in stats))
    return out.reshape(row_shape) if out.dim() else out


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, **kwargs):
    """Cross-entropy of a linear layer's logits, never materialised: ``F.linear_cross_entropy``."""
    return linear_policy_loss(input, linear_weight, target, ce_weight=1.0, epg_weight=0.0, **kwargs)


def linear_epg_loss(input: Tensor, linear_weight: Tensor, target: Tensor, **kwargs):
    """EPG (1 - p_y) of a linear layer's logits; its gradient is DFT's."""
    return linear_policy_loss(input, linear_weight, target, ce_weight=0.0, epg_weight=1.0, **kwargs)


def linear_dft_loss(input: Tensor, linear_weight: Tensor, target: Tensor, **kwargs):
    """DFT of a linear layer's logits: TRL's value -sg(p_y) log p_y, EPG's gradient."""
    return linear_policy_loss(input, linear_weight, target, ce_weight=0.0, epg_weight=1.0, loss_value="dft", **kwargs)


def linear_aepg_loss(input: Tensor, linear_weight: Tensor, target: Tensor, alpha: Coefficient, **kwargs):
    """aEPG (alpha CE + (1 - alpha) EPG) of a linear layer's logits; alpha a float or a 0-d tensor."""
    ce_weight, epg_weight = aepg_coefficients(alpha)
    return linear_policy_loss(input, linear_weight, target, ce_weight=ce_weight, epg_weight=epg_weight, **kwargs)


def cross_entropy(input: Tensor, target: Tensor, **kwargs):
    """Cross-entropy (a=1, b=0): ``F.cross_entropy`` through the fused kernels."""
    return policy_loss(input, target, ce_weight=1.0, epg_weight=0.0, **kwargs)


def epg_loss(input: Tensor, target: Tensor, **kwargs):
    """Expected Policy Gradient loss 1 - p_y (a=0, b=1); its gradient is p_y (p - e_y)."""
    return policy_loss(input, target, ce_weight=0.0, epg_weight=1.0, **kwargs)


def dft_loss(input: Tensor, target: Tensor, **kwargs):
    """DFT (dynamic fine-tuning): the value -sg(p_y) log p_y of TRL and Liger per row, with EPG's
    gradient p_y (p - e_y)."""
    return policy_loss(input, target, ce_weight=0.0, epg_weight=1.0, loss_value="dft", **kwargs)


def aepg_loss(input: Tensor, target: Tensor, alpha: Coefficient, **kwargs):
    """Annealed EPG: alpha CE + (1 - alpha) EPG, per-sample weight alpha + (1 - alpha) p_y.

    alpha may be a 0-d tensor on the input's device (no recompilation, CUDA-graph friendly)."""
    ce_weight, epg_weight = aepg_coefficients(alpha)
    return policy_loss(input, target, ce_weight=ce_weight, epg_weight=epg_weight, **kwargs)


def aepg_coefficients(alpha: Coefficient):
    """(ce_weight, epg_weight) = (alpha, 1 - alpha); for a tensor alpha the kernels take 1 - alpha
    from alpha itself (no tensor op per call)."""
    if isinstance(alpha, Tensor):
        return alpha, ONE_MINUS_CE_WEIGHT
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] or a 0-d tensor, got {alpha!r}")
    return float(alpha), 1.0 - float(alpha)
