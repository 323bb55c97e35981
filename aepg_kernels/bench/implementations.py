"""The implementations a run puts side by side. Each one turns a case into a loss function
`fn(logits, target) -> loss` (reduction as the case's mode says), or says why it cannot run it.

- lean-eager:        the composite a user writes for the loss (`lean_composite`: log_softmax,
                     gather, exp and only the case's terms): the default speed-up baseline
- lean-compile:      ``torch.compile`` of that lean composite (fullgraph, static shapes, one per case;
                     on the GPU suite only on the target shapes, see sweeps.target)
- reference:         the package's own stability-first composite, ``policy_loss(backend="eager")``
                     (labelled "reference (package eager)"), an extra row
- reference-compile: ``torch.compile`` of the reference; only when named in --implementations
- F.cross_entropy:   PyTorch's own cross entropy (CE only), the baseline a CE user has
- liger:             Liger-Kernel's Triton cross entropy (CE only, CUDA, when importable)
- triton/cuda/cpu:   our fused backends, those ``available_backends()`` offers for the device
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import aepg_kernels as ak
from aepg_kernels.backends import triton_interpreter

from .sweeps import LOSSES, MODES, Case

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FUSED_BACKENDS = ak.KERNEL_BACKENDS


def policy_loss_fn(case: Case, backend: str) -> LossFn:
    options = LOSSES[case.loss].kwargs
    reduction = MODES[case.mode].reduction

    def loss(logits, target):
        return ak.policy_loss(logits, target, reduction=reduction, backend=backend, **options)

    return loss


def _weighted(weight: float, term: torch.Tensor) -> torch.Tensor:
    return term if weight == 1 else weight * term


def lean_composite(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    epg_weight: float = 0.0,
    entropy_weight: float = 0.0,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss family as a user writes it (index targets, no class weights): fp32 log-probabilities,
    the target's, and only the terms with a nonzero weight, with no stability measures beyond
    log_softmax (the package's reference composite has those).
    loss_i = a [(1-eps) (1-p_y)^gamma (-log p_y) + eps mean_k(-log p_k)] + b (1-p_y) + beta H(p)."""
    logp = logits.float().log_softmax(-1)
    lp_y = logp.gather(1, target[:, None]).squeeze(1)
    p_y = lp_y.exp()
    terms = []
    if ce_weight:
        ce = -lp_y if not focal_gamma else -(1 - p_y).pow(focal_gamma) * lp_y
        if label_smoothing:
            ce = (1 - label_smoothing) * ce - label_smoothing * logp.mean(-1)
        terms.append(_weighted(ce_weight, ce))
    if epg_weight:
        terms.append(_weighted(epg_weight, 1 - p_y))
    if entropy_weight:
        terms.append(_weighted(entropy_weight, -(logp.exp() * logp).sum(-1)))
    if not terms:
        raise ValueError("lean_composite: every weight is 0 (no loss term)")
    loss = sum(terms[1:], terms[0])
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def lean_fn(case: Case) -> LossFn:
    options = LOSSES[case.loss].kwargs
    reduction = MODES[case.mode].reduction
    return lambda logits, target: lean_composite(logits, target, reduction=reduction, **options)


def compiled(fn: LossFn) -> LossFn:
    # Dynamo caches compiled code per Python code object, not per closure: every case (a new static
    # shape) would add a recompilation until the recompile limit fails the run. Each case starts
    # from an empty cache instead; no earlier case's compiled code is used again.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def torch_cross_entropy_fn(case: Case) -> LossFn:
    reduction = MODES[case.mode].reduction
    return lambda logits, target: F.cross_entropy(logits, target, reduction=reduction)


def liger_fn(case: Case) -> LossFn:
    from liger_kernel.transformers.functional import liger_cross_entropy

    reduction = MODES[case.mode].reduction
    return lambda logits, target: liger_cross_entropy(logits, target, reduction=reduction)


def liger_version() -> Optional[str]:
    """The installed Liger-Kernel version, or None when it does not import."""
    try:
        from importlib.metadata import version

        import liger_kernel.transformers.functional  # noqa: F401

        return version("liger-kernel")
    except Exception:  # noqa: BLE001  (any import failure means: no Liger baseline)
        return None


@dataclass(frozen=True)
class Implementation:
    name: str  # as --implementations and the records name it
    build: Callable[[Case], LossFn]
    ce_only: bool = False
    fused: bool = False  # one of our backends (the speed-ups are reported for these)
    compiled: bool = False  # torch.compile: seconds per case, skipped off target on the GPU suite
    by_default: bool = True  # runs unless --implementations leaves it out (else only when named)
    title: str = ""  # the table's name for it when not `name`
    in_place: bool = False  # overwrites its input logits (Liger writes the gradient there)
    # Peak temporaries in fp32 copies of the logits (estimates, for skipping shapes that cannot fit):
    # the eager composite upcasts, shifts, keeps log-probabilities, probabilities, entropy terms
    # and their gradients; Inductor recomputes in backward; the fused kernels need O(N).
    workspace_fp32_copies: float = 0.0

    @property
    def label(self) -> str:
        return self.title or self.name

    def unsupported(self, case: Case) -> Optional[str]:
        """Why this implementation does not run `case`, or None."""
        if self.ce_only and case.loss != "ce":
            return "cross entropy only"
        return None


def fused_backend(name: str) -> Implementation:
    """One of our backends (cuda, triton, cpu) through `policy_loss(backend=name)`."""
    return Implementation(name, lambda case: policy_loss_fn(case, name), fused=True)


# The lean composite keeps log-probabilities, their exp and product (entropy) and their gradients.
LEAN_EAGER = Implementation("lean-eager", lean_fn, workspace_fp32_copies=5)
LEAN_COMPILE = Implementation(
    "lean-compile", lambda case: compiled(lean_fn(case)), compiled=True, workspace_fp32_copies=2
)
REFERENCE = Implementation(
    "reference", lambda case: policy_loss_fn(case, "eager"), workspace_fp32_copies=7, title="reference (package eager)"
)
REFERENCE_COMPILE = Implementation(
    "reference-compile",
    lambda case: compiled(policy_loss_fn(case, "eager")),
    compiled=True,
    by_default=False,
    workspace_fp32_copies=2,
    title="reference compiled",
)
TORCH_CE = Implementation("F.cross_entropy", torch_cross_entropy_fn, ce_only=True, workspace_fp32_copies=3)
LIGER = Implementation("liger", liger_fn, ce_only=True, in_place=True)
BASELINE = LEAN_EAGER.name  # always runs: every speed-up is "x vs lean eager" first
ALL_NAMES = (
    "lean-eager",
    "lean-compile",
    "reference",
    "reference-compile",
    "F.cross_entropy",
    "liger",
) + FUSED_BACKENDS
# Names of earlier versions (when "eager" was the package's composite): a hint instead of "unknown".
RENAMED = {
    "eager": "lean-eager (the lean composite) or reference (the package's eager composite)",
    "compile": "lean-compile (torch.compile of the lean composite) or reference-compile",
}
# The JSON's speed-up fields, each against one baseline implementation (None where it did not run).
SPEEDUP_BASELINES = {
    "speedup_vs_lean_eager": "lean-eager",
    "speedup_vs_lean_compile": "lean-compile",
    "speedup_vs_torch_ce": "F.cross_entropy",
    "speedup_vs_reference": "reference",
}


def available(device: torch.device) -> Dict[str, str]:
    """name -> why it is left out on `device` ('' when it runs)."""
    backends = ak.available_backends()
    reasons = {name: "" for name in ("lean-eager", "lean-compile", "reference", "reference-compile", "F.cross_entropy")}
    if device.type != "cuda":
        reasons["liger"] = "Liger-Kernel runs on CUDA only"
    else:
        reasons["liger"] = "" if liger_version() else "liger-kernel is not importable (pip install liger-kernel)"
    for name in FUSED_BACKENDS:
        if name not in backends:
            reasons[name] = f"not in available_backends() {backends}"
        elif name == "triton" and (device.type != "cuda" or triton_interpreter()):
            reasons[name] = "Triton runs on CUDA tensors (on a CPU only under TRITON_INTERPRET: not a speed)"
        elif name == "cpu" and device.type != "cpu":
            reasons[name] = "the native cpu backend runs on CPU tensors"
        elif name == "cuda" and device.type != "cuda":
            reasons[name] = "the cuda backend runs on CUDA tensors"
        else:
            reasons[name] = ""
    return reasons


def select(device: torch.device, wanted: Optional[List[str]] = None) -> List[Implementation]:
    """The implementations to run on `device`: those available and on by default, or the `wanted`
    names; lean-eager first and always (the speed-up baseline)."""
    table = {impl.name: impl for impl in (LEAN_EAGER, LEAN_COMPILE, REFERENCE, REFERENCE_COMPILE, TORCH_CE, LIGER)}
    table.update({name: fused_backend(name) for name in FUSED_BACKENDS})
    reasons = available(device)
    names = [
        name
        for name in ALL_NAMES
        if not reasons[name] and (name in wanted if wanted is not None else table[name].by_default)
    ]
    if BASELINE not in names:
        names.insert(0, BASELINE)
    return [table[name] for name in names]
