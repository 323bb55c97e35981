"""torch.autograd.gradcheck in float64 for every member of the loss family, crossed with the
reductions, ignore_index, class weights and probability targets, on every backend (the Triton
kernels under the interpreter without a GPU), on the on-chip and the chunked kernel paths."""

import pytest
import torch

import aepg_kernels as ak
from tests.helpers import (
    ALL_BACKENDS,
    FAMILY,
    KERNEL_BACKENDS,
    class_weights,
    index_targets,
    logits,
    prob_targets,
    tile_config,
)

VARIANTS = ["plain", "ignore", "weight", "prob", "prob_weight"]


def _case(member, variant, n=4, c=5):
    kw = dict(FAMILY[member])
    if variant.startswith("prob"):
        if kw.get("focal_gamma", 0) > 0:
            pytest.skip("focal_gamma is defined for index targets only")
        y = prob_targets(n, c)
    else:
        y = index_targets(n, c, ignore_index=-100 if variant == "ignore" else None)
    if variant.endswith("weight"):
        kw["weight"] = class_weights(c)
    return logits(n, c), y, kw


def _check(x, y, backend, reduction, kw, fast_mode=False):
    def fn(z):
        return ak.policy_loss(z, y, reduction=reduction, backend=backend, **kw)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast_mode)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("member", list(FAMILY))
def test_gradcheck(member, variant, reduction, backend):
    x, y, kw = _case(member, variant)
    _check(x, y, backend, reduction, kw)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("member", ["ce", "aepg_0.25", "ep", "label_smoothing", "combo"])
def test_gradcheck_chunked_path(member, variant, reduction, backend):
    """Rows streamed in chunks of 4 classes (online max/sum/entropy), gradient recomputed.
    fast_mode (random projections of the Jacobian) because the interpreter runs this path slowly;
    test_kernel_parity checks the same path element-wise against the eager reference."""
    x, y, kw = _case(member, variant, n=3, c=13)
    with tile_config(max_one_tile_cols=8, chunk_cols=4):
        _check(x, y, backend, reduction, kw, fast_mode=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_with_tensor_coefficients(backend):
    """ce_weight / epg_weight as 0-d tensors (the annealing schedule's path)."""
    x = logits(4, 6)
    y = index_targets(4, 6)
    alpha = torch.tensor(0.3, dtype=torch.float64, device=x.device)
    assert torch.autograd.gradcheck(lambda z: ak.aepg_loss(z, y, alpha, entropy_weight=0.25, backend=backend), (x,))
