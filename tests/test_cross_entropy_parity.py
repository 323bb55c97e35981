"""CE mode (the defaults) is exactly F.cross_entropy / nn.CrossEntropyLoss, on every backend,
for every combination of weight, ignore_index, reduction, label_smoothing and input shape."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import aepg_kernels as ak
from tests.helpers import ALL_BACKENDS, DEVICE, class_weights, loss_and_grad

SHAPES = {  # input shape -> index target shape
    "vector": ((7,), ()),
    "matrix": ((6, 7), (6,)),
    "spatial1": ((3, 7, 4), (3, 4)),
    "spatial2": ((2, 7, 3, 2), (2, 3, 2)),
}


def _targets(target_shape, n_classes, ignore_index, prob):
    if prob:
        return None
    y = torch.randint(0, n_classes, target_shape)
    if ignore_index is not None and y.numel() > 1:
        y.view(-1)[1] = ignore_index
    return y.to(DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "weight", "ignore", "smoothing", "all"])
def test_index_targets_match_torch(backend, shape, reduction, options):
    input_shape, target_shape = SHAPES[shape]
    n_classes = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    kw = dict(reduction=reduction)
    if options in ("weight", "all"):
        kw["weight"] = class_weights(n_classes)
    if options in ("smoothing", "all"):
        kw["label_smoothing"] = 0.2
    ignore = {"ignore": 3, "all": -7}.get(options)
    if ignore is not None:
        kw["ignore_index"] = ignore
    x = torch.randn(input_shape, dtype=torch.float64, device=DEVICE) * 3
    y = _targets(target_shape, n_classes, ignore, prob=False)
    if ignore == 3 and y.numel() > 1:
        y.view(-1)[0] = 3  # a class index equal to ignore_index is ignored, not used

    xr = x.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(xr, y, **kw)
    (expected_grad,) = torch.autograd.grad(expected.sum(), xr)
    loss, grad = loss_and_grad(x, y, grad_output=torch.ones_like(expected), backend=backend, **kw)
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight,smoothing", list(itertools.product([False, True], [0.0, 0.3])))
@pytest.mark.parametrize("shape", ["matrix", "spatial1"])
def test_probability_targets_match_torch(backend, reduction, weight, smoothing, shape):
    input_shape, _ = SHAPES[shape]
    n_classes = input_shape[1]
    x = torch.randn(input_shape, dtype=torch.float64, device=DEVICE) * 3
    q = torch.softmax(torch.randn(input_shape, dtype=torch.float64, device=DEVICE), 1)
    kw = dict(reduction=reduction, label_smoothing=smoothing, weight=class_weights(n_classes) if weight else None)
    xr = x.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(xr, q, **kw)
    (expected_grad,) = torch.autograd.grad(expected.sum(), xr)
    loss, grad = loss_and_grad(x, q, grad_output=torch.ones_like(expected), backend=backend, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_is_a_drop_in(backend, dtype):
    weight = class_weights(9, dtype=dtype)
    ours = ak.PolicyLoss(weight, None, 2, None, "sum", 0.1, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(weight, None, 2, None, "sum", 0.1)
    x = torch.randn(16, 9, dtype=dtype, device=DEVICE)
    y = torch.randint(0, 9, (16,), device=DEVICE)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(x, y), theirs(x, y), **tol)
    assert ak.PolicyLoss(reduce=False).reduction == torch.nn.CrossEntropyLoss(reduce=False).reduction == "none"
    assert "weight" in dict(ours.named_buffers())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_ignored_gives_nan_loss_and_zero_gradient(backend):
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    y = torch.full((4,), -100, device=DEVICE)
    for kw in (dict(), dict(label_smoothing=0.1), dict(weight=class_weights(5))):
        loss, grad = loss_and_grad(x, y, backend=backend, **kw)
        assert torch.isnan(loss)
        assert torch.equal(grad, torch.zeros_like(grad))
        assert torch.isnan(F.cross_entropy(x, y, **kw))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_empty_batch_matches_torch(backend, reduction, prob):
    x = torch.randn(0, 5, dtype=torch.float64, device=DEVICE)
    y = (
        torch.zeros(0, 5, dtype=torch.float64, device=DEVICE)
        if prob
        else torch.zeros(0, dtype=torch.long, device=DEVICE)
    )
    expected = F.cross_entropy(x, y, reduction=reduction)
    loss, grad = loss_and_grad(x, y, grad_output=torch.ones_like(expected), backend=backend, reduction=reduction)
    assert loss.shape == expected.shape and grad.shape == x.shape
    torch.testing.assert_close(loss, expected, equal_nan=True)
