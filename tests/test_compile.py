"""The custom ops under torch.library's own checks and under torch.compile(fullgraph=True):
no graph break forward or backward, and a tensor alpha that changes without recompiling."""

import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import aepg_kernels as ak
from aepg_kernels._contract import Flag, LossSpec, Reduction
from aepg_kernels.backends.triton import op as triton_op
from tests.helpers import (
    ALL_BACKENDS,
    DEVICE,
    KERNEL_BACKENDS,
    class_weights,
    index_targets,
    logits,
    loss_and_grad,
    prob_targets,
)

# The registered forward and backward operators of each kernel backend.
OPS = {
    "cpu": (torch.ops.aepg.native_forward.default, torch.ops.aepg.native_backward.default),
    "cuda": (torch.ops.aepg.native_forward.default, torch.ops.aepg.native_backward.default),
    "triton": (triton_op.triton_forward, triton_op.triton_backward),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", list(Reduction))
@pytest.mark.parametrize("prob", [False, True])
def test_opcheck(backend, reduction, prob):
    """Schema, fake (meta) implementation, autograd registration, as torch.library.opcheck sees them."""
    forward, backward = OPS[backend]
    x = logits(5, 7)
    y = prob_targets(5, 7) if prob else index_targets(5, 7, ignore_index=-100)
    spec = LossSpec(
        ce_weight=torch.tensor(0.5, dtype=x.dtype, device=DEVICE),
        epg_weight=0.5,
        entropy_weight=0.25,
        label_smoothing=0.1,
        reduction=reduction,
        prob_target=prob,
    )
    call = spec.pack(need_entropy=True)
    fused = reduction != Reduction.NONE
    write_grad = call[:-1] + (call[-1] | Flag.WRITE_GRAD if fused else call[-1],)
    # The native forward is not differentiable by itself (aepg::policy_loss is, checked below).
    torch.library.opcheck(forward, (x if backend == "triton" else x.detach(), y, class_weights(7), *write_grad))
    if backend != "triton":
        torch.library.opcheck(torch.ops.aepg.policy_loss.default, (x, y, class_weights(7), *call))
    _, stats, _, denom = forward(x.detach(), y, class_weights(7), *call)
    grad_loss = (
        torch.rand(5, dtype=x.dtype, device=DEVICE) if not fused else torch.rand((), dtype=x.dtype, device=DEVICE)
    )
    torch.library.opcheck(backward, (grad_loss, x.detach(), y, class_weights(7), *call, stats, denom))


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
        expected, expected_grad = loss_and_grad(
            x, y, grad_output=torch.ones_like(loss), backend="eager", ce_weight=alpha, epg_weight=1 - alpha, **options
        )
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
        expected, expected_grad = loss_and_grad(
            x, y, backend="eager", ce_weight=alpha, epg_weight=1 - alpha, entropy_weight=0.1
        )
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-6)
        schedule.step()
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eager_calls_skip_the_dispatcher_and_traced_calls_do_not(backend):
    """Eager: the native backends' autograd node is C++ (aepg::policy_loss's Autograd kernel),
    Triton's an autograd.Function that runs the kernels directly (no custom-op dispatch cost);
    under a trace (make_fx here) the graph holds the registered forward op. Same loss and gradient."""
    x, y = logits(4, 6, dtype=torch.float32), index_targets(4, 6)

    def loss_and_grad_fn(x):
        x = x.detach().requires_grad_()
        loss = ak.aepg_loss(x, y, 0.3, entropy_weight=0.1, backend=backend)
        return loss, torch.autograd.grad(loss, x)[0]

    eager_loss = ak.aepg_loss(x.detach().requires_grad_(), y, 0.3, entropy_weight=0.1, backend=backend)
    node = "PolicyLossFunction" if backend in ("cpu", "cuda") else "TritonPolicyLossBackward"
    assert node in eager_loss.grad_fn.name(), eager_loss.grad_fn.name()
    graph = torch.fx.experimental.proxy_tensor.make_fx(loss_and_grad_fn)(x)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    forward = "aepg.native_forward.default" if backend in ("cpu", "cuda") else "aepg.triton_forward.default"
    assert forward in targets, targets  # (traced, the gradient is scaled out of place)
    traced_loss, traced_grad = graph(x)
    loss, grad = loss_and_grad_fn(x)
    torch.testing.assert_close(traced_loss, loss)
    torch.testing.assert_close(traced_grad, grad)


def _python_calls_in_backward(backend, reduction):
    """The Python functions of the package (and of torch.autograd.Function) that run while autograd
    computes the gradient of an eager call."""
    x, y = logits(8, 10, dtype=torch.float32), index_targets(8, 10)
    loss = ak.aepg_loss(
        x, y, torch.tensor(0.3, device=DEVICE), entropy_weight=0.1, reduction=reduction, backend=backend
    )
    loss = loss.sum() if reduction == "none" else loss
    calls = []

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and (
            "aepg_kernels" in name or name.endswith(("autograd/function.py", "_library/autograd.py"))
        ):
            calls.append(f"{name}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        torch.autograd.backward(loss)
    finally:
        sys.setprofile(None)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return calls


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b in ("cpu", "cuda")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_native_backward_never_enters_python(backend, reduction):
    """The native backends' eager backward is C++ end to end (aepg::policy_loss's autograd node);
    the Triton backend's, a Python autograd.Function, is the control that the probe sees Python."""
    assert _python_calls_in_backward(backend, reduction) == []
    if "triton" in KERNEL_BACKENDS:
        assert any("triton" in call for call in _python_calls_in_backward("triton", reduction))
