"""The gate before timing: a wrong implementation gets no number."""

import pytest
import torch

import aepg_kernels as ak
from aepg_kernels.bench import measure
from aepg_kernels.bench.correctness import TOLERANCE, check, gate_rows, loss_and_grad, relative_error
from aepg_kernels.bench.implementations import LEAN_EAGER, REFERENCE, Implementation, policy_loss_fn
from aepg_kernels.bench.inputs import make_inputs
from aepg_kernels.bench.sweeps import MODES, Case

CPU = torch.device("cpu")


def gate(case, fn):
    inputs = make_inputs(case, CPU, rows=gate_rows(case.n, case.c))
    backward = MODES[case.mode].backward
    reference = loss_and_grad(policy_loss_fn(case, "eager"), inputs, backward, in_place=False)
    return check(fn, reference, inputs, case.dtype, backward)


def doubled_loss(case):
    eager = policy_loss_fn(case, "eager")
    return lambda x, y: 2 * eager(x, y)


def wrong_gradient_only(case):
    """The right loss value, a gradient shifted by a constant (x - x.detach() is 0 in value)."""
    eager = policy_loss_fn(case, "eager")
    return lambda x, y: eager(x, y) + 0.05 * (x - x.detach()).sum()


def missing_entropy_term(case):
    return lambda x, y: ak.policy_loss(
        x, y, ce_weight=0.5, epg_weight=0.5, reduction=MODES[case.mode].reduction, backend="eager"
    )


def test_gate_rejects_wrong_loss_wrong_gradient_and_missing_term():
    for mode in ("fwd", "fwd+bwd", "fwd+bwd/rows"):
        case = Case("aepg", mode, "fp32", 64, 37)
        assert gate(case, policy_loss_fn(case, "eager")).passed
        assert not gate(case, doubled_loss(case)).passed
        assert not gate(case, missing_entropy_term(case)).passed
    result = gate(Case("aepg", "fwd+bwd", "fp32", 64, 37), wrong_gradient_only(Case("aepg", "fwd+bwd", "fp32", 64, 37)))
    assert not result.passed and result.loss_error < 1e-6 and result.grad_error > TOLERANCE["fp32"]


def test_gate_reports_a_crash_as_a_failed_check():
    def broken(x, y):
        raise RuntimeError("kernel exploded")

    result = gate(Case("ce", "fwd+bwd", "fp32", 8, 5), broken)
    assert not result.passed and "kernel exploded" in result.message


def test_fused_cpu_backend_and_torch_cross_entropy_pass_the_gate():
    for dtype in ("fp32", "bf16"):
        case = Case("ce", "fwd+bwd/rows", dtype, 128, 1001)
        assert gate(case, lambda x, y: torch.nn.functional.cross_entropy(x, y, reduction="none")).passed
        if "cpu" in ak.available_backends():
            assert gate(case, policy_loss_fn(case, "cpu")).passed


def test_relative_error_counts_nan_as_infinite():
    ref = torch.tensor([1.0, -2.0])
    assert relative_error(torch.tensor([1.0, -2.1]), ref) == pytest.approx(0.05, rel=1e-5)
    assert relative_error(torch.tensor([float("nan"), -2.0]), ref) == float("inf")
    assert relative_error(torch.tensor([1.0]), ref) == float("inf")  # wrong shape


def test_gate_rows_limit_large_shapes():
    assert gate_rows(4096, 1000) == 4096
    assert gate_rows(16384, 262144) == (1 << 24) // 262144


def test_runner_gives_no_time_to_an_implementation_that_fails_the_gate():
    case = Case("aepg", "fwd+bwd", "fp32", 32, 10)
    wrong = Implementation("wrong", doubled_loss)
    settings = measure.RunSettings(CPU, memory_bytes=None)
    impls = [LEAN_EAGER, REFERENCE, wrong]
    records = {r["implementation"]: r for r in measure.run_case(case, impls, settings, copy_gbps=10.0)}
    assert records["wrong"]["status"] == "failed check" and "seconds" not in records["wrong"]
    assert "differs from the reference" in records["wrong"]["reason"]
    for name in ("lean-eager", "reference"):
        assert records[name]["status"] == "ok" and records[name]["seconds"] > 0
        assert records[name]["check"]["loss_error"] < 1e-6  # against the float64 reference
    assert records["lean-eager"]["speedup_vs_lean_eager"] == 1.0
    assert records["reference"]["speedup_vs_lean_eager"] == pytest.approx(
        records["lean-eager"]["seconds"] / records["reference"]["seconds"]
    )
    assert records["reference"]["label"] == "reference (package eager)" and "label" not in records["lean-eager"]
    assert records["wrong"]["speedup_vs_lean_eager"] is None and records["reference"]["speedup_vs_torch_ce"] is None
