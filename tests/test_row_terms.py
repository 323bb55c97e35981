"""Token weights and DFT's value convention (docs/math.md section 7), at the logits and through the
linear op, on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aepg_kernels as ak
from tests.helpers import ALL_BACKENDS, DEVICE, class_weights, index_targets, logits, prob_targets

REDUCTIONS = ["mean", "sum", "none"]


def _trl_dft(x, y, reduction, weight=None):
    """TRL's dft_loss per token, -exp(logp).detach() * logp, over the counted tokens."""
    logp = torch.log_softmax(x, -1)
    counted = y != -100
    safe = torch.where(counted, y, 0)
    logp_y = logp.gather(1, safe[:, None])[:, 0]
    w_y = torch.ones_like(logp_y) if weight is None else weight[safe]
    rows = -(logp_y.exp().detach() * logp_y) * w_y * counted
    if reduction == "none":
        return rows
    return rows.sum() / (w_y * counted).sum() if reduction == "mean" else rows.sum()


def _value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out, grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weights", [False, True])
def test_dft_value_and_gradient_are_trls(backend, reduction, with_weights):
    x = logits(13, 9, scale=3.0)
    y = index_targets(13, 9, ignore_index=-100)
    weight = class_weights(9) if with_weights else None
    got = _value_and_grad(lambda x: ak.dft_loss(x, y, weight=weight, reduction=reduction, backend=backend), x)
    want = _value_and_grad(lambda x: _trl_dft(x, y, reduction, weight), x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dft_value_of_confident_rows(backend):
    """p_y -> 1: -p_y log p_y ~ 1 - p_y, taken from 1 - p_y, not from a rounded p_y (fp32)."""
    x = torch.zeros(4, 50, device=DEVICE)
    y = torch.arange(4, device=DEVICE)
    x[torch.arange(4), y] = torch.tensor([12.0, 14.0, 16.0, 18.0], device=DEVICE)
    got = ak.dft_loss(x, y, reduction="none", backend=backend)
    want = _trl_dft(x.double(), y, "none").float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dft_is_cross_entropy_with_the_detached_p_y_as_token_weight(backend, reduction):
    x = logits(11, 7)
    y = index_targets(11, 7, ignore_index=-100)
    p_y = torch.softmax(x.detach(), -1).gather(1, torch.where(y >= 0, y, 0)[:, None])[:, 0]
    got = _value_and_grad(lambda x: ak.dft_loss(x, y, reduction=reduction, backend=backend), x)
    want = _value_and_grad(lambda x: ak.cross_entropy(x, y, reduction=reduction, token_weight=p_y, backend=backend), x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("targets", ["index", "prob"])
def test_token_weight_scales_rows_and_keeps_the_denominator(backend, reduction, targets):
    x = logits(12, 6)
    y = index_targets(12, 6, ignore_index=-100) if targets == "index" else prob_targets(12, 6)
    weight = class_weights(6)
    tw = torch.rand(12, dtype=torch.float64, device=DEVICE) * 2
    kwargs = dict(ce_weight=0.25, epg_weight=0.75, entropy_weight=0.5, weight=weight, backend=backend)
    got = _value_and_grad(lambda x: ak.policy_loss(x, y, reduction=reduction, token_weight=tw, **kwargs), x)

    def want_fn(x):
        rows = ak.policy_loss(x, y, reduction="none", **kwargs) * tw
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        denom = 12 if targets == "prob" else weight[torch.where(y >= 0, y, 0)][y >= 0].sum()
        return rows.sum() / denom

    for a, b in zip(got, _value_and_grad(want_fn, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton", "eager"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_op_with_token_weights_and_dft(backend, reduction):
    if backend not in ALL_BACKENDS:
        pytest.skip(f"{backend} is not available here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 8, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(31, 8, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
    y = torch.randint(0, 31, (3, 9), generator=g).to(DEVICE)
    y[1, 2:6] = -100
    tw = torch.rand(3, 9, dtype=torch.float64, generator=g).to(DEVICE)
    for kwargs in (dict(token_weight=tw), dict(loss_value="dft"), dict(token_weight=tw, loss_value="dft")):
        kwargs.update(ce_weight=0.0, epg_weight=1.0, reduction=reduction)
        got = ak.linear_policy_loss(x, w, y, chunk_size=5, backend=backend, **kwargs)
        got_grads = torch.autograd.grad(got.sum(), (x, w))
        flat = {**kwargs, "token_weight": kwargs["token_weight"].flatten()} if "token_weight" in kwargs else kwargs
        want = ak.policy_loss(F.linear(x, w).flatten(0, 1), y.flatten(), backend="eager", **flat)
        want = want.reshape(3, 9) if reduction == "none" else want
        want_grads = torch.autograd.grad(want.sum(), (x, w))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(token_weight=torch.ones(5)), ValueError, "token_weight must have the per-row loss's shape"),
        (dict(token_weight=torch.ones(6, dtype=torch.long)), TypeError, "token_weight must be a floating-point"),
        (dict(token_weight=torch.ones(6, requires_grad=True)), ValueError, "token_weight must not require grad"),
        (dict(loss_value="trl"), ValueError, "loss_value must be one of"),
    ],
)
def test_bad_terms(kwargs, error, pattern):
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    with pytest.raises(error, match=pattern):
        ak.policy_loss(x, y, **kwargs)
    with pytest.raises(error, match=pattern):
        ak.linear_policy_loss(x, torch.randn(5, 4), y, **kwargs)


def test_dft_refuses_probability_targets():
    with pytest.raises(ValueError, match="class-index targets only"):
        ak.dft_loss(torch.randn(3, 4), torch.softmax(torch.randn(3, 4), -1))


def test_modules_take_token_weights_and_the_dft_value():
    x, y = logits(10, 5), index_targets(10, 5, ignore_index=-100)
    tw = torch.rand(10, dtype=torch.float64, device=DEVICE)
    criterion = ak.PolicyLoss(ce_weight=0.0, epg_weight=1.0, loss_value="dft")
    torch.testing.assert_close(criterion(x, y, token_weight=tw), ak.dft_loss(x, y, token_weight=tw))
    torch.testing.assert_close(criterion(x, y), ak.dft_loss(x, y))
    w = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    h = torch.randn(10, 3, dtype=torch.float64, device=DEVICE)
    linear = ak.LinearPolicyLoss(ce_weight=0.0, epg_weight=1.0, loss_value="dft", chunk_size=3)
    torch.testing.assert_close(linear(h, w, y, token_weight=tw), ak.dft_loss(F.linear(h, w), y, token_weight=tw))
    with pytest.raises(ValueError, match="loss_value"):
        ak.PolicyLoss(loss_value="dpo")
