"""The custom ops under torch.library's own checks and under torch.compile(fullgraph=True):
no graph break forward or backward, and a tensor alpha that changes without recompiling."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import aepg_kernels as ak
from aepg_kernels import _op

from helpers import ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, class_weights, index_targets, logits, loss_and_grad, \
    prob_targets


def _fwd_args(x, y, weight=None, reduction=1, prob=False, want_grad=True, backend="triton", alpha=None):
    a_t = alpha
    return (x, y, weight, a_t, None, 0.5, 0.5, 0.25, 0.1, 0.0, -100, reduction, prob, True, want_grad, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("prob", [False, True])
def test_opcheck(backend, reduction, prob):
    """Schema, fake (meta) implementation, autograd registration, as torch.library.opcheck sees them."""
    x = logits(5, 7)
    y = prob_targets(5, 7) if prob else index_targets(5, 7, ignore_index=-100)
    args = _fwd_args(x, y, class_weights(7), reduction, prob, backend=backend)
    torch.library.opcheck(_op.policy_loss_fwd, args)
    stats = _op.policy_loss_fwd(*_fwd_args(x.detach(), y, class_weights(7), 0, prob, False, backend))[1]
    bwd = (torch.rand(5, dtype=x.dtype, device=DEVICE), x.detach(), y, class_weights(7), None, None, 0.5, 0.5,
           0.25, 0.1, -100, 0, prob, stats, torch.ones((), dtype=x.dtype, device=DEVICE), backend)
    torch.library.opcheck(_op.policy_loss_bwd, bwd)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_forward_and_backward(backend, reduction):
    """fullgraph=True raises on any graph break; the compiled loss and gradient equal the eager
    ones, and a new alpha value (a 0-d tensor) reuses the compiled graph."""
    weight = class_weights(9, dtype=torch.float32)
    options = dict(entropy_weight=0.1, reduction=reduction, weight=weight)

    def loss_fn(x, y, alpha):
        return ak.aepg_loss(x, y, alpha, backend=backend, **options)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    y = index_targets(6, 9, ignore_index=-100)
    for alpha in (0.9, 0.4, 0.1):
        x = logits(6, 9, dtype=torch.float32)
        loss = compiled(x, y, torch.tensor(alpha, device=DEVICE))
        loss.sum().backward()
        expected, expected_grad = loss_and_grad(x, y, grad_output=torch.ones_like(loss), backend="eager",
                                                ce_weight=alpha, epg_weight=1 - alpha, **options)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, "a new alpha tensor value must not recompile"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compile_inductor_with_schedule_module(backend):
    """The whole path through Inductor: AEPGLoss reading a device-tensor schedule that advances
    between calls, with no recompilation and the schedule's alpha applied at each step."""
    schedule = ak.SigmoidAnneal(4, device=DEVICE)
    criterion = ak.AEPGLoss(schedule, entropy_weight=0.1, backend=backend)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(criterion, fullgraph=True, backend=counter)
    y = index_targets(8, 16)
    for _ in range(3):
        x = logits(8, 16, dtype=torch.float32)
        loss = compiled(x, y)
        loss.backward()
        alpha = float(schedule.alpha)
        expected, expected_grad = loss_and_grad(x, y, backend="eager", ce_weight=alpha, epg_weight=1 - alpha,
                                                entropy_weight=0.1)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-6)
        schedule.step()
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eager_calls_skip_the_dispatcher_and_traced_calls_do_not(backend):
    """Eager: the autograd.Function runs the kernels directly (no custom-op dispatch cost); under a
    trace (make_fx here) the graph holds the registered aepg:: ops. Same loss and gradient."""
    x, y = logits(4, 6, dtype=torch.float32), index_targets(4, 6)

    def loss_and_grad_fn(x):
        x = x.detach().requires_grad_()
        loss = ak.aepg_loss(x, y, 0.3, entropy_weight=0.1, backend=backend)
        return loss, torch.autograd.grad(loss, x)[0]

    eager_loss = ak.aepg_loss(x.detach().requires_grad_(), y, 0.3, entropy_weight=0.1, backend=backend)
    assert type(eager_loss.grad_fn).__name__ == "PolicyLossFunctionBackward"
    graph = torch.fx.experimental.proxy_tensor.make_fx(loss_and_grad_fn)(x)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "aepg.policy_loss_fwd.default" in targets, targets  # (traced, the gradient is scaled out of place)
    traced_loss, traced_grad = graph(x)
    loss, grad = loss_and_grad_fn(x)
    torch.testing.assert_close(traced_loss, loss)
    torch.testing.assert_close(traced_grad, grad)
