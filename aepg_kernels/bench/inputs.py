"""Random inputs of a case: logits (several copies, cycled so that caches do not flatter),
targets, and the upstream gradient the mode feeds to backward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .sweeps import DTYPES, MODES, Case

LOGIT_SCALE = 3.0  # N(0, 3^2) logits: softmax neither uniform nor one-hot, like a half-trained model


@dataclass
class CaseInputs:
    logits: List[torch.Tensor]    # `rotations` copies with different values
    target: List[torch.Tensor]    # one per copy of the logits
    upstream: Optional[torch.Tensor]  # 1 (0-d) for reduction "mean", per-row values for "none", None in forward

    @property
    def rotations(self) -> int:
        return len(self.logits)


def make_inputs(case: Case, device: torch.device, rotations: int = 1, rows: Optional[int] = None,
                seed: int = 0) -> CaseInputs:
    """`rows` limits N (the correctness gate uses the first rows of the case)."""
    n = case.n if rows is None else min(case.n, rows)
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    logits, target = [], []
    for _ in range(rotations):
        logits.append((LOGIT_SCALE * torch.randn(n, case.c, generator=gen, device=device)).to(dtype))
        target.append(torch.randint(0, case.c, (n,), generator=gen, device=device))
    mode = MODES[case.mode]
    if not mode.backward:
        upstream = None
    elif mode.per_row_upstream:
        upstream = torch.rand(n, generator=gen, device=device).to(dtype)
    else:
        upstream = torch.ones((), dtype=dtype, device=device)
    return CaseInputs(logits, target, upstream)
