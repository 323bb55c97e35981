"""The op's contract, declared once: what every backend's forward and backward take and return.

A call is `(logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags)`:
- logits (R, C) with unit column stride; target (R,) int32/int64 indices or (R, C) probabilities;
  weight (C,) or None; ce_weight_t / epg_weight_t 0-d tensors or None (then the float in scalars);
- scalars: floats indexed by `Scalar`; flags: an int of `Flag` bits, the reduction in the low two.

The forward returns (loss, stats, grad, denominator): the loss reduced (or per row) in the input
dtype, stats (NUM_STATS, R) in the accumulation dtype (rows indexed by `Stat`), the gradient of the
reduced loss for an upstream gradient of 1 when Flag.WRITE_GRAD is set (else an empty tensor), and
the 0-d "mean" denominator. The C++ operators mirror these enums in csrc/contract.h (their values
are exported by aepg_kernels._C and compared in the tests), so a new hyperparameter is one `Scalar`
row here, one there, and the line of the math that reads it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

Coefficient = Union[float, torch.Tensor]


class Reduction(enum.IntEnum):
    """Same numbering as ATen's at::Reduction; the low two bits of the flags."""

    NONE = 0
    MEAN = 1
    SUM = 2


class Scalar(enum.IntEnum):
    """Positions in the `scalars` list of a call."""

    CE_WEIGHT = 0  # a, when not given as a 0-d tensor
    EPG_WEIGHT = 1  # b, when not given as a 0-d tensor
    ENTROPY_WEIGHT = 2  # beta
    LABEL_SMOOTHING = 3  # eps
    FOCAL_GAMMA = 4  # gamma


class Flag(enum.IntFlag):
    """Bits of the `flags` word of a call (above the reduction's two bits)."""

    REDUCTION = 3  # mask of the Reduction value
    PROB_TARGET = 4  # target holds class probabilities
    NEED_ENTROPY = 8  # compute H(p) even without an entropy term (for the returned stats)
    WRITE_GRAD = 16  # the forward writes the gradient (set by the backend, never by the caller)
    EPG_ONE_MINUS_CE = 32  # the EPG weight is 1 - the CE weight tensor (aEPG: no `1 - alpha` op per call)


class Stat(enum.IntEnum):
    """Rows of the per-row statistics tensor of shape (NUM_STATS, n_rows) the kernels write."""

    LSE = 0  # log-sum-exp of the row
    ENTROPY = 1  # H(p) (NaN when the caller did not ask for it)
    P_TARGET = 2  # p_y (index targets) or sum_k q_k p_k (probability targets)
    SAMPLE_WEIGHT = 3  # per-row factor of (p - e_y) in the gradient
    ROW_WEIGHT = 4  # w_y for a counted row, 0 when ignored; sum_k w_k q_k for probability targets
    AUX = 5  # 1 - p_y, accurate near p_y = 1 (index); sum_k w_k q_k p_k (probability)
    ROW_MAX = 6  # the row max m (0 for a row of -inf), so that log p = (z - m) - log S
    LOG_SUM = 7  # log S = log sum_k exp(z_k - m): backward recomputes p without cancellation


NUM_SCALARS = len(Scalar)
NUM_STATS = len(Stat)
_PROB_TARGET, _NEED_ENTROPY = int(Flag.PROB_TARGET), int(Flag.NEED_ENTROPY)
_EPG_ONE_MINUS_CE = int(Flag.EPG_ONE_MINUS_CE)


class _OneMinusCeWeight:
    """The value of an EPG weight that is 1 - the CE weight (a 0-d tensor): aepg_loss passes it
    so that a tensor alpha costs no `1 - alpha` op; the kernels compute b = 1 - a."""

    def __repr__(self) -> str:
        return "ONE_MINUS_CE_WEIGHT"


ONE_MINUS_CE_WEIGHT = _OneMinusCeWeight()
# The EPG weight of a call: a Coefficient, or ONE_MINUS_CE_WEIGHT with a tensor CE weight.
EpgCoefficient = Union[float, torch.Tensor, _OneMinusCeWeight]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp16/bf16/fp32, fp64 math for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LossSpec:
    """The hyper-parameters of one call, unpacked for the Python backends. The CE and EPG
    weights are floats or 0-d tensors (the EPG weight may be ONE_MINUS_CE_WEIGHT)."""

    ce_weight: Coefficient = 1.0
    epg_weight: EpgCoefficient = 0.0
    entropy_weight: float = 0.0
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    ignore_index: int = -100
    reduction: Reduction = Reduction.MEAN
    prob_target: bool = False

    @property
    def has_entropy_term(self) -> bool:
        return self.entropy_weight != 0.0

    @classmethod
    def unpack(
        cls,
        ce_weight_t: Optional[torch.Tensor],
        epg_weight_t: Optional[torch.Tensor],
        scalars: List[float],
        ignore_index: int,
        flags: int,
    ) -> "LossSpec":
        """The inverse of `pack` (mirrored by `unpack` in csrc/ops.cpp)."""
        return cls(
            ce_weight=scalars[Scalar.CE_WEIGHT] if ce_weight_t is None else ce_weight_t,
            epg_weight=(
                ONE_MINUS_CE_WEIGHT
                if flags & Flag.EPG_ONE_MINUS_CE
                else scalars[Scalar.EPG_WEIGHT]
                if epg_weight_t is None
                else epg_weight_t
            ),
            entropy_weight=scalars[Scalar.ENTROPY_WEIGHT],
            label_smoothing=scalars[Scalar.LABEL_SMOOTHING],
            focal_gamma=scalars[Scalar.FOCAL_GAMMA],
            ignore_index=ignore_index,
            reduction=Reduction(flags & Flag.REDUCTION),
            prob_target=bool(flags & Flag.PROB_TARGET),
        )

    def pack(
        self, need_entropy: bool = False
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], List[float], int, int]:
        """(ce_weight_t, epg_weight_t, scalars, ignore_index, flags): the op's arguments after
        the tensors; a coefficient given as a tensor travels as a tensor, its scalar slot 0."""
        return pack(
            self.ce_weight,
            self.epg_weight,
            self.entropy_weight,
            self.label_smoothing,
            self.focal_gamma,
            self.ignore_index,
            self.reduction,
            self.prob_target,
            need_entropy,
        )


def pack(
    ce_weight: Coefficient,
    epg_weight: EpgCoefficient,
    entropy_weight: float,
    label_smoothing: float,
    focal_gamma: float,
    ignore_index: int,
    reduction: int,
    prob_target: bool,
    need_entropy: bool,
):
    """The op's hyperparameter arguments from validated values (see `LossSpec.pack`), in plain
    ints and floats (enum arithmetic would cost microseconds on every call)."""
    a_t = ce_weight if isinstance(ce_weight, torch.Tensor) else None
    one_minus = epg_weight is ONE_MINUS_CE_WEIGHT
    b_t = epg_weight if isinstance(epg_weight, torch.Tensor) else None
    scalars = [
        0.0 if a_t is not None else ce_weight,
        0.0 if b_t is not None or one_minus else epg_weight,
        entropy_weight,
        label_smoothing,
        focal_gamma,
    ]  # in the order of Scalar
    flags = int(reduction)
    if one_minus:
        flags |= _EPG_ONE_MINUS_CE
    if prob_target:
        flags |= _PROB_TARGET
    if need_entropy:
        flags |= _NEED_ENTROPY
    return a_t, b_t, scalars, ignore_index, flags


def with_flag(flags: int, flag: Flag, on: bool) -> int:
    bit = int(flag)  # plain ints: IntFlag's ~ caches its result, which torch.compile would guard on
    return (flags | bit) if on else (flags & ~bit)
