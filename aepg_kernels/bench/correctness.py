"""The gate before timing: an implementation's loss and gradient must match the float64
reference (the package's eager composite, ``policy_loss(backend="eager")``, on the same inputs
in float64), or it gets no number (a wrong-but-fast kernel must not look good).

The check runs on the case's own shape when it has at most GATE_MAX_ELEMENTS logits, else on its
first rows (same C, same dtype, same mode): the kernels choose their algorithm by C, and the eager
reference of a full LLM shape would not fit in memory. The same shape when it is small also spares
torch.compile a second compilation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .implementations import LossFn, policy_loss_fn
from .inputs import CaseInputs
from .sweeps import MODES, Case

GATE_MAX_ELEMENTS = 1 << 24
GATE_REFERENCE = 'policy_loss(backend="eager") on the gate inputs upcast to float64 (float64_reference)'


def gate_rows(n: int, c: int) -> int:
    """Rows of the gate's inputs: all of them up to GATE_MAX_ELEMENTS logits, else as many as fit."""
    return min(n, max(1, GATE_MAX_ELEMENTS // c))


# Error = max |x - ref| / max |ref| over the loss (or per-row losses) and over the gradient, ref
# the float64 reference. fp32: every implementation computes in fp32 and differs from it by fp32
# rounding and summation order: ~1e-6, far under 1e-4 (the lean composite too on these inputs;
# where it is less accurate, it fails the gate: reported, not timed, not an exit failure).
# bf16/fp16: results are rounded once to 8 (bf16) or 11 (fp16) significant bits, a relative step
# of 2^-8 = 3.9e-3 at most; F.cross_entropy also rounds log-probabilities to the input dtype
# before exponentiating, a few steps more: 2e-2. A missing term or a wrong scale (e.g. the
# entropy term with beta = 0.1, a factor 2) errs by 1e-1 or more.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


@dataclass
class CheckResult:
    passed: bool
    loss_error: float
    grad_error: Optional[float]  # None in forward-only mode
    tolerance: float
    message: str = ""


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| in fp64; NaN/inf where ref is finite counts as infinite error."""
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape:
        return float("inf")
    diff = torch.where(x.isnan() & ref.isnan(), 0.0, (x - ref).abs()).nan_to_num(nan=float("inf"))
    largest_diff = diff.max().item() if diff.numel() else 0.0
    scale = ref.abs().nan_to_num(nan=0.0, posinf=0.0).max().item() if ref.numel() else 0.0
    return largest_diff / max(scale, 1e-30)


def loss_and_grad(
    fn: LossFn, inputs: CaseInputs, backward: bool, in_place: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    logits = inputs.logits[0]
    logits = logits.clone() if in_place else logits
    if not backward:
        with torch.no_grad():
            return fn(logits, inputs.target[0]), None
    logits = logits.detach().requires_grad_()
    loss = fn(logits, inputs.target[0])
    (grad,) = torch.autograd.grad(loss, logits, inputs.upstream)
    return loss.detach(), grad


def float64_reference(case: Case, inputs: CaseInputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(loss, gradient or None) of the package's eager composite, ``policy_loss(backend="eager")``
    with the case's loss and reduction, on the gate inputs upcast to float64 (the upstream gradient
    too): what every implementation is checked against."""
    backward = MODES[case.mode].backward
    upstream = None if inputs.upstream is None else inputs.upstream.double()
    wide = CaseInputs([inputs.logits[0].double()], [inputs.target[0]], upstream)
    return loss_and_grad(policy_loss_fn(case, "eager"), wide, backward, in_place=False)


def check(
    fn: LossFn,
    reference: Tuple[torch.Tensor, Optional[torch.Tensor]],
    inputs: CaseInputs,
    dtype: str,
    backward: bool,
    in_place: bool = False,
) -> CheckResult:
    """Compare `fn` on the gate inputs with `reference` (loss, grad) on the same inputs (in float64:
    `float64_reference`)."""
    tolerance = TOLERANCE[dtype]
    try:
        loss, grad = loss_and_grad(fn, inputs, backward, in_place)
    except Exception as error:  # noqa: BLE001  (a crash is a failed check, reported as such)
        return CheckResult(False, float("inf"), None, tolerance, f"{type(error).__name__}: {error}")
    loss_error = relative_error(loss, reference[0])
    grad_error = relative_error(grad, reference[1]) if backward else None
    passed = loss_error <= tolerance and (grad_error is None or grad_error <= tolerance)
    message = (
        ""
        if passed
        else (
            f"differs from the reference: loss error {loss_error:.2e}, gradient error "
            f"{grad_error if grad_error is None else f'{grad_error:.2e}'} > {tolerance:g}"
        )
    )
    return CheckResult(passed, loss_error, grad_error, tolerance, message)
