"""The native extension aepg_kernels._C: module and operator registration, the CPU kernels against
the float64 eager reference and the Triton kernels (interpreter), in every dtype and feature
combination, both CPU instruction sets. The whole suite runs the "cpu" backend too (helpers.py)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aepg_kernels as ak
from aepg_kernels._contract import Flag, LossSpec, Reduction
from aepg_kernels.backends import native as _native
from tests.helpers import (
    FAMILY,
    STATS,
    assert_matches_reference,
    class_weights,
    index_targets,
    loss_and_grad,
    prob_targets,
    reference64,
)

HAS_CPU = _native.has_cpu_kernels()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=_native.native_error())
OPS = ("native_forward", "native_backward", "native_scale_")
MEAN_WITH_GRAD = int(Reduction.MEAN | Flag.WRITE_GRAD)


def test_package_imports_and_reports_the_native_backends():
    backends = ak.available_backends()
    assert ("cpu" in backends) == HAS_CPU
    if not HAS_CPU:
        assert "unavailable" in _native.native_error() or "without" in _native.native_error()


@needs_cpu
def test_module_and_operators_are_registered():
    assert _native._C.HAS_CPU is True
    assert isinstance(_native._C.HAS_CUDA, bool)
    assert _native._C.cpu_capability() in ("AVX512", "AVX2", "DEFAULT")
    for name in OPS:
        assert hasattr(torch.ops.aepg, name)
        for key in ("CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aepg::{name}", key), (name, key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aepg::{name}", "CUDA") == _native._C.HAS_CUDA


@needs_cpu
@pytest.mark.parametrize("prob", [False, True])
def test_operator_schema_and_meta(prob):
    """The registered schemas and Meta kernels, as torch.library.opcheck sees them."""
    n, c = 5, 7
    x = torch.randn(n, c, dtype=torch.float64)
    y = prob_targets(n, c, device="cpu") if prob else index_targets(n, c, ignore_index=-100, device="cpu")
    w = class_weights(c, device="cpu")
    spec = LossSpec(
        ce_weight=torch.tensor(0.25, dtype=torch.float64),
        epg_weight=0.75,
        entropy_weight=0.25,
        label_smoothing=0.1,
        prob_target=prob,
    )
    a_t, b_t, scalars, ignore_index, flags = spec.pack(need_entropy=True)
    fwd = (x, y, w, a_t, b_t, scalars, ignore_index, flags | Flag.WRITE_GRAD)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.aepg.native_forward.default, fwd, test_utils=tests)
    loss, stats, grad, denom = torch.ops.aepg.native_forward(*fwd)
    assert loss.shape == () and stats.shape == (8, n) and grad.shape == (n, c) and denom.shape == ()
    none = LossSpec(
        ce_weight=0.5,
        epg_weight=0.5,
        entropy_weight=0.25,
        label_smoothing=0.1,
        reduction=Reduction.NONE,
        prob_target=prob,
    ).pack()
    bwd = (torch.rand(n, dtype=torch.float64), x, y, w, *none, stats, denom)
    torch.library.opcheck(torch.ops.aepg.native_backward.default, bwd, test_utils=tests)
    meta = torch.ops.aepg.native_forward(x.to("meta"), y.to("meta"), w.to("meta"), *none)
    assert [t.shape for t in meta] == [(n,), (8, n), (0,), ()]
    call = (x.clone().requires_grad_(), y, w, *spec.pack(need_entropy=True))
    torch.library.opcheck(
        torch.ops.aepg.policy_loss.default,
        call,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def _assert_matches_eager(x, y, grad_output=None, **kw):
    loss, _, grad = assert_matches_reference(x, y, "cpu", grad_output, **kw)
    assert loss.dtype == x.dtype and grad.dtype == x.dtype


TOLERANCES = {
    torch.float64: (1e-12, 1e-13),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}


@needs_cpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("n,c", [(7, 1), (9, 7), (5, 8), (6, 100), (3, 1001), (2, 40000)])
@pytest.mark.parametrize("member", ["ce", "aepg_0.25", "ep", "label_smoothing", "focal", "combo"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_kernel_matches_eager(dtype, n, c, member, reduction):
    """Fused (reduced loss) and recomputed ("none", random per-row upstream gradient) paths, C
    below, at and beyond the vector width, with ignored rows and class weights."""
    x = (torch.randn(n, c, dtype=torch.float64) * 2).to(dtype)
    y = index_targets(n, c, ignore_index=-100, device="cpu")
    g = torch.rand(n, dtype=torch.float64).to(dtype) if reduction == "none" else None
    rtol, atol = TOLERANCES[dtype]
    kw = dict(FAMILY[member], weight=class_weights(c, device="cpu", dtype=torch.float32), reduction=reduction)
    _assert_matches_eager(x, y, g, rtol=rtol, atol=atol, **kw)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 33])
@pytest.mark.parametrize("c", [10, 100, 600, 9000])
@pytest.mark.parametrize("member", ["ce", "ep", "focal", "combo"])
def test_cpu_kernel_blocks_of_rows(dtype, n, c, member):
    """The forward computes the results of a block of 16 rows together in vector lanes (one row at a
    time with the gradient beyond C = 256: C = 600, 9000): partial and full blocks, ignored rows at
    a block's first and last position, int32 targets, the fast modes (no class weights)."""
    torch.manual_seed(n * 7 + c)
    x = (torch.randn(n, c, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, c, (n,), dtype=torch.int32)
    y[[i for i in (0, 15, 16, n - 1) if i < n and n > 1]] = -100
    rtol, atol = TOLERANCES[dtype]
    for reduction in ("mean", "none"):
        g = torch.rand(n, dtype=torch.float64).to(dtype) if reduction == "none" else None
        _assert_matches_eager(x, y, g, rtol=rtol, atol=atol, reduction=reduction, **FAMILY[member])


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [16, 100, 256, 257])
@pytest.mark.parametrize("member", ["ce", "ep", "combo"])
def test_cpu_short_rows_of_a_block_are_independent(dtype, c, member):
    """Rows up to C = 256 are reduced a block of 16 at a time (the max and the sums of all its rows
    in one shuffle tree; C = 257 goes row by row): each row's loss, statistics and gradient are
    bitwise those of the row alone, with non-finite neighbours (a NaN, -inf entries, a row of
    -inf, a row shifted by 1e4, ignored rows) in the same block and a partial last block."""
    torch.manual_seed(c)
    n = 37
    x = (torch.randn(n, c, dtype=torch.float64) * 3).to(dtype)
    x[2, c // 2] = float("nan")
    x[5, ::3] = float("-inf")
    x[7] = float("-inf")
    x[20] += 1e4
    y = torch.randint(0, c, (n,))
    y[[9, 16, 36]] = -100
    kw = dict(backend="cpu", return_stats=True, **FAMILY[member])
    exact = dict(rtol=0, atol=0, equal_nan=True)
    for reduction in ("none", "sum"):
        leaf = x.clone().requires_grad_(True)
        loss, stats = ak.policy_loss(leaf, y, reduction=reduction, **kw)
        loss.sum().backward()
        for i in range(n):
            row = x[i : i + 1].clone().requires_grad_(True)
            row_loss, row_stats = ak.policy_loss(row, y[i : i + 1], reduction=reduction, **kw)
            row_loss.sum().backward()
            if reduction == "none":
                torch.testing.assert_close(loss[i : i + 1], row_loss, **exact)
            for name in STATS:
                torch.testing.assert_close(
                    getattr(stats, name)[i : i + 1],
                    getattr(row_stats, name),
                    **exact,
                    msg=lambda m, name=name, i=i: f"row {i} {name}: {m}",
                )
            torch.testing.assert_close(leaf.grad[i : i + 1], row.grad, **exact, msg=lambda m, i=i: f"row {i}: {m}")


@needs_cpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("n,c", [(9, 7), (3, 1001)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cpu_kernel_probability_targets(dtype, n, c, smoothing, weighted):
    x = (torch.randn(n, c, dtype=torch.float64) * 2).to(dtype)
    q = prob_targets(n, c, device="cpu", dtype=dtype)
    rtol, atol = TOLERANCES[dtype]
    _assert_matches_eager(
        x,
        q,
        rtol=rtol,
        atol=atol,
        label_smoothing=smoothing,
        ce_weight=0.5,
        epg_weight=0.5,
        entropy_weight=0.25,
        weight=class_weights(c, device="cpu") if weighted else None,
    )


@needs_cpu
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64])
def test_strided_upstream_gradient_and_tensor_coefficients(target_dtype):
    """A per-row upstream gradient with stride 2, alpha as a 0-d tensor, int32 targets."""
    n, c = 10, 33
    x = torch.randn(n, c, dtype=torch.float64)
    y = index_targets(n, c, ignore_index=-100, device="cpu", dtype=target_dtype)
    g = torch.rand(2 * n, dtype=torch.float64)[::2]
    alpha = torch.tensor(0.3, dtype=torch.float64)
    x1 = x.clone().requires_grad_(True)
    loss = ak.aepg_loss(x1, y, alpha, entropy_weight=0.2, reduction="none", backend="cpu")
    loss.backward(g)
    ref, ref_grad = reference64(
        x, y.long(), grad_output=g, ce_weight=0.3, epg_weight=0.7, entropy_weight=0.2, reduction="none"
    )
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x1.grad, ref_grad, rtol=1e-12, atol=1e-13)


@needs_cpu
@pytest.mark.skipif("triton" not in ak.available_backends(), reason="Triton (interpreter) not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("member", ["aepg_0.25", "combo"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cpu_kernel_matches_triton(dtype, member, reduction):
    """The two kernel backends implement the same per-row math (csrc/policy_loss_math.h mirrors
    backends/triton/_row_math.py): equal to rounding, stats included."""
    n, c = 6, 37
    x = (torch.randn(n, c, dtype=torch.float64) * 2).to(dtype)
    y = index_targets(n, c, ignore_index=-100, device="cpu")
    g = torch.rand(n).to(dtype) if reduction == "none" else None
    kw = dict(
        FAMILY[member],
        weight=class_weights(c, device="cpu", dtype=torch.float32),
        reduction=reduction,
        return_stats=True,
    )
    (loss, stats), grad = loss_and_grad(x, y, g, backend="cpu", **kw)
    (t_loss, t_stats), t_grad = loss_and_grad(x, y, g, backend="triton", **kw)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(loss, t_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, t_grad, rtol=rtol, atol=atol)
    for name in STATS:
        torch.testing.assert_close(getattr(stats, name), getattr(t_stats, name), rtol=1e-5, atol=1e-6)


@needs_cpu
def test_scale_skips_one_and_scales_otherwise():
    grad = torch.randn(4, 5)
    expected = grad.clone()
    torch.ops.aepg.native_scale_(grad, torch.tensor(1.0))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    torch.ops.aepg.native_scale_(grad, torch.tensor(-2.5))
    torch.testing.assert_close(grad, -2.5 * expected)


@needs_cpu
def test_fused_gradient_for_every_row_length():
    """fits_on_chip is True for every C on the CPU: the forward writes the gradient (one pass)."""
    assert _native.CPU.fits_on_chip(1 << 20)
    x = torch.randn(2, 70000, requires_grad=True)
    y = torch.tensor([3, 69999])
    call = LossSpec(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.1).pack()
    _, _, grad, _ = torch.ops.aepg.native_forward(x, y, None, *call[:-1], call[-1] | Flag.WRITE_GRAD)
    assert grad.shape == x.shape


ISA_CHECK = textwrap.dedent("""
    import sys, torch, aepg_kernels as ak
    from aepg_kernels.backends import native as _native
    assert _native._C.cpu_capability() == sys.argv[1], _native._C.cpu_capability()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for n, c in ((9, 7), (4, 1001)):
            x = torch.randn(n, c, dtype=torch.float64).to(dtype)
            y = torch.randint(0, c, (n,)); y[1] = -100
            for kw in (dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.1),
                       dict(label_smoothing=0.1, focal_gamma=1.5, weight=torch.rand(c) + 0.5)):
                got = []
                for backend in ("cpu", "eager"):
                    leaf = x.detach().double().clone().requires_grad_(True) if backend == "eager" else \\
                        x.clone().requires_grad_(True)
                    loss = ak.policy_loss(leaf, y, backend=backend, **kw)
                    loss.backward()
                    got.append((loss.double(), leaf.grad.double()))
                tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=1e-2)
                torch.testing.assert_close(got[0][0], got[1][0], **tol)
                torch.testing.assert_close(got[0][1], got[1][1], **tol)
    print("ok")
""")


ISA_ORDER = ["DEFAULT", "AVX2", "AVX512"]


@needs_cpu
@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2"])
def test_kernels_of_every_instruction_set(isa):
    """The portable build (what a machine without AVX2 runs) and the AVX2 build on a machine that
    has more, selected through ATen's own switch ATEN_CPU_CAPABILITY in a fresh process."""
    native_isa = _native._C.cpu_capability()
    if ISA_ORDER.index(native_isa) < ISA_ORDER.index(isa):
        pytest.skip(f"this machine's kernels are {native_isa}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower())
    result = subprocess.run(
        [sys.executable, "-c", ISA_CHECK, isa], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_online_merge_of_the_shared_math(tmp_path):
    """The rescale/merge of csrc/policy_loss_math.h that only the CUDA streamed forward runs,
    checked here on the host against the direct sums (tests/native/merge_check.cpp)."""
    import shutil
    from pathlib import Path

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parent.parent
    binary = tmp_path / "merge_check"
    subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-O1",
            f"-I{root / 'csrc'}",
            str(root / "tests/native/merge_check.cpp"),
            "-o",
            str(binary),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
