"""The kernel backends against the eager reference: every C regime (several rows per program,
one row on chip, rows streamed in chunks), fused and recomputed gradients, per-row statistics,
and low-precision inputs judged against PyTorch's own low-precision error."""

import pytest
import torch
import torch.nn.functional as F

import aepg_kernels as ak
from tests.helpers import (
    DEVICE,
    FAMILY,
    KERNEL_BACKENDS,
    assert_matches_reference,
    class_weights,
    index_targets,
    logits,
    loss_and_grad,
    prob_targets,
    reference64,
    tile_config,
)

pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend on this machine")

# C across the regimes: tiny, several rows per program, not a multiple of 16, one long row,
# and beyond the on-chip limit (streamed in chunks).
REGIMES = [(5, 1), (9, 7), (6, 100), (3, 1001), (2, 4096), (2, 40000)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n,c", REGIMES)
@pytest.mark.parametrize("member", ["ce", "aepg_0.25", "ep", "combo"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_regimes_fp32(backend, n, c, member, reduction):
    x = logits(n, c, dtype=torch.float32)
    y = index_targets(n, c, ignore_index=-100)
    g = torch.rand(n, device=DEVICE) if reduction == "none" else None
    assert_matches_reference(x, y, backend, g, reduction=reduction, **FAMILY[member])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n,c", [(9, 7), (3, 1001), (2, 40000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_regimes_probability_targets_with_weights(backend, n, c, smoothing):
    x = logits(n, c, dtype=torch.float32)
    q = prob_targets(n, c, dtype=torch.float32)
    assert_matches_reference(
        x,
        q,
        backend,
        weight=class_weights(c, dtype=torch.float32),
        label_smoothing=smoothing,
        ce_weight=0.5,
        epg_weight=0.5,
        entropy_weight=0.25,
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("member", list(FAMILY))
def test_fused_and_recomputed_gradients_agree(backend, member):
    """The same loss through the gradient-in-forward path and through the recompute path."""
    x = logits(6, 37, dtype=torch.float64)
    y = index_targets(6, 37, ignore_index=-100)
    kw = dict(FAMILY[member], weight=class_weights(37), backend=backend)
    _, fused = loss_and_grad(x, y, reduction="sum", **kw)
    _, recomputed = loss_and_grad(
        x, y, grad_output=torch.ones(6, dtype=torch.float64, device=DEVICE), reduction="none", **kw
    )
    torch.testing.assert_close(fused, recomputed, rtol=1e-13, atol=1e-14)
    with tile_config(max_one_tile_cols=16, chunk_cols=8):
        _, chunked = loss_and_grad(x, y, reduction="sum", **kw)
    torch.testing.assert_close(chunked, fused, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("retain", [False, True])
def test_upstream_scale_and_retain_graph(backend, retain):
    """(3 * loss).backward() scales the fused gradient (in place, or out of place when the graph
    is retained); a second backward through a retained graph gives the same gradient again."""
    x = logits(8, 30, dtype=torch.float64)
    y = index_targets(8, 30)
    ref = reference64(x, y, entropy_weight=0.5)[1]
    leaf = x.detach().clone().requires_grad_(True)
    loss = 3 * ak.policy_loss(leaf, y, entropy_weight=0.5, backend=backend)
    loss.backward(retain_graph=retain)
    torch.testing.assert_close(leaf.grad.cpu(), 3 * ref, rtol=1e-12, atol=1e-13)
    if retain:
        loss.backward()
        torch.testing.assert_close(leaf.grad.cpu(), 6 * ref, rtol=1e-12, atol=1e-13)


def test_sample_weight_is_the_gradient_factor():
    """sample_weight is the per-row factor w with dL/dz = w (p - e_y): checked against autograd of
    the eager composite for aEPG and for focal (whose factor is derived in docs/math.md section 1)."""
    x = logits(16, 10)
    y = index_targets(16, 10)
    for kw in (
        dict(ce_weight=0.3, epg_weight=0.7),
        dict(focal_gamma=2.0),
        dict(focal_gamma=0.5),
        dict(ce_weight=0.5, epg_weight=0.5, focal_gamma=1.5),
    ):
        (_, stats), grad = loss_and_grad(x, y, backend="eager", reduction="sum", return_stats=True, **kw)
        p = torch.softmax(x.detach(), -1)
        expected = stats.sample_weight[:, None] * (p - F.one_hot(y, 10))
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    (_, stats), _ = loss_and_grad(x, y, backend="eager", ce_weight=0.3, epg_weight=0.7, return_stats=True)
    torch.testing.assert_close(stats.sample_weight, 0.3 + 0.7 * stats.p_target)


def _lowp_composite(x, y, a, b, beta):
    """The loss family written directly in PyTorch ops in the input's (low) precision."""
    logp = F.log_softmax(x, -1)
    p = logp.exp()
    logp_y = logp.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(p * logp).sum(-1)
    return (a * -logp_y + b * (1 - logp_y.exp()) + beta * entropy).mean()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c", [(32, 100), (4, 1001), (2, 40000)])
@pytest.mark.parametrize("coefficients", [(1.0, 0.0, 0.0), (0.5, 0.5, 0.25)])
def test_low_precision_no_worse_than_torch(backend, dtype, n, c, coefficients):
    """Error against float64 at most PyTorch's own low-precision error plus half an ulp of the
    output format (our result is rounded to it once; PyTorch's rounds many times)."""
    a, b, beta = coefficients
    x = logits(n, c, dtype=dtype, requires_grad=False)
    y = index_targets(n, c)
    loss, grad = loss_and_grad(x, y, ce_weight=a, epg_weight=b, entropy_weight=beta, backend=backend)
    ref_loss, ref_grad = reference64(x, y, ce_weight=a, epg_weight=b, entropy_weight=beta)
    torch_loss, torch_grad = None, None
    xt = x.detach().clone().requires_grad_(True)
    torch_loss = _lowp_composite(xt, y, a, b, beta)
    (torch_grad,) = torch.autograd.grad(torch_loss, xt)
    ulp = torch.finfo(dtype).eps
    err = lambda v, r: (v.double().cpu() - r).abs().max().item()
    assert loss.dtype == dtype and grad.dtype == dtype
    assert err(loss, ref_loss) <= err(torch_loss, ref_loss) + ulp * ref_loss.abs().item()
    assert err(grad, ref_grad) <= err(torch_grad, ref_grad) + ulp * ref_grad.abs().max().item()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_true_class_gradient_exact_for_confident_rows(backend, dtype):
    """z_y = max + 10: 1 - p_y ~ 1e-4 * C. The true-class gradient -(1 - p_y) must keep its
    relative accuracy (it is computed once per row in fp32, never as p_y - 1 after rounding)."""
    n, c = 8, 50
    x = torch.randn(n, c, device=DEVICE)
    y = index_targets(n, c)
    x[torch.arange(n), y] = x.max(-1).values + 10
    x = x.to(dtype)
    _, grad = loss_and_grad(x, y, backend=backend, reduction="sum")
    _, ref = reference64(x, y, reduction="sum")
    rows = torch.arange(n)
    got, want = grad[rows, y].double().cpu(), ref[rows, y.cpu()]
    assert torch.all(want < 0)
    # low precision: one rounding of the output; fp32: a few ulp from the sum of C exponentials
    torch.testing.assert_close(got, want, rtol=max(2 * torch.finfo(dtype).eps, 16 * 2.0**-23), atol=0)
