"""Edge cases (docs/design.md section 7, behaviour at the edges), on every backend, against the float64 eager
reference or F.cross_entropy: confident, uniform and shifted rows, masked (-inf) classes, NaN
logits, all-ignored batches, degenerate shapes, non-contiguous inputs, ignore_index values,
out-of-range targets, poisoned output buffers, per-row statistics and tensor coefficients."""

import math

import pytest
import torch
import torch.nn.functional as F

import aepg_kernels as ak
from aepg_kernels._contract import LossSpec, Reduction
from aepg_kernels.backends.triton import TRITON, op as triton_op
from tests.helpers import (
    ALL_BACKENDS,
    DEVICE,
    KERNEL_BACKENDS,
    STATS,
    assert_matches_reference,
    class_weights,
    index_targets,
    logits,
    loss_and_grad,
    prob_targets,
    reference64,
    tile_config,
)

HAS_TRITON = "triton" in KERNEL_BACKENDS
CHUNKED = dict(max_one_tile_cols=8, chunk_cols=4)  # rows of C > 8 stream in chunks of 4 classes

# (backend, chunked): every backend on its default path, plus Triton's chunked (online) path.
PATHS = [(b, False) for b in ALL_BACKENDS] + ([("triton", True)] if HAS_TRITON else [])
PATH_IDS = [f"{b}-chunked" if chunked else b for b, chunked in PATHS]


def _tiles(chunked):
    return tile_config(**CHUNKED) if chunked else tile_config()


def _run(x, y, backend, chunked=False, grad_output=None, **kw):
    """(loss, stats), grad through `backend` (Triton's chunked path if `chunked`)."""
    with _tiles(chunked):
        return loss_and_grad(x, y, grad_output, backend=backend, return_stats=True, **kw)


def _assert_close_to_reference(x, y, backend, chunked=False, **kw):
    """Loss, gradient and every statistic equal the float64 eager reference; returns ours."""
    with _tiles(chunked):
        return assert_matches_reference(x, y, backend, equal_nan=True, **kw)


def _assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), t


# --- confident, uniform and shifted rows --------------------------------------------------------

CONFIDENT_MEMBERS = {
    "ce": dict(),
    "epg": dict(ce_weight=0.0, epg_weight=1.0),
    "aepg": dict(ce_weight=0.3, epg_weight=0.7),
    "focal_0.5": dict(focal_gamma=0.5),
    "focal_2": dict(focal_gamma=2.0),
}


@pytest.mark.parametrize("backend,chunked", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("margin", [10.0, 100.0])
@pytest.mark.parametrize("member", list(CONFIDENT_MEMBERS))
def test_confident_rows(backend, chunked, margin, member):
    """z_y = row max + margin (p_y > 0.999; p_y rounds to 1 for margin 100): finite loss,
    gradient and stats equal to the float64 reference, for CE, EPG, aEPG and focal."""
    x = logits(8, 11, dtype=torch.float32, requires_grad=False)
    y = index_targets(8, 11)
    x[torch.arange(8, device=DEVICE), y] = x.amax(-1) + margin
    # log p_y comes from 1 - p_y on confident rows, so even the focal factor
    # (1-p_y)^0.5 (1 - 0.5 p_y log p_y / (1-p_y)) keeps fp32 accuracy at p_y ~ 0.9999.
    loss, stats, grad = _assert_close_to_reference(
        x, y, backend, chunked, reduction="none", **CONFIDENT_MEMBERS[member]
    )
    _assert_finite(loss, grad, *stats)
    assert (stats.p_target > 0.999).all()
    if margin == 100.0:
        assert (stats.p_target == 1).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("c", [1, 7, 16])
def test_uniform_rows(backend, c):
    """All logits of a row equal: entropy = log C, p_y = 1/C, CE loss = log C."""
    x = torch.arange(5, dtype=torch.float32, device=DEVICE)[:, None].expand(5, c) * 3 - 6
    y = index_targets(5, c)
    (loss, stats), _ = _run(x, y, backend, reduction="none")
    expected = torch.full((5,), math.log(c), device=DEVICE)
    torch.testing.assert_close(stats.entropy.float(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.p_target.float(), torch.full_like(expected, 1 / c), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


SHIFT_MEMBERS = {
    "ce": dict(),
    "epg": dict(ce_weight=0.0, epg_weight=1.0),
    "ep": dict(entropy_weight=0.5),
    "smoothing": dict(label_smoothing=0.1),
    "prob": dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25, label_smoothing=0.1),
}


@pytest.mark.parametrize("backend,chunked", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("member", list(SHIFT_MEMBERS))
def test_shifted_rows(backend, chunked, member):
    """Adding 1e4 to fp32 logits changes neither loss, gradient nor entropy (shift invariance).
    The unshifted logits are (x + 1e4) - 1e4, exact in fp32, so both describe the same rows."""
    shifted = logits(8, 11, dtype=torch.float32, requires_grad=False) + 1e4
    x = shifted - 1e4
    y = prob_targets(8, 11, dtype=torch.float32) if member == "prob" else index_targets(8, 11)
    kw = dict(SHIFT_MEMBERS[member], reduction="none", weight=class_weights(11, dtype=torch.float32))
    loss, stats, grad = _assert_close_to_reference(x, y, backend, chunked, **kw)
    (s_loss, s_stats), s_grad = _run(shifted, y, backend, chunked, **kw)
    torch.testing.assert_close(s_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_grad, grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_stats.entropy, stats.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_stats.lse, stats.lse + 1e4, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(4, 4099), (6, 33)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_epg_gradient_of_unlikely_targets(backend, shape, reduction, weighted):
    """EPG's gradient p_y (p - e_y) is tiny when p_y is small (wide rows of spread logits); fp32
    must still get it to fp32 accuracy relative to its largest entry, on every backend (an
    autograd of 1 - p_y through the other classes' mass cancels to 1e-2 here)."""
    n, c = shape
    x = logits(n, c, dtype=torch.float32, scale=3.0)
    y = index_targets(n, c)
    weight = class_weights(c, dtype=torch.float32) if weighted else None
    kw = dict(ce_weight=0.0, epg_weight=1.0, reduction=reduction, weight=weight)
    _, grad = loss_and_grad(x, y, backend=backend, **kw)
    _, ref_grad = reference64(x, y, **kw)
    error = (grad.double().cpu() - ref_grad).abs().max() / ref_grad.abs().max()
    assert error < 1e-5, f"gradient error {error:.2e} of the largest entry"


# --- masked classes, NaN logits, ignored batches ------------------------------------------------

FAMILY_SMALL = {"ce": dict(), "epg": dict(ce_weight=0.0, epg_weight=1.0), "ep": dict(entropy_weight=0.5)}
MASKED = [0, 1, 2, 3, 9]  # the whole first chunk of the chunked path, and one more class
MASK_MEMBERS = {
    "ce": dict(),
    "epg": dict(ce_weight=0.0, epg_weight=1.0),
    "ep": dict(entropy_weight=0.5),
    "cp": dict(entropy_weight=-0.5),
    "aepg_focal": dict(ce_weight=0.5, epg_weight=0.5, focal_gamma=1.5),
    "prob": dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25),
    "smoothing_weight0": dict(label_smoothing=0.1, entropy_weight=0.25),
}


@pytest.mark.parametrize("backend,chunked", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("member", list(MASK_MEMBERS))
def test_masked_classes(backend, chunked, reduction, member):
    """-inf logits on classes that are not the target (probability targets: zero mass there;
    label smoothing: class weight 0 there): finite loss, gradient and entropy equal to the
    reference, and a gradient of exactly 0 on the masked classes."""
    n, c = 6, 11
    x = logits(n, c, dtype=torch.float32, requires_grad=False)
    x[:, MASKED] = float("-inf")
    allowed = torch.tensor([k for k in range(c) if k not in MASKED])
    kw = dict(MASK_MEMBERS[member], reduction=reduction)
    if member == "prob":
        q = prob_targets(n, c, dtype=torch.float32).cpu()
        q[:, MASKED] = 0
        y = (q / q.sum(-1, keepdim=True)).to(DEVICE)
    else:
        y = allowed[torch.randint(0, len(allowed), (n,))].to(DEVICE)
    if member == "smoothing_weight0":
        w = class_weights(c, dtype=torch.float32)
        w[MASKED] = 0
        kw["weight"] = w
    loss, stats, grad = _assert_close_to_reference(x, y, backend, chunked, **kw)
    _assert_finite(loss, grad, stats.entropy, stats.p_target, stats.sample_weight, stats.lse)
    assert (grad[:, MASKED] == 0).all()


MASK_EXCEPTIONS = ["smoothing", "masked_target", "masked_row"]


@pytest.mark.parametrize("backend,chunked", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", MASK_EXCEPTIONS)
def test_masked_classes_documented_exceptions(backend, chunked, case):
    """The exceptions of docs/design.md section 7, as in PyTorch: label smoothing over a masked class (weight 1) and
    a masked target class give an inf loss with a finite gradient; a row of only -inf gives NaN.
    Loss and gradient equal F.cross_entropy's (inf/NaN in the same places)."""
    x = logits(4, 11, dtype=torch.float32, requires_grad=False)
    x[:, MASKED] = float("-inf")
    y = torch.tensor([4, 5, 6, 10], device=DEVICE)
    kw = dict(label_smoothing=0.1) if case == "smoothing" else {}
    if case == "masked_target":
        y[1] = MASKED[-1]
    if case == "masked_row":
        x[1] = float("-inf")
    (loss, _), grad = _run(x, y, backend, chunked, reduction="none", **kw)
    leaf = x.clone().requires_grad_(True)
    expected = F.cross_entropy(leaf, y, reduction="none", **kw)
    (torch_grad,) = torch.autograd.grad(expected.sum(), leaf)
    torch.testing.assert_close(loss, expected.detach(), equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch_grad, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert not torch.isfinite(loss[1]) and torch.isfinite(grad[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend,chunked", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("where", ["target", "other"])
@pytest.mark.parametrize("member", ["ce", "epg", "ep"])
def test_nan_logits_propagate(backend, chunked, where, member):
    """A NaN logit in a counted row (at the target or elsewhere) makes that row's loss NaN and
    the "mean" loss NaN; the other rows are untouched."""
    n, c = 5, 11
    x = logits(n, c, dtype=torch.float32, requires_grad=False)
    y = index_targets(n, c)
    col = y[2] if where == "target" else (y[2] + 5) % c
    x[2, col] = float("nan")
    kw = dict(FAMILY_SMALL[member])
    (loss, _), grad = _run(x, y, backend, chunked, reduction="none", **kw)
    assert torch.isnan(loss[2])
    assert torch.isnan(grad[2]).any()
    keep = [0, 1, 3, 4]
    (ref, _), ref_grad = reference64(x[keep], y[keep], reduction="none", return_stats=True, **kw)
    torch.testing.assert_close(loss[keep].double().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[keep].double().cpu(), ref_grad, rtol=1e-5, atol=1e-6)
    (mean, _), _ = _run(x, y, backend, chunked, reduction="mean", **kw)
    assert torch.isnan(mean)


@pytest.mark.parametrize("backend,chunked", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("member", list(FAMILY_SMALL))
@pytest.mark.parametrize("weighted", [False, True])
def test_all_rows_ignored(backend, chunked, reduction, member, weighted):
    """Every row ignored: "mean" gives NaN (0/0, as PyTorch), "sum" 0, "none" zeros; the gradient
    is exactly zero in every case, and p_target / sample_weight are 0."""
    n, c = 5, 11
    x = logits(n, c, dtype=torch.float32, requires_grad=False)
    y = torch.full((n,), -100, dtype=torch.int64, device=DEVICE)
    kw = dict(FAMILY_SMALL[member], reduction=reduction)
    if weighted:
        kw["weight"] = class_weights(c, dtype=torch.float32)
    (loss, stats), grad = _run(x, y, backend, chunked, **kw)
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert (loss == 0).all() and loss.shape == (() if reduction == "sum" else (n,))
    assert (grad == 0).all()
    assert (stats.p_target == 0).all() and (stats.sample_weight == 0).all()
    if member == "ce":
        expected = F.cross_entropy(x, y, reduction=reduction, weight=kw.get("weight"))
        torch.testing.assert_close(loss, expected, equal_nan=True)


# --- shapes, layouts and target dtypes ----------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("member", ["ce", "aepg", "focal_2"])
def test_single_class(backend, member):
    """C = 1: p_y = 1, zero loss and gradient, entropy 0, as the reference and F.cross_entropy."""
    x = logits(6, 1, dtype=torch.float32, requires_grad=False)
    y = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    loss, stats, grad = _assert_close_to_reference(x, y, backend, reduction="sum", **CONFIDENT_MEMBERS[member])
    assert loss == 0 and (grad == 0).all() and (stats.entropy == 0).all() and (stats.p_target == 1).all()
    torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction="sum"))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_empty_batch(backend, reduction, prob):
    """N = 0: the same value and shape as F.cross_entropy (mean NaN, sum 0, none empty), an empty
    gradient and empty stats."""
    x = logits(0, 7, dtype=torch.float32, requires_grad=False)
    y = prob_targets(0, 7, dtype=torch.float32) if prob else index_targets(0, 7)
    (loss, stats), grad = _run(x, y, backend, reduction=reduction, entropy_weight=0.5)
    expected = F.cross_entropy(x, y, reduction=reduction)
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert grad.shape == (0, 7)
    assert all(getattr(stats, name).shape == (0,) for name in STATS)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vector_input(backend, reduction):
    """Input (C,) with a 0-d target: a 0-d loss equal to F.cross_entropy, 0-d stats, and the
    same values as the reference for EPG."""
    x = torch.randn(9, device=DEVICE)
    y = torch.tensor(4, device=DEVICE)
    (loss, stats), grad = _run(x, y, backend, reduction=reduction)
    assert loss.shape == () and grad.shape == (9,) and all(getattr(stats, s).shape == () for s in STATS)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction=reduction))
    _assert_close_to_reference(x, y, backend, reduction=reduction, ce_weight=0.0, epg_weight=1.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("prob", [False, True])
def test_spatial_input(backend, prob):
    """Input (N, C, d1, d2): loss "none" and stats of shape (N, d1, d2), equal to F.cross_entropy
    (CE) and to the reference (a combination of terms)."""
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    if prob:
        y = torch.softmax(torch.randn(2, 5, 3, 4, device=DEVICE), 1)
    else:
        y = torch.randint(0, 5, (2, 3, 4), device=DEVICE)
        y[0, 1, 2] = -100
    (loss, stats), grad = _run(x, y, backend, reduction="none")
    assert loss.shape == (2, 3, 4) and grad.shape == x.shape
    assert all(getattr(stats, s).shape == (2, 3, 4) for s in STATS)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction="none"))
    _assert_close_to_reference(x, y, backend, reduction="none", ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25)


VIEWS = {
    "column_slice": lambda base: base[:, ::2],  # stride (2C, 2): copied to contiguous rows
    "row_slice": lambda base: base[::2],  # stride (2C, 1): rows read in place with a row stride
    "transpose": lambda base: base.t(),  # (C, N) transposed: stride (1, N)
    "expanded": lambda base: base[:1].expand(6, -1),  # stride (0, 1): every row the same memory
}
BASE_SHAPES = {"column_slice": (6, 22), "row_slice": (12, 11), "transpose": (11, 6), "expanded": (6, 11)}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_input(backend, view, reduction):
    """A strided view as input gives the loss, stats and gradient (w.r.t. the view's base) of
    its contiguous copy; the base's other elements get gradient 0."""
    base = torch.randn(*BASE_SHAPES[view], device=DEVICE, requires_grad=True)
    x = VIEWS[view](base)
    assert not x.is_contiguous()
    y = index_targets(6, 11, ignore_index=-100)
    kw = dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25, reduction=reduction, backend=backend)
    loss, stats = ak.policy_loss(x, y, return_stats=True, **kw)
    (grad_base,) = torch.autograd.grad(loss.sum(), base)
    (ref_loss, ref_stats), ref_grad = loss_and_grad(
        x.detach().contiguous(),
        y,
        torch.ones(6, device=DEVICE) if reduction == "none" else None,
        return_stats=True,
        **kw,
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for name in STATS:
        torch.testing.assert_close(getattr(stats, name), getattr(ref_stats, name), rtol=1e-6, atol=1e-7)
    expected = torch.zeros_like(base)
    expected_view = VIEWS[view](expected)
    if view == "expanded":
        expected[:1] = ref_grad.sum(0, keepdim=True)
    else:
        expected_view.copy_(ref_grad)
    torch.testing.assert_close(grad_base, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_int32_targets_equal_int64(backend, ignore_index):
    """int32 class indices give exactly the int64 result (loss, gradient, stats)."""
    x = logits(9, 7, dtype=torch.float32, requires_grad=False)
    y = index_targets(9, 7, ignore_index=ignore_index)
    kw = dict(
        ce_weight=0.5,
        epg_weight=0.5,
        label_smoothing=0.1,
        weight=class_weights(7, dtype=torch.float32),
        ignore_index=ignore_index,
    )
    (loss, stats), grad = _run(x, y, backend, **kw)
    (loss32, stats32), grad32 = _run(x, y.int(), backend, **kw)
    assert torch.equal(loss32, loss) and torch.equal(grad32, grad)
    for name in STATS:
        assert torch.equal(getattr(stats32, name), getattr(stats, name)), name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_int32_targets_with_wide_ignore_index(backend):
    """ignore_index = 2**40 matches no int32 class index: int32 targets count every row, as int64 do."""
    x = logits(6, 5, dtype=torch.float32, requires_grad=False)
    y = torch.tensor([0, 1, 2, 3, 4, 0], device=DEVICE)
    (loss, _), grad = _run(x, y, backend, ignore_index=2**40)
    (loss32, _), grad32 = _run(x, y.int(), backend, ignore_index=2**40)
    torch.testing.assert_close(loss32, loss)
    torch.testing.assert_close(grad32, grad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_non_contiguous_weight(backend, smoothing):
    """Class weights given as a strided view (every other element of a longer tensor) give the
    result of their contiguous copy and of F.cross_entropy."""
    x = logits(6, 7, dtype=torch.float32, requires_grad=False)
    y = index_targets(6, 7, ignore_index=-100)
    w = class_weights(14, dtype=torch.float32)[::2]
    kw = dict(label_smoothing=smoothing, reduction="none")
    (loss, _), grad = _run(x, y, backend, weight=w, **kw)
    (ref_loss, _), ref_grad = _run(x, y, backend, weight=w.contiguous(), **kw)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, weight=w, **kw), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


# --- ignore_index and out-of-range targets ------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("ignore_index", [-1, -7, 0, 1, 4, 10, 2**40])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_values(backend, ignore_index, reduction):
    """A negative ignore_index other than -100, or one in [0, C): rows with that target are
    ignored (loss 0, p_target 0, gradient 0), as F.cross_entropy; EPG equals the reference."""
    x = logits(12, 6, dtype=torch.float32, requires_grad=False)
    y = index_targets(12, 6, ignore_index=ignore_index)
    y[5] = ignore_index
    ignored = y == ignore_index
    (loss, stats), grad = _run(x, y, backend, reduction=reduction, ignore_index=ignore_index)
    (ref_loss, _), ref_grad = loss_and_grad(
        x, y, reduction=reduction, ignore_index=ignore_index, return_stats=True, backend="eager"
    )
    expected = F.cross_entropy(x, y, reduction=reduction, ignore_index=ignore_index)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert (grad[ignored] == 0).all() and (stats.p_target[ignored] == 0).all() and (stats.p_target[~ignored] > 0).all()
    _assert_close_to_reference(
        x, y, backend, reduction=reduction, ignore_index=ignore_index, ce_weight=0.0, epg_weight=1.0
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [7, 12, -3, -100])
def test_out_of_range_target_raises_on_cpu(backend, bad):
    """A class index outside [0, C) that is not ignore_index raises IndexError naming the index,
    for CPU tensors, whatever the backend (-100 is out of range once ignore_index is -1)."""
    x = torch.randn(4, 7)
    y = torch.tensor([0, bad, 2, 3])
    with pytest.raises(IndexError, match=rf"target: class index {bad} is out of bounds"):
        ak.policy_loss(x, y, backend=backend, ignore_index=-1)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton backend")
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("reduction", [Reduction.NONE, Reduction.SUM])
def test_out_of_range_target_in_kernel_gives_nan_rows(chunked, reduction):
    """Past validation (as on CUDA), the Triton kernels give rows with a class index C + 5 or -3
    a NaN loss and a NaN gradient row, never read out of bounds, and leave the other rows exact."""
    n, c = 6, 11
    x = logits(n, c, requires_grad=True)
    y = index_targets(n, c)
    y[1], y[3] = c + 5, -3
    good = [0, 2, 4, 5]
    with _tiles(chunked):
        call = LossSpec(reduction=reduction).pack(need_entropy=True)  # past the CPU range check of TRITON.loss
        loss, stats = triton_op.policy_loss(x, y, None, *call, TRITON.fits_on_chip)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isnan(grad[[1, 3]]).all()
    (ref_loss, _), ref_grad = reference64(x[good], y[good], reduction="none", return_stats=True)
    torch.testing.assert_close(grad[good].cpu(), ref_grad, rtol=1e-12, atol=1e-14)
    if reduction == Reduction.NONE:
        assert torch.isnan(loss[[1, 3]]).all()
        torch.testing.assert_close(loss[good].cpu(), ref_loss, rtol=1e-12, atol=1e-14)
    else:
        assert torch.isnan(loss)


# --- poisoned output buffers --------------------------------------------------------------------


class _PoisonedTorch:
    """Stands in for the `torch` module of triton/launch.py: `empty` float buffers start as NaN,
    so that any element a kernel forgets to write shows up; everything else is torch."""

    def __init__(self):
        self.calls = 0

    def empty(self, *args, **kwargs):
        out = torch.empty(*args, **kwargs)
        if out.is_floating_point():
            self.calls += 1
            out.fill_(float("nan"))
        return out

    def __getattr__(self, name):
        return getattr(torch, name)


POISON_PATHS = {
    "fused": ("mean", {}),  # gradient written by the forward
    "recomputed": ("none", {}),  # gradient from the backward kernel
    "chunked": ("mean", CHUNKED),  # streamed rows, recomputed gradient
}


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton backend")
@pytest.mark.parametrize("path", list(POISON_PATHS))
@pytest.mark.parametrize("member", ["ce", "combo", "prob"])
def test_poisoned_outputs_are_all_written(monkeypatch, path, member):
    """With NaN-filled output buffers, loss, stats and gradient still equal the reference: every
    output slot is written (ignored rows too; N = 13 is not a multiple of the 4 rows per program)."""
    from aepg_kernels.backends.triton import launch

    poisoned = _PoisonedTorch()
    monkeypatch.setattr(launch, "torch", poisoned)
    reduction, tiles = POISON_PATHS[path]
    n, c = 13, 11
    x = logits(n, c, dtype=torch.float32, requires_grad=False)
    kw = dict(reduction=reduction, weight=class_weights(c, dtype=torch.float32))
    if member == "prob":
        y = prob_targets(n, c, dtype=torch.float32)
        kw.update(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.25, label_smoothing=0.1)
    else:
        y = index_targets(n, c, ignore_index=-100)
        y[12] = -100
        if member == "combo":
            kw.update(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.375, label_smoothing=0.0625, focal_gamma=1.5)
    g = torch.rand(n, device=DEVICE) if reduction == "none" else None
    with tile_config(max_rows_per_program=4, **tiles):
        (loss, stats), grad = loss_and_grad(x, y, g, backend="triton", return_stats=True, **kw)
    assert poisoned.calls >= 2
    (ref_loss, ref_stats), ref_grad = reference64(x, y, grad_output=g, return_stats=True, **kw)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-6)
    for name in STATS:
        torch.testing.assert_close(
            getattr(stats, name).double().cpu(),
            getattr(ref_stats, name),
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )


# --- statistics and coefficients ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_stats(backend, reduction):
    """LossStats: per-row shape, no gradient; lse = logsumexp, p_max = max p (argmax = target for
    the counted rows the model gets right), entropy = -(p log p).sum,
    p_target = p_y and sample_weight = alpha + (1 - alpha) p_y for aEPG, both 0 when ignored."""
    x = logits(8, 10)
    y = index_targets(8, 10, ignore_index=-100)
    loss, stats = ak.aepg_loss(x, y, 0.3, reduction=reduction, backend=backend, return_stats=True)
    assert loss.requires_grad
    assert all(getattr(stats, s).shape == (8,) and not getattr(stats, s).requires_grad for s in STATS)
    z = x.detach()
    p = torch.softmax(z, -1)
    counted = y != -100
    p_y = torch.where(counted, p.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1), 0.0)
    torch.testing.assert_close(stats.lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(stats.p_max, p.amax(-1))
    assert torch.equal(stats.target_is_argmax(), counted & (z.argmax(-1) == y))
    torch.testing.assert_close(stats.entropy, -(p * p.log()).sum(-1))
    torch.testing.assert_close(stats.p_target, p_y)
    torch.testing.assert_close(stats.sample_weight, torch.where(counted, 0.3 + 0.7 * p_y, 0.0))
    assert (stats.p_target[~counted] == 0).all() and (stats.sample_weight[~counted] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tensor_alpha_equals_float_alpha(backend, reduction):
    """aepg_loss with alpha a 0-d tensor equals aepg_loss with alpha a float: loss, gradient, stats."""
    x = logits(8, 10, dtype=torch.float32, requires_grad=False)
    y = index_targets(8, 10, ignore_index=-100)
    g = torch.rand(8, device=DEVICE) if reduction == "none" else torch.tensor(1.0, device=DEVICE)

    def run(alpha):
        leaf = x.clone().requires_grad_(True)
        loss, stats = ak.aepg_loss(leaf, y, alpha, backend=backend, reduction=reduction, return_stats=True)
        return loss, stats, torch.autograd.grad(loss, leaf, g)[0]

    loss, stats, grad = run(0.3)
    t_loss, t_stats, t_grad = run(torch.tensor(0.3, device=DEVICE))
    torch.testing.assert_close(t_loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t_grad, grad, rtol=1e-6, atol=1e-7)
    for name in STATS:
        torch.testing.assert_close(getattr(t_stats, name), getattr(stats, name), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.sample_weight[y != -100], 0.3 + 0.7 * stats.p_target[y != -100])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("schedule", ["SigmoidAnneal", "LinearAnneal", "CosineAnneal"])
def test_schedule_float_and_tensor_agree(backend, schedule):
    """AEPGLoss with a host schedule (float alpha) and a device schedule (0-d tensor alpha) gives
    the same loss and gradient after the same steps, and the loss moves as alpha anneals."""
    x = logits(8, 10, dtype=torch.float32, requires_grad=False)
    y = index_targets(8, 10)
    host, dev = getattr(ak, schedule)(10), getattr(ak, schedule)(10, device=DEVICE)
    values = []
    for _ in range(3):
        losses = []
        for s in (host, dev):
            leaf = x.clone().requires_grad_(True)
            loss = ak.AEPGLoss(s, backend=backend)(leaf, y)
            losses.append((loss, *torch.autograd.grad(loss, leaf)))
            s.step(), s.step(), s.step()
        assert isinstance(host.alpha, float) and isinstance(dev.alpha, torch.Tensor)
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-6, atol=1e-7)
        values.append(losses[0][0].item())
    assert values[0] > values[1] > values[2]  # CE (alpha ~ 1) > ... > EPG-ish (1 - p_y <= -log p_y)
