"""Compile every Triton kernel variant for a Hopper GPU (sm_90) ahead of time, on any machine.

The interpreter runs kernels as Python, so it accepts code the Triton compiler rejects (return
types that differ between branches, loop-carried values that change type, ...). Compiling to a
cubin catches that without a GPU; launching is left to the GPU tests.

Under TRITON_INTERPRET=1 (how the rest of the suite runs here) @triton.jit makes interpreted
functions, which cannot be compiled: then each test re-runs itself in a child Python without it.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")
COMPILING = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
from aepg_kernels.bench.resources import BWD_FLAGS, FWD_FLAGS, compile_triton  # noqa: E402

if COMPILING:
    from aepg_kernels.backends.triton.backward import policy_loss_bwd_kernel
    from aepg_kernels.backends.triton.forward import policy_loss_fwd_kernel
    from aepg_kernels.backends.triton.reduce import denominator_kernel, reduce_rows_kernel
    from aepg_kernels.backends.triton.scale import scale_grad_kernel


def _in_compiler(request) -> bool:
    """True when this process can compile; otherwise runs the test in a child that can."""
    if COMPILING:
        return True
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        env=dict(os.environ, TRITON_INTERPRET="0"),
        cwd=request.config.rootpath,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    return False


_compile = compile_triton  # the signature and sm_90 target of aepg_kernels/bench/resources.py


def flag_sets(names):
    """Every flag on and off at least once, all on, all off (not the whole product)."""
    yield dict.fromkeys(names, False)
    yield dict.fromkeys(names, True)
    for name in names:
        yield {n: n == name for n in names}
        yield {n: n != name for n in names}


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
@pytest.mark.parametrize("one_tile,write_grad", [(True, True), (True, False), (False, False)])
def test_forward_compiles(request, dtype, one_tile, write_grad):
    if not _in_compiler(request):
        return
    for flags in flag_sets(FWD_FLAGS):
        if flags["PROB_TARGET"] and flags["FOCAL"]:
            continue  # rejected by validation
        _compile(
            policy_loss_fwd_kernel,
            dtype,
            dict(
                flags,
                BLOCK_R=4 if one_tile else 1,
                BLOCK_C=256 if one_tile else 1024,
                ONE_TILE=one_tile,
                ENTROPY_TERM=flags["ENTROPY"],
                WRITE_GRAD=write_grad,
            ),
        )


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp64"])
def test_backward_and_scale_compile(request, dtype):
    if not _in_compiler(request):
        return
    for flags in flag_sets(BWD_FLAGS):
        _compile(policy_loss_bwd_kernel, dtype, dict(flags, BLOCK_R=2, BLOCK_C=512))
    _compile(scale_grad_kernel, dtype, dict(BLOCK=4096), num_warps=8)


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
def test_row_reductions_compile(request, dtype):
    if not _in_compiler(request):
        return
    for flags in flag_sets(["PROB_TARGET", "HAS_WEIGHT"]):
        _compile(denominator_kernel, dtype, dict(flags, BLOCK=1024))
    for mean in (False, True):
        _compile(reduce_rows_kernel, dtype, dict(MEAN=mean, BLOCK=1024))


def test_flag_sets_cover_each_flag():
    sets = list(flag_sets(["A", "B"]))
    assert all(any(s[n] is v for s in sets) for n in "AB" for v in (True, False))
