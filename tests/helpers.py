"""Shared test utilities: which kernel backends run here, random cases, the float64 reference."""

from __future__ import annotations

import contextlib
import functools

import torch

import aepg_kernels as ak
from aepg_kernels.backends import triton_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKENDS = [b for b in ak.available_backends() if b in ("triton", "cuda", "cpu")]
if DEVICE == "cpu" and "triton" in ak.available_backends() and not triton_interpreter():
    KERNEL_BACKENDS.remove("triton")
ALL_BACKENDS = ["eager"] + KERNEL_BACKENDS
STATS = ak.LossStats._fields  # entropy, p_target, sample_weight, lse, p_max

# The loss family of docs/math.md section 1, as policy_loss keyword arguments.
FAMILY = {
    "ce": dict(),
    "epg": dict(ce_weight=0.0, epg_weight=1.0),
    "aepg_0.25": dict(ce_weight=0.25, epg_weight=0.75),
    "aepg_0.75": dict(ce_weight=0.75, epg_weight=0.25),
    "cp": dict(entropy_weight=-0.5),
    "ep": dict(entropy_weight=1.0),
    "label_smoothing": dict(label_smoothing=0.125),
    "focal": dict(focal_gamma=2.0),
    "focal_half": dict(focal_gamma=0.5),
    "combo": dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.375, label_smoothing=0.0625, focal_gamma=1.5),
}


def logits(n, c, dtype=torch.float64, scale=2.0, device=DEVICE, requires_grad=True):
    x = (torch.randn(n, c, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def index_targets(n, c, ignore_index=None, device=DEVICE, dtype=torch.int64):
    y = torch.randint(0, c, (n,))
    if ignore_index is not None and n > 1:
        y[1] = ignore_index
    return y.to(device=device, dtype=dtype)


def prob_targets(n, c, device=DEVICE, dtype=torch.float64):
    return torch.softmax(torch.randn(n, c, dtype=torch.float64) * 2, -1).to(device=device, dtype=dtype)


def class_weights(c, device=DEVICE, dtype=torch.float64):
    return (torch.rand(c, dtype=torch.float64) + 0.25).to(device=device, dtype=dtype)


def loss_and_grad(x, y, grad_output=None, **kwargs):
    """Loss and d(loss . grad_output)/dx for a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    out = ak.policy_loss(x, y, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    g = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, x, g)
    return out, grad


def reference64(x, y, weight=None, **kwargs):
    """The eager composite in float64 on the CPU: the ground truth of accuracy tests."""
    w = None if weight is None else weight.detach().double().cpu()
    y = y.cpu().double() if y.is_floating_point() else y.cpu()
    kwargs = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return loss_and_grad(x.detach().double().cpu(), y, weight=w, backend="eager", **kwargs)


def assert_matches_reference(x, y, backend, grad_output=None, rtol=1e-5, atol=1e-6, equal_nan=False, **kwargs):
    """Loss, gradient and every per-row statistic through `backend` equal the float64 eager
    reference; returns (loss, stats, grad)."""
    (loss, stats), grad = loss_and_grad(x, y, grad_output, backend=backend, return_stats=True, **kwargs)
    (ref_loss, ref_stats), ref_grad = reference64(x, y, grad_output=grad_output, return_stats=True, **kwargs)
    close = functools.partial(torch.testing.assert_close, rtol=rtol, atol=atol, equal_nan=equal_nan)
    close(loss.double().cpu(), ref_loss)
    close(grad.double().cpu(), ref_grad)
    for name in STATS:
        close(getattr(stats, name).double().cpu(), getattr(ref_stats, name), msg=lambda m, name=name: f"{name}: {m}")
    return loss, stats, grad


@contextlib.contextmanager
def tile_config(**overrides):
    """Temporarily shrink the Triton tiling (e.g. to reach the chunked path with small C)."""
    from aepg_kernels.backends.triton.launch import CONFIG

    saved = {k: getattr(CONFIG, k) for k in overrides}
    for k, v in overrides.items():
        setattr(CONFIG, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(CONFIG, k, v)
