"""What a benchmark run measures: loss configurations, modes, dtypes, shapes, and the suites
that combine them (benchmarks/README.md). Pure data and arithmetic: no timing, no device."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class LossVariant:
    """One member of the loss family, as keyword arguments of `aepg_kernels.policy_loss`."""

    name: str
    options: Tuple[Tuple[str, float], ...]

    @property
    def kwargs(self) -> Dict[str, float]:
        return dict(self.options)


LOSSES: Dict[str, LossVariant] = {
    loss.name: loss
    for loss in (
        LossVariant("ce", (("ce_weight", 1.0), ("epg_weight", 0.0))),
        LossVariant("epg", (("ce_weight", 0.0), ("epg_weight", 1.0))),
        LossVariant("aepg", (("ce_weight", 0.5), ("epg_weight", 0.5), ("entropy_weight", 0.1))),  # alpha=0.5, beta=0.1
    )
}


@dataclass(frozen=True)
class Mode:
    name: str
    backward: bool
    reduction: str  # "none": the backward gets a per-row upstream gradient

    @property
    def per_row_upstream(self) -> bool:
        return self.backward and self.reduction == "none"


MODES: Dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode("fwd", backward=False, reduction="mean"),
        Mode("fwd+bwd", backward=True, reduction="mean"),  # upstream gradient 1 (loss.backward())
        Mode("fwd+bwd/rows", backward=True, reduction="none"),  # random per-row upstream gradient
    )
}

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CLASSIFICATION_C = (10, 100, 1000, 1001, 4096, 21843)
CLASSIFICATION_N = (256, 4096, 65536, 1048576)
LLM_C = (32000, 50257, 128256, 151936, 262144)
LLM_N = (2048, 8192, 16384)


@dataclass(frozen=True)
class Case:
    """One measured configuration; every implementation that supports it runs it."""

    loss: str
    mode: str
    dtype: str
    n: int
    c: int

    @property
    def label(self) -> str:
        return f"{self.loss} {self.mode} {self.dtype} {self.n}x{self.c}"

    @property
    def elements(self) -> int:
        return self.n * self.c


def element_bytes(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def logits_bytes(case: Case) -> int:
    return case.elements * element_bytes(case.dtype)


# A shape runs for an implementation only if its inputs, the gradient and the implementation's
# workspace fit in MEMORY_FRACTION of the device memory. Workspaces are counted in fp32 copies of
# the logits (the composites compute in fp32 whatever the input dtype): see Implementation.
MEMORY_FRACTION = 0.8


def memory_needed(case: Case, workspace_fp32_copies: float, rotations: int = 1) -> int:
    """Input copies + one gradient + the workspace, in bytes."""
    return logits_bytes(case) * (rotations + 1) + int(case.elements * 4 * workspace_fp32_copies)


def fits(case: Case, memory_bytes: Optional[int], workspace_fp32_copies: float, rotations: int = 1) -> bool:
    """None: memory unknown (a CPU), run it."""
    needed = memory_needed(case, workspace_fp32_copies, rotations)
    return memory_bytes is None or needed <= MEMORY_FRACTION * memory_bytes


def grid(
    losses: Iterable[str], modes: Iterable[str], dtypes: Iterable[str], shapes: Iterable[Tuple[int, int]]
) -> List[Case]:
    shapes = list(shapes)
    return [Case(loss, mode, dtype, n, c) for dtype in dtypes for mode in modes for loss in losses for n, c in shapes]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    cases: Tuple[Case, ...]
    # Cases that would start after this many seconds are skipped and recorded so (None: no limit);
    # `--max-seconds` overrides it. The cases are ordered by priority for this reason.
    budget_seconds: Optional[float] = None
    # torch.compile only on the target shapes (`target`, benchmarks/README.md "Targets"): each case
    # recompiles, which ~130 cases cannot afford. The CPU suites compile every case.
    compile_targets_only: bool = False
    # "kernels": every implementation per case (runner.py); "overhead": the drop-in rows of
    # overhead.py (nn.CrossEntropyLoss vs ak.PolicyLoss vs aEPG) interleaved on the CPU.
    kind: str = "kernels"


def _unique(cases: Iterable[Case]) -> Tuple[Case, ...]:
    return tuple(dict.fromkeys(cases))


def quick_suite() -> Suite:
    """The main job: this device, fused vs eager vs torch.compile, a few shapes, all three modes
    on one classification shape; about two minutes on a 2-core CPU including compile time."""
    cases = grid(["aepg"], ["fwd+bwd"], ["fp32"], [(256, 100), (4096, 1000)])
    cases += grid(["aepg"], ["fwd", "fwd+bwd/rows"], ["fp32"], [(4096, 1000)])
    cases += grid(["ce"], ["fwd+bwd"], ["fp32"], [(4096, 1000)])
    return Suite("quick", "fused vs eager vs torch.compile on this device, a few shapes", _unique(cases))


def cpu_suite() -> Suite:
    """The CPU table: aEPG at four shapes from 256x100 to 8192x32000, plus the modes and losses."""
    shapes = [(256, 100), (256, 1000), (4096, 1000), (8192, 32000)]
    cases = grid(["aepg"], ["fwd+bwd"], ["fp32"], shapes)
    cases += grid(["ce", "epg"], ["fwd+bwd"], ["fp32"], [(4096, 1000)])
    cases += grid(["aepg"], ["fwd", "fwd+bwd/rows"], ["fp32"], [(4096, 1000), (8192, 32000)])
    cases += grid(["aepg"], ["fwd+bwd"], ["bf16"], [(4096, 1000)])
    return Suite("cpu", "the CPU table: native cpu kernel vs eager vs torch.compile", _unique(cases))


GPU_BUDGET_SECONDS = 420.0  # cases that would start later are skipped (a GPU session lasts minutes)

# The performance targets (benchmarks/README.md "Targets"), all fwd+bwd: large C (bf16 8192x128256,
# fp32 16384x32000) against Liger and torch.compile; classification (N >= 4096, C 100-21843) against
# eager and torch.compile.
LARGE_C_TARGETS = (("bf16", 8192, 128256), ("fp32", 16384, 32000))
CLASSIFICATION_TARGET_MIN_N, CLASSIFICATION_TARGET_C = 4096, (100, 21843)
COMPILE_SKIPPED = (
    "torch.compile is timed on the target shapes only in this suite (fwd+bwd: bf16 8192x128256, "
    "fp32 16384x32000, N >= 4096 with 100 <= C <= 21843): each case recompiles"
)


def target(case: Case) -> Optional[str]:
    """Which of the performance targets `case` measures ('large C', 'classification'), or None."""
    if case.mode != "fwd+bwd":
        return None
    if (case.dtype, case.n, case.c) in LARGE_C_TARGETS:
        return "large C"
    low, high = CLASSIFICATION_TARGET_C
    if case.n >= CLASSIFICATION_TARGET_MIN_N and low <= case.c <= high:
        return "classification"
    return None


def gpu_suite() -> Suite:
    """The full GPU sweep, ordered by priority since the time budget cuts from the end. First the
    performance targets, cheapest first so that the budget cuts them last: N=256 (us per call with
    and without a CUDA graph), CE at large C (vs Liger and torch.compile), the classification
    targets (vs eager and torch.compile), aEPG at large C. Then the classification grid (bf16), the
    LLM vocabularies at N=8192, every loss x mode x dtype at 4096x1000, the other LLM row counts, the
    fp32 classification grid, and every loss x mode x dtype at 8192x50257. torch.compile runs on
    the target shapes only (`compile_targets_only`)."""
    targets = grid(["aepg"], ["fwd+bwd"], ["bf16"], [(256, 100), (256, 21843)])
    targets += grid(["ce"], ["fwd+bwd"], ["bf16"], [(8192, 128256)])
    targets += grid(["ce"], ["fwd+bwd"], ["fp32"], [(16384, 32000)])
    targets += grid(["aepg"], ["fwd+bwd"], ["bf16"], [(4096, 1000), (4096, 21843), (4096, 100), (65536, 1000)])
    targets += grid(["aepg"], ["fwd+bwd"], ["bf16"], [(8192, 128256)])
    targets += grid(["aepg"], ["fwd+bwd"], ["fp32"], [(16384, 32000)])
    classification = grid(["aepg"], ["fwd+bwd"], ["bf16"], [(n, c) for c in CLASSIFICATION_C for n in CLASSIFICATION_N])
    llm = grid(["ce", "aepg"], ["fwd+bwd"], ["bf16"], [(8192, c) for c in LLM_C])
    coverage = grid(list(LOSSES), list(MODES), list(DTYPES), [(4096, 1000)])
    llm_rows = grid(["ce", "aepg"], ["fwd+bwd"], ["bf16"], [(n, c) for c in LLM_C for n in LLM_N])
    fp32_classification = grid(
        ["aepg"], ["fwd+bwd"], ["fp32"], [(n, c) for c in CLASSIFICATION_C for n in CLASSIFICATION_N]
    )
    llm_coverage = grid(list(LOSSES), list(MODES), list(DTYPES), [(8192, 50257)])
    cases = targets + classification + llm + coverage + llm_rows + fp32_classification + llm_coverage
    return Suite(
        "gpu",
        "the full GPU sweep: classification and LLM shapes, all modes, losses and dtypes",
        _unique(cases),
        budget_seconds=GPU_BUDGET_SECONDS,
        compile_targets_only=True,
    )


# The overhead suite: what a user sees swapping nn.CrossEntropyLoss() for ak.PolicyLoss() in a
# classification loop. Its "fwd" cases are the evaluation loop (under torch.no_grad()).
OVERHEAD_SHAPES = ((8, 10), (32, 10), (32, 100), (256, 100), (256, 1000), (1024, 1000), (4096, 1000))
OVERHEAD_MODES = ("fwd+bwd", "fwd")
OVERHEAD_MODE_TITLES = {"fwd+bwd": "fwd+bwd", "fwd": "eval forward"}


def overhead_cases(
    shapes: Iterable[Tuple[int, int]] = OVERHEAD_SHAPES, modes: Sequence[str] = OVERHEAD_MODES, dtype: str = "fp32"
) -> List[Case]:
    """The overhead suite's cases: CE (the loss being replaced) per mode and shape, modes outer."""
    return grid(["ce"], modes, [dtype], shapes)


def overhead_suite() -> Suite:
    """nn.CrossEntropyLoss() vs ak.PolicyLoss() vs aEPG, per call on the CPU, fwd+bwd and eval."""
    return Suite(
        "overhead",
        "drop-in cost: nn.CrossEntropyLoss vs ak.PolicyLoss vs aEPG per call on the CPU",
        _unique(overhead_cases()),
        kind="overhead",
    )


def llm_suite() -> Suite:
    """An LM head, F.linear + loss without the (N, V) logits vs eager, torch.compile and
    F.linear_cross_entropy; its cases (N x H x V) are llm.cases, not Case."""
    return Suite("llm", "fused linear + loss (an LM head) vs eager, compile and F.linear_cross_entropy", (), kind="llm")


SUITES = {"quick": quick_suite, "cpu": cpu_suite, "gpu": gpu_suite, "overhead": overhead_suite, "llm": llm_suite}


def parse_dims(text: str, layout: str, example: str) -> List[Tuple[int, ...]]:
    """'256x100,4096x1000' -> [(256, 100), (4096, 1000)] for layout 'NxC': each comma-separated item
    has as many positive integers as `layout` names; ValueError naming --shapes otherwise."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != len(layout.split("x")) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: expected {layout} with positive integers (e.g. {example}), got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """'256x100,4096x1000' -> [(256, 100), (4096, 1000)] (N x C)."""
    return parse_dims(text, "NxC", "4096x1000")


def parse_head_shapes(text: str) -> List[Tuple[int, int, int]]:
    """'2048x256x128256,64x16x256' -> [(2048, 256, 128256), (64, 16, 256)] (N x H x V of --suite llm)."""
    return parse_dims(text, "NxHxV", "2048x256x128256")


def check_names(kind: str, names: Sequence[str], known: Iterable[str]) -> List[str]:
    known = list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--{kind}: unknown {unknown}; expected some of {known}")
    return list(names)


def rotations(case: Case, flush_bytes: int, max_rotations: int) -> int:
    """How many copies of the inputs to cycle through so that each call reads logits that are not
    in cache: enough to cover `flush_bytes` (more than the last-level cache), at most
    `max_rotations` (shapes under flush_bytes / max_rotations bytes stay cache-resident)."""
    return max(1, min(max_rotations, math.ceil(flush_bytes / max(logits_bytes(case), 1))))
