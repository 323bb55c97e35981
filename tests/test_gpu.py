"""GPU-only checks (skipped without CUDA): CUDA-graph capture and replay with a changing alpha,
and rows whose offsets exceed 2^31 elements. Every other test file runs on the GPU as well when
one is present (tests/helpers.py picks the device)."""

import pytest
import torch

import aepg_kernels as ak
from tests.helpers import KERNEL_BACKENDS, reference64

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BACKENDS = [b for b in KERNEL_BACKENDS if b in ("triton", "cuda")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_replay_with_changing_alpha(backend, reduction):
    """Forward and backward captured once; alpha and the inputs change between replays through
    their buffers. No host synchronisation may happen inside (capture would fail)."""
    n, c = 64, 1000
    x = torch.randn(n, c, device="cuda", requires_grad=True)
    y = torch.randint(0, c, (n,), device="cuda")
    alpha = torch.tensor(1.0, device="cuda")
    g = torch.ones(n, device="cuda") if reduction == "none" else torch.ones((), device="cuda")

    def step():
        x.grad = None
        loss = ak.aepg_loss(x, y, alpha, entropy_weight=0.1, reduction=reduction, backend=backend)
        loss.backward(g)
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: compile kernels, allocate
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = ak.aepg_loss(x, y, alpha, entropy_weight=0.1, reduction=reduction, backend=backend)
        loss.backward(g)
    for value in (0.9, 0.5, 0.1):
        alpha.fill_(value)
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_grad = reference64(
            x,
            y,
            ce_weight=value,
            epg_weight=1 - value,
            entropy_weight=0.1,
            reduction=reduction,
            grad_output=g.double().cpu(),
        )
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_offsets_beyond_int32(backend):
    """bf16 8192 x 262144 = 2^31 elements (4.3 GB): the last rows live past 2^31 elements.
    Rows are checked against a float64 reference of the same rows."""
    n, c = 8192, 262144
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * c * 2:
        pytest.skip("needs about 13 GB of GPU memory")
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, c, (n,), device="cuda")
    loss = ak.epg_loss(x, y, reduction="none", backend=backend)
    g = torch.rand(n, device="cuda", dtype=torch.bfloat16)
    loss.backward(g)
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    ref_loss, ref_grad = reference64(
        x[rows], y[rows], ce_weight=0.0, epg_weight=1.0, reduction="none", grad_output=g[rows].double().cpu()
    )
    torch.testing.assert_close(loss[rows].double().cpu(), ref_loss, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(x.grad[rows].double().cpu(), ref_grad, rtol=2e-2, atol=1e-6)
