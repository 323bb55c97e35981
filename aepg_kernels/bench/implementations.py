"""The implementations a run puts side by side. Each one turns a case into a loss function
`fn(logits, target) -> loss` (reduction as the case's mode says), or says why it cannot run it.

- eager:            the composite reference, ``policy_loss(backend="eager")``
- compile:          ``torch.compile`` of that same composite (fullgraph, static shapes, one per case;
                    on the GPU suite only on the target shapes, see sweeps.target)
- F.cross_entropy:  PyTorch's own cross entropy (CE only)
- liger:            Liger-Kernel's Triton cross entropy (CE only, CUDA, when importable)
- triton/cuda/cpu:  our fused backends, those ``available_backends()`` offers for the device
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
FUSED_BACKENDS = ("cuda", "triton", "cpu")


def policy_loss_fn(case: Case, backend: str) -> LossFn:
    options = LOSSES[case.loss].kwargs
    reduction = MODES[case.mode].reduction

    def loss(logits, target):
        return ak.policy_loss(logits, target, reduction=reduction, backend=backend, **options)
    return loss


def compiled_fn(case: Case) -> LossFn:
    # Dynamo caches compiled code per Python code object, not per closure: every case (a new static
    # shape) would add a recompilation until the recompile limit fails the run. Each case starts
    # from an empty cache instead; no earlier case's compiled code is used again.
    torch._dynamo.reset()
    return torch.compile(policy_loss_fn(case, "eager"), fullgraph=True, dynamic=False)


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
        import liger_kernel.transformers.functional  # noqa: F401
        from importlib.metadata import version
        return version("liger-kernel")
    except Exception:  # noqa: BLE001  (any import failure means: no Liger baseline)
        return None


@dataclass(frozen=True)
class Implementation:
    name: str
    build: Callable[[Case], LossFn]
    ce_only: bool = False
    fused: bool = False        # one of our backends (the speed-ups are reported for these)
    in_place: bool = False     # overwrites its input logits (Liger writes the gradient there)
    # Peak temporaries in fp32 copies of the logits (estimates, for skipping shapes that cannot fit):
    # the eager composite upcasts, shifts, keeps log-probabilities, probabilities, entropy terms
    # and their gradients; Inductor recomputes in backward; the fused kernels need O(N).
    workspace_fp32_copies: float = 0.0

    def unsupported(self, case: Case) -> Optional[str]:
        """Why this implementation does not run `case`, or None."""
        if self.ce_only and case.loss != "ce":
            return "cross entropy only"
        return None


def fused_backend(name: str) -> Implementation:
    """One of our backends (cuda, triton, cpu) through `policy_loss(backend=name)`."""
    return Implementation(name, lambda case: policy_loss_fn(case, name), fused=True)


EAGER = Implementation("eager", lambda case: policy_loss_fn(case, "eager"), workspace_fp32_copies=7)
COMPILE = Implementation("compile", compiled_fn, workspace_fp32_copies=2)
TORCH_CE = Implementation("F.cross_entropy", torch_cross_entropy_fn, ce_only=True, workspace_fp32_copies=3)
LIGER = Implementation("liger", liger_fn, ce_only=True, in_place=True)
ALL_NAMES = ("eager", "compile", "F.cross_entropy", "liger") + FUSED_BACKENDS


def available(device: torch.device) -> Dict[str, str]:
    """name -> why it is left out on `device` ('' when it runs)."""
    backends = ak.available_backends()
    reasons = {"eager": "", "compile": "", "F.cross_entropy": ""}
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
    """The implementations to run on `device` (eager first: it is the correctness reference and the
    speed-up baseline), restricted to `wanted` names when given."""
    table = {impl.name: impl for impl in (EAGER, COMPILE, TORCH_CE, LIGER)}
    table.update({name: fused_backend(name) for name in FUSED_BACKENDS})
    reasons = available(device)
    names = [name for name in ALL_NAMES if not reasons[name] and (wanted is None or name in wanted)]
    if "eager" not in names:
        names.insert(0, "eager")  # always: the reference every other implementation is checked against
    return [table[name] for name in names]
