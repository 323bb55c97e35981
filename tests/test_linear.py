"""The fused linear + policy loss: equal to policy_loss of the materialised logits (value, stats and
the gradients of input, weight and bias), whatever the chunking, and never the whole logits."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import aepg_kernels as ak
from aepg_kernels import _linear
from tests.helpers import DEVICE, FAMILY, KERNEL_BACKENDS

LINEAR_BACKENDS = KERNEL_BACKENDS  # "eager" is the materialising reference itself
FAMILY_LINEAR = {
    name: kw
    for name, kw in FAMILY.items()
    if name in ("ce", "epg", "aepg_0.25", "ep", "cp", "label_smoothing", "focal", "combo")
}


def _case(n=29, h=12, v=41, dtype=torch.float64, bias=False, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, dtype=torch.float64, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, h, dtype=torch.float64, generator=g) / h**0.5 * 2).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(v, dtype=torch.float64, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return x, w, b, y.to(DEVICE)


def _loss_and_grads(fn, x, w, b, y, grad_seed=1, **kwargs):
    params = [x, w] + ([b] if b is not None else [])
    out = fn(x, w, b, y, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    upstream = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(grad_seed))
    grads = torch.autograd.grad(loss, params, upstream.to(loss.device))
    return out, grads


def _fused(x, w, b, y, **kwargs):
    return ak.linear_policy_loss(x, w, y, linear_bias=b, **kwargs)


def _materialised(x, w, b, y, chunk_size=None, **kwargs):
    kwargs["backend"] = "eager"
    return ak.policy_loss(F.linear(x, w, b), y, **kwargs)


def _assert_same(out, grads, ref_out, ref_grads, tol):
    if isinstance(out, tuple):
        torch.testing.assert_close(out[0], ref_out[0], rtol=tol, atol=tol)
        for got, want in zip(out[1], ref_out[1]):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    else:
        torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("member", sorted(FAMILY_LINEAR))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_family_matches_the_materialised_logits(backend, member, reduction):
    """float64, bias, ignored rows, 7-row chunks (a boundary inside the ignored rows' pattern)."""
    x, w, b, y = _case(bias=True, ignore_every=4)
    kwargs = dict(FAMILY_LINEAR[member], reduction=reduction)
    out, grads = _loss_and_grads(_fused, x, w, b, y, chunk_size=7, backend=backend, **kwargs)
    ref_out, ref_grads = _loss_and_grads(_materialised, x, w, b, y, **kwargs)
    _assert_same(out, grads, ref_out, ref_grads, 1e-10)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 29, None])
@pytest.mark.parametrize("class_weights", [False, True])
def test_chunking_and_class_weights(backend, chunk_size, class_weights):
    x, w, b, y = _case(ignore_every=3)
    weight = torch.rand(w.shape[0], dtype=torch.float64, device=DEVICE) + 0.25 if class_weights else None
    kwargs = dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25, weight=weight, return_stats=True)
    out, grads = _loss_and_grads(_fused, x, w, b, y, chunk_size=chunk_size, backend=backend, **kwargs)
    ref_out, ref_grads = _loss_and_grads(_materialised, x, w, b, y, **kwargs)
    _assert_same(out, grads, ref_out, ref_grads, 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    """float64, odd shapes, several chunks, a chunk boundary inside a run of ignored rows."""
    x, w, b, y = _case(n=11, h=5, v=7, bias=True)
    y[3:6] = -100
    fn = lambda x, w, b: ak.linear_policy_loss(
        x, w, y, linear_bias=b, ce_weight=0.25, epg_weight=0.75, entropy_weight=0.5, reduction=reduction, chunk_size=4
    )
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_cross_entropy_equals_torch_linear_cross_entropy():
    x, w, b, y = _case(n=64, h=16, v=97, dtype=torch.float32, bias=True, ignore_every=5)
    for options in (None, torch.nn.LinearCrossEntropyOptions()):
        want, want_grads = _loss_and_grads(
            lambda x, w, b, y: F.linear_cross_entropy(x, w, y, linear_bias=b, options=options), x, w, b, y
        )
        got, got_grads = _loss_and_grads(_fused, x, w, b, y, chunk_size=16)
        _assert_same(got, got_grads, want, want_grads, 2e-6)


def test_epg_gradient_is_dft():
    """EPG's gradient is DFT's, TRL's formula -exp(logp).detach() * logp (sum over tokens)."""
    x, w, b, y = _case(n=40, v=33, ignore_every=6)

    def dft(x, w, b, y):
        logp = torch.log_softmax(F.linear(x, w), -1)
        counted = y != -100
        logp_y = logp.gather(1, torch.where(counted, y, 0)[:, None])[:, 0]
        return (-(logp_y.exp().detach() * logp_y) * counted).sum()

    _, dft_grads = _loss_and_grads(dft, x, w, b, y)
    _, epg_grads = _loss_and_grads(lambda x, w, b, y: ak.linear_epg_loss(x, w, y, reduction="sum"), x, w, b, y)
    for got, want in zip(epg_grads, dft_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.fixture(params=["native", "fp32"])
def cpu_matmul(request, monkeypatch):
    """Both ways of multiplying bf16/fp16 on the CPU, whatever this CPU has: in the dtype (a CPU
    with matrix instructions for it) and in fp32 (one without)."""
    native = request.param == "native"
    monkeypatch.setattr(_linear, "cpu_has_native_matmul", lambda dtype: native)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_no_worse_than_torch(dtype, cpu_matmul):
    """Against a float64 truth, no worse than PyTorch's own low-precision composite (F.linear in the
    dtype, the loss of logits.float(): HF's way) plus a margin of 2x (docs/math.md section 6)."""
    x64, w64, b64, y = _case(n=64, h=32, v=211, bias=True, ignore_every=7)
    kwargs = dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.1)
    _, truth = _loss_and_grads(_materialised, x64, w64, b64, y, **kwargs)
    low = [t.detach().to(dtype).requires_grad_() for t in (x64, w64, b64)]

    def composite(x, w, b, y, **kw):
        return ak.policy_loss(F.linear(x, w, b).float(), y, backend="eager", **kw)

    _, theirs = _loss_and_grads(composite, *low, y, **kwargs)
    _, ours = _loss_and_grads(_fused, *low, y, chunk_size=16, **kwargs)
    for mine, other, want in zip(ours, theirs, truth):
        scale = want.abs().max()
        assert (mine.double() - want).abs().max() <= 2 * (other.double() - want).abs().max() + 1e-3 * scale


def test_confident_tokens_keep_their_gradient(cpu_matmul):
    """p_y -> 1: the true-class term comes from 1 - p_y, never from a rounded p_y - 1, so dX and dW
    stay accurate in bf16 where the composite's cancel (docs/math.md section 2)."""
    h, v, n = 16, 64, 8
    w64 = torch.randn(v, h, dtype=torch.float64)
    y = torch.arange(n)
    x64 = w64[y] * 1.2  # the target logit about 11 above the others: 1 - p_y ~ 1e-3
    truth = _loss_and_grads(
        _materialised, x64.clone().requires_grad_(), w64.clone().requires_grad_(), None, y, reduction="sum"
    )[1]
    x, w = (t.to(torch.bfloat16).requires_grad_() for t in (x64, w64))
    grads = _loss_and_grads(_fused, x, w, None, y, reduction="sum")[1]
    for got, want in zip(grads, truth):
        error = (got.double() - want).norm() / want.norm()
        assert error < 2e-2, error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_weight_gradient_accumulates_in_fp32(dtype, monkeypatch):
    """dW += dlogits^T x_c on the CPU, where a bf16/fp16 matmul has an output of its dtype: block
    by block, each product rounded once and added in fp32 (blocks of a few rows here), so the
    sum over many chunks does not drift as a low-precision accumulator would."""
    monkeypatch.setattr(_linear, "PRODUCT_BLOCK_BYTES", 3 * 8 * 2)  # 3 rows of an (., 8) product
    v, h, rows, chunks = 10, 8, 16, 64
    acc = torch.zeros(v, h)
    parts = [(torch.randn(v, rows).to(dtype), torch.randn(rows, h).to(dtype)) for _ in range(chunks)]
    for a, b in parts:
        _linear._add_matmul_(acc, a, b)
    exact = sum(a.double() @ b.double() for a, b in parts)
    rounded_sum = torch.zeros(v, h, dtype=dtype)  # what a low-precision accumulator would hold
    for a, b in parts:
        rounded_sum += a @ b
    error = (acc.double() - exact).abs().max()
    assert error <= 4 * chunks**0.5 * torch.finfo(dtype).eps * exact.abs().max()
    assert error < (rounded_sum.double() - exact).abs().max()


def test_tied_embeddings_and_3d_input():
    """One weight as embedding and head: its gradient sums both uses; (B, S, H) input."""
    emb = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 23, (3, 5))
    y = torch.randint(0, 23, (3, 5))
    y[0, :2] = -100

    def total(head):
        hidden = torch.tanh(F.embedding(ids, emb))
        return head(hidden).sum()

    fused = total(lambda h: ak.linear_cross_entropy(h, emb, y, reduction="none", chunk_size=4))
    (fused_grad,) = torch.autograd.grad(fused, emb)
    ref = total(lambda h: F.cross_entropy(F.linear(h, emb).flatten(0, 1), y.flatten(), reduction="none"))
    (ref_grad,) = torch.autograd.grad(ref, emb)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-10, atol=1e-12)
    per_token = ak.linear_cross_entropy(torch.randn(3, 5, 8, dtype=torch.float64), emb, y, reduction="none")
    assert per_token.shape == (3, 5) and (per_token[0, :2] == 0).all()


def test_frozen_head_and_eval():
    """No gradient asked for the weight (a frozen head), or none at all (eval): same loss."""
    x, w, b, y = _case(ignore_every=5)
    w = w.detach()
    loss = ak.linear_policy_loss(x, w, y, chunk_size=5)
    (grad,) = torch.autograd.grad(loss, x)
    ref = _materialised(x, w, None, y)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, x)[0], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ak.linear_policy_loss(x, w, y), ref.detach(), rtol=1e-12, atol=1e-12)


def test_empty_and_all_ignored_batches_match_torch():
    for n, ignore_all in ((0, False), (6, True)):
        x, w, b, y = _case(n=n, h=4, v=9, dtype=torch.float32)
        if ignore_all:
            y[:] = -100
        for reduction in ("mean", "sum", "none"):
            want, want_grads = _loss_and_grads(
                lambda x, w, b, y: F.linear_cross_entropy(x, w, y, reduction=reduction), x, w, None, y
            )
            got, got_grads = _loss_and_grads(_fused, x, w, None, y, reduction=reduction)
            torch.testing.assert_close(got, want, equal_nan=True)
            for g, e in zip(got_grads, want_grads):
                torch.testing.assert_close(g, e, equal_nan=True)


def test_module():
    x, w, b, y = _case(bias=True, ignore_every=4)
    criterion = ak.LinearPolicyLoss(ce_weight=0.25, epg_weight=0.75, entropy_weight=0.5, chunk_size=6)
    out, grads = _loss_and_grads(lambda x, w, b, y: criterion(x, w, y, b), x, w, b, y)
    ref, ref_grads = _loss_and_grads(_materialised, x, w, b, y, ce_weight=0.25, epg_weight=0.75, entropy_weight=0.5)
    _assert_same(out, grads, ref, ref_grads, 1e-10)
    with pytest.raises(ValueError, match="chunk_size"):
        ak.LinearPolicyLoss(chunk_size=0)


def test_compile_fullgraph_without_recompiling_for_alpha():
    from torch._dynamo.testing import CompileCounter

    x, w, b, y = _case(dtype=torch.float32, ignore_every=4)
    alpha = torch.tensor(0.9)
    counter = CompileCounter()
    compiled = torch.compile(
        lambda x, w, y: ak.linear_aepg_loss(x, w, y, alpha, entropy_weight=0.1, chunk_size=8),
        fullgraph=True,
        backend=counter,
    )
    for value in (0.9, 0.4):
        alpha.fill_(value)
        out, grads = _loss_and_grads(lambda x, w, b, y: compiled(x, w, y), x, w, None, y)
        ref, ref_grads = _loss_and_grads(
            _materialised, x, w, None, y, ce_weight=value, epg_weight=1 - value, entropy_weight=0.1
        )
        _assert_same(out, grads, ref, ref_grads, 2e-6)
    assert counter.frame_count == 1


def test_the_logits_are_never_materialised():
    """Peak memory of a fresh process: the fp32 logits (4096 x 32768) alone would be 512 MiB, and
    the loop holds one chunk buffer (the gradient written over the logits), not two."""
    script = textwrap.dedent("""
        import resource, torch, aepg_kernels as ak
        torch.manual_seed(0)
        small = torch.randn(4, 32, requires_grad=True)  # the first call's imports are not the op's memory
        ak.linear_policy_loss(small, torch.randn(8, 32, requires_grad=True), torch.zeros(4).long()).backward()
        x = torch.randn(4096, 32, requires_grad=True)
        w = (torch.randn(32768, 32) / 8).requires_grad_()
        y = torch.randint(0, 32768, (4096,))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ak.linear_policy_loss(x, w, y, ce_weight=0.5, epg_weight=0.5).backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    extra_mib = float(done.stdout.split()[-1])
    # The weight's gradient (4 MiB) and one chunk's logits (64 MiB, reused from chunk to chunk, the
    # cpu backend writing their gradient over them): about 70 MiB, not the 512 MiB of the logits
    # (and 3 GiB for the eager path). A second chunk buffer would add 64 MiB: about 133 MiB.
    assert extra_mib < 100, extra_mib


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda x, w, y: ak.linear_policy_loss(x, w[:, :-1], y), ValueError, "H = input.shape"),
        (lambda x, w, y: ak.linear_policy_loss(x, w[0], y), ValueError, "linear_weight must be a 2-d"),
        (
            lambda x, w, y: ak.linear_policy_loss(x, w, y, linear_bias=w[:3, 0]),
            ValueError,
            "linear_bias must have shape",
        ),
        (
            lambda x, w, y: ak.linear_policy_loss(x, w.float(), y),
            TypeError,
            "linear_weight must have the input's dtype",
        ),
        (lambda x, w, y: ak.linear_policy_loss(x, w, y[:-1]), ValueError, "target must have shape"),
        (lambda x, w, y: ak.linear_policy_loss(x, w, y.double()), TypeError, "class indices"),
        (lambda x, w, y: ak.linear_policy_loss(x, w, y.clone().fill_(41)), IndexError, "out of bounds"),
        (lambda x, w, y: ak.linear_policy_loss(x, w, y, chunk_size=0), ValueError, "chunk_size"),
        (lambda x, w, y: ak.linear_policy_loss(x, w, y, chunk_size=2.0), TypeError, "chunk_size"),
        (
            lambda x, w, y: ak.linear_policy_loss(x, w, y, weight=torch.ones(3, dtype=torch.float64)),
            ValueError,
            "weight must be a 1-d tensor of length C=41",
        ),
    ],
)
def test_bad_input(call, error, pattern):
    x, w, _, y = _case()
    with pytest.raises(error, match=pattern):
        call(x, w, y)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_rows_off_chip_take_the_recompute_backward(backend, monkeypatch):
    """Where a backend cannot keep a row on chip (CUDA above its limit), each chunk's gradient
    comes from the recompute backward on the same logits: the same results."""
    from aepg_kernels.backends import REGISTRY

    monkeypatch.setattr(type(REGISTRY[backend]), "fits_on_chip", lambda self, n_cols: False)
    x, w, b, y = _case(bias=True, ignore_every=4)
    kwargs = dict(ce_weight=0.25, epg_weight=0.75, entropy_weight=0.5)
    out, grads = _loss_and_grads(_fused, x, w, b, y, chunk_size=7, backend=backend, **kwargs)
    ref_out, ref_grads = _loss_and_grads(_materialised, x, w, b, y, **kwargs)
    _assert_same(out, grads, ref_out, ref_grads, 1e-10)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_gradient_buffers_are_checked(backend):
    from aepg_kernels._contract import Flag, pack
    from aepg_kernels.backends import REGISTRY

    logits = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    target = torch.randint(0, 6, (4,), device=DEVICE)
    call = (logits, target, None, *pack(1.0, 0.0, 0.0, 0.0, 0.0, -100, 1, False, False))
    flags = call[-1] | int(Flag.WRITE_GRAD)
    with pytest.raises((RuntimeError, ValueError), match="contiguous tensor"):
        REGISTRY[backend].forward(*call[:-1], flags, out=torch.empty(4, 5, dtype=torch.float64, device=DEVICE))
    out = torch.empty_like(logits)
    loss, stats, grad, denom = REGISTRY[backend].forward(*call[:-1], flags, out=out)
    assert grad.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out * 4, torch.softmax(logits, 1) - F.one_hot(target, 6))  # "mean" of 4 rows


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logit_scale,softcap", [(0.5, None), (1.0, 3.0), (2.0, 1.5)])
def test_logit_scale_and_softcap(backend, reduction, logit_scale, softcap):
    """softcap tanh(logit_scale z / softcap) inside the chunks, with its chain rule, equals the
    transform applied to the materialised logits (Gemma's final-logit softcapping)."""
    x, w, b, y = _case(bias=True, ignore_every=4)
    kwargs = dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25, reduction=reduction)

    def materialised(x, w, b, y, **kw):
        z = F.linear(x, w, b) * logit_scale
        z = softcap * torch.tanh(z / softcap) if softcap else z
        return ak.policy_loss(z, y, backend="eager", **kw)

    out, grads = _loss_and_grads(
        _fused, x, w, b, y, chunk_size=7, backend=backend, logit_scale=logit_scale, softcap=softcap, **kwargs
    )
    ref_out, ref_grads = _loss_and_grads(materialised, x, w, b, y, **kwargs)
    _assert_same(out, grads, ref_out, ref_grads, 1e-10)
    eager = ak.linear_policy_loss(
        x, w, y, linear_bias=b, backend="eager", logit_scale=logit_scale, softcap=softcap, **kwargs
    )
    torch.testing.assert_close(eager, ref_out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(softcap=0.0), "softcap must be a positive"),
        (dict(softcap=-1.0), "softcap must be a positive"),
        (dict(logit_scale=0.0), "logit_scale must be a non-zero"),
        (dict(logit_scale=float("inf")), "logit_scale"),
    ],
)
def test_bad_logit_transform(kwargs, pattern):
    x, w, _, y = _case()
    with pytest.raises(ValueError, match=pattern):
        ak.linear_policy_loss(x, w, y, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        ak.LinearPolicyLoss(**kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_dft_value_has_no_cancellation(reduction):
    """DFT alone at a large vocabulary: p_y ~ 1/V makes the value about 1e-4 of the EPG term's, so
    it must not be the EPG value plus a correction (fp32 rounding of a sum of ~N); against float64
    truth within 1e-5 relative, the gradient still the op's (EPG's)."""
    x64 = torch.randn(256, 32, dtype=torch.float64)
    w64 = torch.randn(20000, 32, dtype=torch.float64) * 0.01
    y = torch.randint(0, 20000, (256,))
    truth = ak.linear_dft_loss(x64, w64, y, reduction=reduction, backend="eager")
    x = x64.float().requires_grad_()
    got = ak.linear_dft_loss(x, w64.float(), y, reduction=reduction)
    assert abs((got.double() - truth) / truth).item() < 1e-5
    got.backward()
    x_ref = x64.float().requires_grad_()
    ak.linear_epg_loss(x_ref, w64.float(), y, reduction=reduction).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


def _on_cpu_tensors() -> bool:
    return torch.device(DEVICE).type == "cpu"


def _expects_in_place(backend: str, fused: bool) -> bool:
    """The rule of each backend's grad_into_logits, written out (docs/design.md section 8): every
    kernel writes over the logits on CPU tensors (the C++ rows and the Triton interpreter); on a
    GPU only Triton's recompute backward does (CUDA's and Triton's fused forwards race on z_y)."""
    return _on_cpu_tensors() or (backend == "triton" and not fused)


class _BufferLog:
    """The _Chunks of each op call and, per row-op call, whether `out` was the logits' memory."""

    def __init__(self, monkeypatch, backend: str):
        from aepg_kernels import _linear
        from aepg_kernels.backends import REGISTRY

        self.chunks: list = []
        self.outs: list = []  # (path, out is the logits)
        kernels = type(REGISTRY[backend])
        init, forward, backward = _linear._Chunks.__init__, kernels.forward, kernels.backward

        def record_chunks(chunks, *args, **kwargs):
            init(chunks, *args, **kwargs)
            self.chunks.append(chunks)

        def record_forward(kernels, logits, *call, out=None):
            if out is not None:
                self.outs.append(("fused", out.data_ptr() == logits.data_ptr()))
            return forward(kernels, logits, *call, out=out)

        def record_backward(kernels, grad_loss, logits, *call, out=None):
            if out is not None:
                self.outs.append(("recompute", out.data_ptr() == logits.data_ptr()))
            return backward(kernels, grad_loss, logits, *call, out=out)

        monkeypatch.setattr(_linear._Chunks, "__init__", record_chunks)
        monkeypatch.setattr(kernels, "forward", record_forward)
        monkeypatch.setattr(kernels, "backward", record_backward)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("path", ["fused", "token_weight", "none", "off_chip", "softcap"])
def test_one_chunk_buffer_where_the_gradient_goes_in_place(backend, path, monkeypatch):
    """The chunk loop holds the logits workspace and, only where the row op cannot write over
    them (or softcap's chain rule still needs z), a second buffer of its size; each row-op call
    gets the logits' own memory as `out` exactly on the in-place paths."""
    from aepg_kernels.backends import REGISTRY

    if path == "off_chip":
        monkeypatch.setattr(type(REGISTRY[backend]), "fits_on_chip", lambda self, n_cols: False)
    log = _BufferLog(monkeypatch, backend)
    x, w, b, y = _case(bias=True, ignore_every=4)
    kwargs = dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25, chunk_size=7, backend=backend)
    if path == "token_weight":
        kwargs["token_weight"] = torch.rand(y.shape, dtype=torch.float64, device=DEVICE)
    kwargs["reduction"] = "none" if path == "none" else "mean"
    if path == "softcap":
        kwargs["softcap"] = 3.0
    _loss_and_grads(_fused, x, w, b, y, **kwargs)

    fused = path in ("fused", "softcap")
    in_place = path != "softcap" and _expects_in_place(backend, fused)
    assert log.chunks and log.outs
    assert {kind for kind, _ in log.outs} == {"fused" if fused else "recompute"}
    assert all(aliased == in_place for _, aliased in log.outs), log.outs
    for chunks in log.chunks:  # one _Chunks per op call: forward, and backward for "none"
        assert (chunks.grad_buffer is None) == in_place


def _bits(out, grads):
    loss, stats = out if isinstance(out, tuple) else (out, ())
    return [loss, *stats, *grads]


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("loss", ["ce", "epg", "dft", "aepg_entropy"])
@pytest.mark.parametrize("chunk_size", [1, 7, 29])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_in_place_gradient_equals_a_separate_buffer_bitwise(backend, loss, chunk_size, reduction, monkeypatch):
    """Writing over the logits changes where the gradient goes, not one operation: loss, stats and
    gradients are bitwise those of the separate buffer (both are fresh allocations of the same
    shape and alignment, so the matmuls see the same operands in the same layout). fp32, bias,
    ignored rows, class weights, token weights; chunks of 1 row, 7 rows and all 29."""
    from aepg_kernels.backends import REGISTRY

    x, w, b, y = _case(dtype=torch.float32, bias=True, ignore_every=4)
    terms = dict(
        ce=dict(ce_weight=1.0, epg_weight=0.0),
        epg=dict(ce_weight=0.0, epg_weight=1.0),
        dft=dict(ce_weight=0.0, epg_weight=1.0, loss_value="dft"),
        aepg_entropy=dict(ce_weight=torch.tensor(0.5, device=DEVICE), epg_weight=0.5, entropy_weight=0.1),
    )[loss]
    weight = torch.rand(w.shape[0], device=DEVICE) + 0.25
    token_weight = torch.rand(y.shape, device=DEVICE)
    results = []
    for in_place in (True, False):
        log = _BufferLog(monkeypatch, backend)
        if not in_place:
            monkeypatch.setattr(type(REGISTRY[backend]), "grad_into_logits", lambda self, fused, device: False)
        for tw in (None, token_weight):
            kwargs = dict(terms, weight=weight, token_weight=tw, reduction=reduction, return_stats=True)
            kwargs.update(chunk_size=chunk_size, backend=backend)
            results.append(_bits(*_loss_and_grads(_fused, x, w, b, y, **kwargs)))
        assert any(aliased for _, aliased in log.outs) == (in_place and _expects_in_place(backend, False))
        monkeypatch.undo()
    half = len(results) // 2
    for got, want in zip(results[:half], results[half:]):
        for a, e in zip(got, want):
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a[~a.isnan()], e[~e.isnan()])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_backward_of_a_reduced_loss_allocates_nothing_of_the_weights_size(reduction):
    """The forward of a reduced loss computed the gradients; its backward hands them over. Autograd
    must not fill the op's other outputs (stats, the saved gradients) with zeros: a (V, H) tensor
    beside the dW accumulator would be the call's peak memory (benchmarks/README.md, LLM head)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            seen = {t.untyped_storage().data_ptr() for t in tensors}  # views (detach) allocate nothing
            new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.made += [(str(func), t.numel()) for t in new if t.untyped_storage().data_ptr() not in seen]
            return out

    x, w, b, y = _case(bias=True, ignore_every=4)
    loss = ak.linear_policy_loss(x, w, y, linear_bias=b, reduction=reduction, chunk_size=7)
    with Sizes() as sizes:
        loss.backward()
    assert sizes.made and max(numel for _, numel in sizes.made) < w.numel(), sizes.made
    ref_grads = torch.autograd.grad(_materialised(x, w, b, y, reduction=reduction), (x, w, b))
    for got, want in zip((x.grad, w.grad, b.grad), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_stats_alone_take_no_gradient(reduction):
    """Backward through the stats only (the loss's gradient then arrives as None, not zeros): the
    stats are constants of the loss, so no gradient reaches the input or the weight."""
    x, w, _, y = _case()
    _, stats = ak.linear_policy_loss(x, w, y, return_stats=True, reduction=reduction, chunk_size=7)
    stats.entropy.sum().backward()
    assert x.grad is None and w.grad is None
