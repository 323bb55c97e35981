"""Random inputs of a case: logits (several copies, cycled so that caches do not flatter),
targets, and the upstream gradient the mode feeds to backward."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from .sweeps import DTYPES, MODES, Case

LOGIT_SCALE = 3.0  # N(0, 3^2) logits: softmax neither uniform nor one-hot, like a half-trained model


@dataclass
class CaseInputs:
    logits: List[torch.Tensor]  # `rotations` copies with different values
    target: List[torch.Tensor]  # one per copy of the logits
    upstream: Optional[torch.Tensor]  # 1 (0-d) for reduction "mean", per-row values for "none", None in forward
    # Which copy the next call reads, shared by every implementation of the case: each one goes on
    # where the previous stopped instead of re-reading the copies that one just left in cache.
    cursor: Iterator[int] = field(init=False, repr=False)

    def __post_init__(self):
        self.cursor = itertools.cycle(range(len(self.logits)))

    @property
    def rotations(self) -> int:
        return len(self.logits)


ALIGN_ELEMENTS = 128  # copies start at multiples of 128 elements: 256 bytes or more


def _aligned(numel: int) -> int:
    return -(-numel // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


def make_inputs(
    case: Case, device: torch.device, rotations: int = 1, rows: Optional[int] = None, seed: int = 0
) -> CaseInputs:
    """`rows` limits N (the correctness gate uses the first rows of the case)."""
    n = case.n if rows is None else min(case.n, rows)
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    # One allocation per tensor kind, the copies as its views: thousands of copies of a small shape
    # cost one call. Each copy starts aligned as a fresh allocation would (kernels specialise on it).
    stride = _aligned(n * case.c)
    block = torch.randn(rotations, stride, generator=gen, device=device).mul_(LOGIT_SCALE).to(dtype)
    logits = [row[: n * case.c].view(n, case.c) for row in block]
    block = torch.randint(0, case.c, (rotations, _aligned(n)), generator=gen, device=device)
    target = [row[:n] for row in block]
    mode = MODES[case.mode]
    if not mode.backward:
        upstream = None
    elif mode.per_row_upstream:
        upstream = torch.rand(n, generator=gen, device=device).to(dtype)
    else:
        upstream = torch.ones((), dtype=dtype, device=device)
    return CaseInputs(logits, target, upstream)
