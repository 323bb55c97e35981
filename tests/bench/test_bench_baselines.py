"""The baselines a user would pick: the lean composite (and which implementations run by default)."""

import pytest
import torch
import torch.nn.functional as F

import aepg_kernels as ak
from aepg_kernels.bench import implementations
from aepg_kernels.bench.correctness import float64_reference, gate_rows
from aepg_kernels.bench.implementations import lean_composite, lean_fn
from aepg_kernels.bench.inputs import make_inputs
from aepg_kernels.bench.sweeps import LOSSES, MODES, Case

CPU = torch.device("cpu")


def lean_loss_and_grad(case, inputs):
    x = inputs.logits[0].detach().requires_grad_()
    loss = lean_fn(case)(x, inputs.target[0])
    if not MODES[case.mode].backward:
        return loss.detach(), None
    (grad,) = torch.autograd.grad(loss, x, inputs.upstream)
    return loss.detach(), grad


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_lean_composite_equals_the_float64_reference(loss, mode):
    case = Case(loss, mode, "fp32", 64, 37)
    inputs = make_inputs(case, CPU, rows=gate_rows(case.n, case.c), seed=3)
    ref_loss, ref_grad = float64_reference(case, inputs)
    assert ref_loss.dtype == torch.float64
    lean, grad = lean_loss_and_grad(case, inputs)
    assert lean.shape == ref_loss.shape and lean.dtype == torch.float32
    torch.testing.assert_close(lean.double(), ref_loss, rtol=1e-5, atol=1e-6)
    if MODES[case.mode].backward:
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(focal_gamma=2.0),
        dict(label_smoothing=0.2, focal_gamma=1.5, ce_weight=0.7, epg_weight=0.3, entropy_weight=-0.05),
    ],
)
def test_lean_label_smoothing_and_focal_match_the_package(options):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(50, 23, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 23, (50,), generator=gen)
    ref = ak.policy_loss(x, y, backend="eager", reduction="sum", **options)
    (ref_grad,) = torch.autograd.grad(ref, x)
    lean = lean_composite(x, y, reduction="sum", **options)
    (grad,) = torch.autograd.grad(lean, x)
    torch.testing.assert_close(lean.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_lean_ce_is_f_cross_entropy_and_bad_options_are_typed_errors():
    x, y = torch.randn(16, 9), torch.randint(0, 9, (16,))
    torch.testing.assert_close(lean_composite(x, y, reduction="none"), F.cross_entropy(x, y, reduction="none"))
    with pytest.raises(ValueError, match="reduction"):
        lean_composite(x, y, reduction="avg")
    with pytest.raises(ValueError, match="every weight is 0"):
        lean_composite(x, y, ce_weight=0.0)
    with pytest.raises(TypeError):
        lean_composite(x, y, weight=torch.ones(9))  # class weights: not in the lean form


def test_lean_eager_is_the_default_baseline_and_reference_an_extra_row():
    names = [impl.name for impl in implementations.select(CPU)]
    assert names[0] == implementations.BASELINE == "lean-eager"
    assert {"lean-compile", "reference", "F.cross_entropy"} <= set(names)
    assert "reference-compile" not in names  # only when named: each case compiles
    assert [impl.name for impl in implementations.select(CPU, ["reference-compile"])] == [
        "lean-eager",
        "reference-compile",
    ]
    assert implementations.REFERENCE.label == "reference (package eager)"
    assert implementations.LEAN_COMPILE.compiled and implementations.REFERENCE_COMPILE.compiled
    assert set(implementations.SPEEDUP_BASELINES.values()) <= set(implementations.ALL_NAMES)
