"""Quick check: every backend available here against the eager reference, values and timings.

    python -m aepg_kernels.quickcheck [--n 4096] [--c 1000] [--repeats 10]

For a few loss configurations it runs `policy_loss` forward + backward on every backend on the
same random logits and targets, and prints the loss, its difference and the gradient's difference
to backend="eager", and the median time per forward + backward call. Exits 1 if a backend
disagrees with eager beyond the tolerance below.

On a CPU the Triton backend runs only under TRITON_INTERPRET=1, a slow interpreter: it is checked
on a small shape, for correctness only; its time is not a speed.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

import aepg_kernels as ak
from aepg_kernels.backends import resolve_backend, triton_interpreter

# Tolerances vs eager, per dtype: (loss_rtol, grad_atol, grad_rtol). The loss may differ by
# loss_rtol relative to eager's; each gradient element by grad_atol + grad_rtol * |eager's|.
# fp32: 1e-4 relative on the loss, 1e-5 absolute on the gradient. bf16: both backends compute
# in fp32 and round the loss and gradient to bf16 once (8 significant bits, a step of at most
# 2^-7 relative), so they may land one rounding step apart: 1e-2 relative.
TOLERANCES = {torch.float32: (1e-4, 1e-5, 0.0), torch.bfloat16: (1e-2, 1e-5, 1e-2)}
INTERPRETER_SHAPE = (64, 100)  # (N, C) for Triton under TRITON_INTERPRET=1
INTERPRETER_REPEATS = 2
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Case:
    """One loss configuration: keyword arguments of `policy_loss`, plus the inputs it needs."""

    name: str
    options: Dict = field(default_factory=dict)
    class_weights: bool = False
    ignored_fraction: float = 0.0


CASES = (
    Case("CE", dict(ce_weight=1.0, epg_weight=0.0)),
    Case("EPG", dict(ce_weight=0.0, epg_weight=1.0)),
    Case("aEPG a=0.5 beta=0.1", dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.1)),
    Case("CE ls=0.1 +w +ignore", dict(label_smoothing=0.1, ignore_index=IGNORE_INDEX),
         class_weights=True, ignored_fraction=0.1),
    Case("aEPG a=0.5 none", dict(ce_weight=0.5, epg_weight=0.5, reduction="none")),  # recompute backward
)


@dataclass
class Inputs:
    logits: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor]
    upstream: Optional[torch.Tensor]  # the gradient fed to a reduction="none" loss


@dataclass
class Result:
    loss: torch.Tensor
    grad: torch.Tensor
    seconds: float


def make_inputs(case: Case, n: int, c: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype)
    target = torch.randint(0, c, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < case.ignored_fraction] = IGNORE_INDEX
    weight = 0.5 + torch.rand(c, generator=gen) if case.class_weights else None
    upstream = torch.rand(n, generator=gen) if case.options.get("reduction") == "none" else None
    return Inputs(logits, target.to(device), *(None if t is None else t.to(device) for t in (weight, upstream)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(case: Case, inputs: Inputs, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = inputs.logits.detach().requires_grad_()
    loss = ak.policy_loss(logits, inputs.target, weight=inputs.weight, backend=backend, **case.options)
    loss.backward(inputs.upstream)
    return loss.detach(), logits.grad


def run(case: Case, inputs: Inputs, backend: str, repeats: int) -> Result:
    """The first call's loss and gradient, and the median time of `repeats` calls after a warm-up."""
    device = inputs.logits.device
    loss, grad = forward_backward(case, inputs, backend)  # also the warm-up (Triton compiles here)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        forward_backward(case, inputs, backend)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Result(loss, grad, statistics.median(times))


def abs_diff(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|x - ref| in fp64: 0 where both are NaN, infinite where only one is."""
    x, ref = x.double(), ref.double()
    return torch.where(x.isnan() & ref.isnan(), 0.0, (x - ref).abs()).nan_to_num(nan=math.inf)


def largest(x: torch.Tensor) -> float:
    return x.max().item() if x.numel() else 0.0


def loss_rel_diff(loss: torch.Tensor, ref: torch.Tensor) -> float:
    """max |loss - ref| relative to max |ref| (a per-row loss for reduction='none')."""
    return largest(abs_diff(loss, ref)) / max(largest(ref.double().abs().nan_to_num()), 1e-30)


def grad_within(grad: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool((abs_diff(grad, ref) <= atol + rtol * ref.double().abs().nan_to_num()).all())


def describe_machine(device: torch.device) -> str:
    triton_version = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton
        triton_version = triton.__version__
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return "\n".join([
        f"aepg_kernels {ak.__version__}  torch {torch.__version__}  triton {triton_version}  "
        f"python {platform.python_version()}",
        f"device: {name}",
        f"TRITON_INTERPRET: {'on' if triton_interpreter() else 'off'}",
        f"available_backends(): {ak.available_backends()}   auto -> {resolve_backend('auto', device)!r}",
    ])


def interpreted(backend: str, device: torch.device) -> bool:
    return backend == "triton" and device.type == "cpu"


HEADER = f"{'case':<22} {'backend':<8} {'N x C':>11} {'loss':>12} {'rel dloss':>10} {'max dgrad':>10} " \
         f"{'ms/call':>9} {'speed-up':>9}  note"


def check_case(case: Case, backends, dtype, device, n, c, repeats) -> Tuple[List[str], bool]:
    """Table rows for one case and whether every backend agreed with eager."""
    loss_rtol, grad_atol, grad_rtol = TOLERANCES[dtype]
    references: Dict[Tuple[int, int], Tuple[Inputs, Result]] = {}

    def reference(shape):  # eager at `shape`; its time matters only at the main shape
        if shape not in references:
            inputs = make_inputs(case, *shape, dtype, device)
            references[shape] = inputs, run(case, inputs, "eager", repeats if shape == (n, c) else 1)
        return references[shape]

    rows, ok = [], True
    for backend in backends:
        slow = interpreted(backend, device)
        shape = (min(n, INTERPRETER_SHAPE[0]), min(c, INTERPRETER_SHAPE[1])) if slow else (n, c)
        inputs, ref = reference(shape)
        try:
            res = ref if backend == "eager" else run(case, inputs, backend,
                                                     INTERPRETER_REPEATS if slow else repeats)
        except Exception as error:  # a backend that crashes is a failure, reported in the table
            rows.append(f"{case.name:<22} {backend:<8} {'':>11} ERROR {type(error).__name__}: {error}")
            ok = False
            continue
        d_loss, d_grad = loss_rel_diff(res.loss, ref.loss), largest(abs_diff(res.grad, ref.grad))
        passed = d_loss <= loss_rtol and grad_within(res.grad, ref.grad, grad_atol, grad_rtol)
        ok &= passed
        ratio = "-" if slow else f"{ref.seconds / res.seconds:.2f}x"  # eager time / this backend's
        note = "interpreter (correctness only, not a speed)" if slow else ""
        note = note if passed else f"FAIL (tolerance {TOLERANCES[dtype]}) {note}"
        rows.append(f"{case.name:<22} {backend:<8} {f'{shape[0]}x{shape[1]}':>11} "
                    f"{res.loss.double().sum().item():>12.6g} {d_loss:>10.2e} {d_grad:>10.2e} "
                    f"{1e3 * res.seconds:>9.3f} {ratio:>9}  {note}")
    return rows, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aepg-quickcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="rows (batch size) of the logits")
    parser.add_argument("--c", type=int, default=1000, help="classes")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per backend (after a warm-up)")
    args = parser.parse_args(argv)
    # The interpreter evaluates padded lanes with numpy; their inf/nan are masked out afterwards.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    if args.n < 1 or args.c < 1 or args.repeats < 1:
        parser.error("--n, --c and --repeats must be >= 1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    backends = ak.available_backends()
    print(describe_machine(device))
    print("loss: the value (summed for reduction='none'); rel dloss, max dgrad: vs backend='eager' "
          "on the same inputs; ms/call: median of forward + backward; speed-up: eager's ms / this backend's")
    all_ok = True
    for dtype in dtypes:
        print(f"\n{str(dtype).replace('torch.', '')}, N={args.n}, C={args.c}, {args.repeats} repeats")
        print(HEADER)
        for case in CASES:
            rows, ok = check_case(case, backends, dtype, device, args.n, args.c, args.repeats)
            print("\n".join(rows), flush=True)
            all_ok &= ok
    print("\nOK: every backend agrees with eager" if all_ok else "\nFAILED: a backend disagrees with eager")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
