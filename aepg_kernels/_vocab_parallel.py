"""Vocab-parallel losses: the classes sharded over the ranks of a torch.distributed group, each rank
holding a contiguous shard of the logits (N, C_local) (docs/math.md section 8).

Every rank sums its shard's classes into a few numbers per row, relative to its shard's row max
(`_INDEX`, `_PROB`), and one all-gather brings every rank's sums to every rank, which merges them in
rank order: the same loss, stats and per-row weights on every rank, bit for bit, from one
collective of O(N) floats whatever C is. The row formulas are the eager reference's
(`index_rows_from_sums`, `prob_rows_from_sums`), fed the merged sums. Autograd runs through the
local sums only: the all-gather's backward keeps this rank's slice of the gradient (each rank
back-propagates its own copy of the replicated loss), so the logits' gradient stays local and
backward needs no collective.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._contract import LossSpec, Reduction, Stat, accumulation_dtype
from ._spec import widen_targets
from .backends.eager import (
    assemble_stats,
    coefficients,
    index_rows_from_sums,
    prob_rows_from_sums,
    reduce_rows,
    stable_log_p_target,
)

# Per-row sums of a shard, relative to its row max m_r (e = exp(z - m_r), z' = z - m_r, w the class
# weights, 1 without; q the probability targets, q' = (1 - eps) q + eps / C):
# index targets: sum e, sum e z', sum over k != y of e, z'_y (owner), owner (1/0), sum w, sum w z',
#                w_y (owner)
_INDEX: Tuple[str, ...] = ("S", "T", "X", "Y", "OWN", "W", "Z", "WY")
# probability targets: sum e, sum e z', sum w q' z', sum w q', sum w q e, sum w q, sum q e
_PROB: Tuple[str, ...] = ("S", "T", "A", "B", "WQE", "WQ", "QE")


def shard_offset(shard_sizes: Sequence[int], rank: int) -> int:
    return sum(shard_sizes[:rank])


def gathered_shard_sizes(local_classes: int, group, device: torch.device) -> List[int]:
    """Every rank's number of classes (one small collective, read on the host)."""
    mine = torch.tensor([local_classes], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(size) for size in torch.cat(sizes).tolist()]


def check_shard_sizes(shard_sizes, world_size: int) -> List[int]:
    if (
        not isinstance(shard_sizes, (list, tuple))
        or len(shard_sizes) != world_size
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shard_sizes)
    ):
        raise ValueError(
            f"shard_sizes must list every rank's number of classes ({world_size} ints >= 1), got {shard_sizes!r}"
        )
    return list(shard_sizes)


class _GatherRows(torch.autograd.Function):
    """All-gather of (K, N) per-rank sums into (R, K, N). Backward: this rank's slice, since every
    rank computes the same loss from the gathered sums and back-propagates its own copy."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(partial) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, partial.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.rank], None


def _index_partials(z: Tensor, target: Tensor, weight: Optional[Tensor], offset: int, spec: LossSpec) -> Tensor:
    n_local = z.shape[1]
    local = target - offset
    owner = (target != spec.ignore_index) & (local >= 0) & (local < n_local)
    y = torch.where(owner, local, 0).unsqueeze(1)
    e = z.exp()
    finite_z = torch.where(e > 0, z, 0.0)  # a masked class (z = -inf) adds 0, never 0 * inf
    is_y = torch.zeros_like(owner.unsqueeze(1).expand_as(z)).scatter_(1, y, owner.unsqueeze(1))
    w = torch.ones(n_local, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    own = owner.to(z.dtype)
    return torch.stack(
        [
            e.sum(1),
            (e * finite_z).sum(1),
            torch.where(is_y, 0.0, e).sum(1),
            z.gather(1, y).squeeze(1) * own,
            own,
            w.sum().expand(z.shape[0]),
            torch.where(w != 0, w * finite_z, 0.0).sum(1),
            w[y.squeeze(1)] * own,
        ]
    )


def _prob_partials(z: Tensor, q: Tensor, weight: Optional[Tensor], n_classes: int, spec: LossSpec) -> Tensor:
    eps = spec.label_smoothing
    q = q.to(z.dtype)
    e = z.exp()
    finite_z = torch.where(e > 0, z, 0.0)
    wq = q if weight is None else q * weight.to(z.dtype)
    wq_smooth = (1 - eps) * wq + eps / n_classes * (1 if weight is None else weight.to(z.dtype))
    return torch.stack(
        [
            e.sum(1),
            (e * finite_z).sum(1),
            torch.where(wq_smooth != 0, wq_smooth * finite_z, 0.0).sum(1),
            wq_smooth.sum(1),
            (wq * e).sum(1),
            wq.sum(1),
            (q * e).sum(1),
        ]
    )


def _merge(gathered: Tensor, row_max: Tensor, names) -> tuple[dict, Tensor]:
    """The sums of all shards relative to the global row max M, from (R, K, N) per-rank sums
    relative to each rank's max (R, N): e-weighted sums scale by exp(m_r - M); sums of z' gain
    (m_r - M) times their weight sum. Summed in rank order (deterministic)."""
    top = row_max.amax(0)
    top = torch.where(top == float("-inf"), 0.0, top)
    empty = row_max == float("-inf")
    shift = torch.where(empty, 0.0, row_max - top)  # (R, N)
    scale = torch.where(empty, 0.0, shift.exp())
    part = dict(zip(names, gathered.unbind(1)))
    merged = {"S": (scale * part["S"]).sum(0), "T": (scale * (part["T"] + shift * part["S"])).sum(0)}
    if "X" in part:
        merged.update(
            X=(scale * part["X"]).sum(0),
            Y=(part["Y"] + shift * part["OWN"]).sum(0),
            OWN=part["OWN"].sum(0),
            W=part["W"].sum(0),
            Z=(part["Z"] + shift * part["W"]).sum(0),
            WY=part["WY"].sum(0),
        )
    else:
        merged.update(
            A=(part["A"] + shift * part["B"]).sum(0),
            B=part["B"].sum(0),
            WQE=(scale * part["WQE"]).sum(0),
            WQ=part["WQ"].sum(0),
            QE=(scale * part["QE"]).sum(0),
        )
    return merged, top


def rows(logits: Tensor, target: Tensor, weight: Optional[Tensor], spec: LossSpec, group, shard_sizes: List[int]):
    """(per-row loss in the accumulation dtype, stats (NUM_STATS, N)) of a shard (N, C_local)."""
    acc = accumulation_dtype(logits.dtype)
    rank, n_classes = dist.get_rank(group), sum(shard_sizes)
    z = logits.to(acc)
    local_max = z.amax(1, keepdim=True).detach()
    z = z - torch.where(local_max == float("-inf"), 0.0, local_max)
    if spec.prob_target:
        partial, names = _prob_partials(z, target, weight, n_classes, spec), _PROB
    else:
        partial, names = _index_partials(z, target, weight, shard_offset(shard_sizes, rank), spec), _INDEX
    size_row = torch.full((1, z.shape[0]), float(logits.shape[1]), dtype=acc, device=z.device)
    gathered = _GatherRows.apply(torch.cat([partial, local_max.T, size_row]), group)
    _check_gathered_sizes(gathered[:, -1], shard_sizes)
    sums, top = _merge(gathered[:, :-2], gathered[:, -2].detach(), names)
    log_s = sums["S"].log()
    entropy = log_s - sums["T"] / sums["S"]
    a, b = coefficients(spec, acc)
    if spec.prob_target:
        ce = log_s * sums["B"] - sums["A"]
        loss, named = prob_rows_from_sums(
            ce, sums["WQE"] / sums["S"], sums["WQ"], sums["QE"] / sums["S"], entropy, spec, a, b
        )
    else:
        counted = target != spec.ignore_index
        bad = counted & (sums["OWN"] != 1)
        _check_targets(bad, target, n_classes)
        om = sums["X"] / sums["S"]
        logp_y = stable_log_p_target(om, sums["Y"] - log_s)
        smooth = log_s * sums["W"] - sums["Z"] if spec.label_smoothing > 0 else None
        loss, named = index_rows_from_sums(logp_y, om, entropy, sums["WY"], smooth, counted, bad, n_classes, spec, a, b)
        loss = torch.where(bad, float("nan"), loss)
    return loss, assemble_stats(named, log_s, top, entropy)


def _check_gathered_sizes(sizes: Tensor, shard_sizes: List[int]) -> None:
    """Every rank reads the same gathered sizes, so every rank raises (or none): never a hang."""
    if sizes.device.type != "cpu" or sizes.shape[1] == 0:
        return
    actual = [int(n) for n in sizes[:, 0].tolist()]
    if actual != shard_sizes:
        raise ValueError(f"shard_sizes {shard_sizes} do not match the ranks' logits, which have {actual} classes")


def _check_targets(bad: Tensor, target: Tensor, n_classes: int) -> None:
    """On the CPU (no device sync), a counted target that no shard holds raises on every rank;
    on CUDA its row is NaN, as in the single-device kernels."""
    if target.device.type == "cpu" and bool(bad.any()):
        index = int(target[bad][0])
        raise IndexError(f"target: class index {index} is out of bounds for C={n_classes} (the sum of the shards)")


def is_class_sharded(input) -> bool:
    """Whether `input` is a DTensor (N, C) sharded on its classes over a 1-d device mesh."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    if not isinstance(input, DTensor):
        return False
    if input.dim() != 2 or input.device_mesh.ndim != 1 or input.placements[0] not in (Shard(1), Shard(-1)):
        raise ValueError(
            f"a DTensor input must be (N, C) sharded on C over a 1-d mesh, got shape "
            f"{tuple(input.shape)} placements {input.placements} on a {input.device_mesh.ndim}-d mesh"
        )
    return True


def local_shards(input, target, weight):
    """(input, target, weight, group) of a class-sharded DTensor call, as local tensors."""
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in (input, target, weight)]
    return (*local, input.device_mesh.get_group())


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks: the input of a sharded linear
    head is the same on every rank, and each rank's shard of the logits adds to its gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, group) -> Tensor:
        ctx.group = group
        return input.view_as(input)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class VocabParallel:
    """The op over a vocab-parallel group, with a backend's `loss(*call)` interface (the call
    packed by `_spec.prepare` from this rank's shard)."""

    def __init__(self, group, shard_sizes: Optional[Sequence[int]], backend: str):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group needs torch.distributed initialised (init_process_group)")
        if backend not in ("auto", "eager"):
            raise ValueError(
                f'process_group runs the eager composite over merged row sums: backend must be "auto" '
                f'or "eager", got {backend!r}'
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.shard_sizes = None if shard_sizes is None else check_shard_sizes(shard_sizes, self.world_size)

    def replicated(self, input: Tensor) -> Tensor:
        """The input of a sharded linear head, its gradient summed over the ranks in backward."""
        return _SumGradOverRanks.apply(input, self.group)

    def loss(self, logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags):
        spec = LossSpec.unpack(ce_weight_t, epg_weight_t, scalars, ignore_index, flags)
        sizes = self.shard_sizes or gathered_shard_sizes(logits.shape[1], self.group, logits.device)
        if not spec.prob_target:
            target = widen_targets(target, spec.ignore_index)
        row_loss, stats = rows(logits, target, weight, spec, self.group, sizes)
        if spec.prob_target:
            denominator = torch.full((), target.shape[0], dtype=row_loss.dtype, device=logits.device)
        else:
            denominator = stats[Stat.ROW_WEIGHT].sum()
        return reduce_rows(row_loss, denominator, Reduction(spec.reduction)).to(logits.dtype), stats
