"""The CPU gradient blocks (csrc/cpu/gradient_blocks.h): a large gradient's memory is kept after
it is freed and handed out again for one of the same size, without ever raising the peak.

The blocks are process-wide, so every test starts from `ak.empty_cache()` and reads the usage as
differences from there."""

import threading

import pytest
import torch

import aepg_kernels as ak
from aepg_kernels._contract import Flag, LossSpec
from aepg_kernels.backends import native as _native
from tests.helpers import reference64

pytestmark = pytest.mark.skipif(not _native.has_cpu_kernels(), reason=_native.native_error())

MIN_BYTES = 8 << 20  # gradient_blocks::kMinBlockBytes
ROWS = 64


def usage():
    return _native._C.gradient_block_usage()


def itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def cols_for(nbytes, dtype=torch.float32):
    return nbytes // (ROWS * itemsize(dtype))


def fused_grad(x, y, weight=None, **spec):
    """The forward's gradient tensor (a "mean" loss)."""
    call = LossSpec(**spec).pack()
    weight = None if weight is None else weight.to(torch.float32)
    _, _, grad, _ = torch.ops.aepg.native_forward(x, y, weight, *call[:-1], call[-1] | Flag.WRITE_GRAD)
    return grad


def reference_grad(x, y, **spec):
    """The float64 eager composite's gradient (tests/helpers.py reference64)."""
    return reference64(x, y, **spec)[1]


@pytest.fixture(autouse=True)
def no_kept_blocks():
    ak.empty_cache()
    yield
    ak.empty_cache()


# (rows, columns) of at least MIN_BYTES: long rows, one at a time, and rows of at most 256
# classes, 16 a block; neither a whole number of vectors or blocks
SHAPES = {
    "long rows": lambda dtype: (ROWS, cols_for(MIN_BYTES, dtype) + 13),
    "short rows": lambda dtype: (MIN_BYTES // (200 * itemsize(dtype)) + 17, 200),
}
SPECS = {
    "aEPG + entropy": dict(ce_weight=0.3, epg_weight=0.7, entropy_weight=0.05),
    "generic loops": dict(label_smoothing=0.1, focal_gamma=1.5, weighted=True),
}


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_freed_gradient_is_handed_out_again_with_the_right_values(dtype, shape, spec_name):
    """The second call gets the first one's memory, which still holds its values; the streaming
    stores of a recycled fp32 block must overwrite every element (fresh pages are all zeros, so
    only this test would see a missed one). Row lengths that are not whole vectors, an ignored
    row, the fast and the generic element loops."""
    rows, c = SHAPES[shape](dtype)
    spec = dict(SPECS[spec_name])
    if spec.pop("weighted", False):
        spec["weight"] = torch.rand(c) + 0.5
    y = torch.randint(0, c, (rows,))
    y[5] = -100
    first = fused_grad((10 * torch.randn(rows, c)).to(dtype), y, **spec)
    first.fill_(float("nan"))  # what a missed element would show
    pointer = first.data_ptr()
    del first
    assert usage()["kept_bytes"] >= MIN_BYTES

    x = torch.randn(rows, c).to(dtype)
    again = fused_grad(x, y, **spec)
    assert again.data_ptr() == pointer
    assert usage()["kept_bytes"] == 0
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(again.double(), reference_grad(x, y, **spec), **tol)


def test_a_training_loop_reuses_the_gradient_of_its_logits():
    """Through the public op: the gradient autograd hands to a leaf is the block, and setting
    .grad to None gives it back for the next step."""
    c = cols_for(MIN_BYTES)
    x = torch.randn(ROWS, c, requires_grad=True)
    pointers = []
    for step in range(3):
        y = torch.randint(0, c, (ROWS,))
        ak.policy_loss(x, y, backend="cpu").backward()
        pointers.append(x.grad.data_ptr())
        expected = reference_grad(x.detach(), y)
        torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-8)
        x.grad = None
    assert pointers[1] == pointers[0] and pointers[2] == pointers[0]


def test_the_recomputed_backward_uses_the_blocks_too():
    c = cols_for(MIN_BYTES)
    x = torch.randn(ROWS, c, requires_grad=True)
    y = torch.randint(0, c, (ROWS,))
    upstream = torch.rand(ROWS)
    (ak.policy_loss(x, y, reduction="none", backend="cpu") * upstream).sum().backward()
    pointer = x.grad.data_ptr()
    expected = reference_grad(x, y, reduction="none", grad_output=upstream)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-8)
    x.grad = None
    (ak.policy_loss(x, y, reduction="none", backend="cpu") * upstream).sum().backward()
    assert x.grad.data_ptr() == pointer


def test_small_gradients_do_not_use_the_blocks():
    before = usage()
    c = cols_for(MIN_BYTES) - 1
    grad = fused_grad(torch.randn(ROWS, c), torch.randint(0, c, (ROWS,)))
    assert usage() == before
    del grad
    assert usage() == before


def test_kept_blocks_never_raise_the_peak():
    """A gradient of another size first releases kept blocks so that kept + live bytes stay at
    most the most that was ever live at once."""
    base = usage()["live_bytes"]
    big, small = cols_for(3 * MIN_BYTES), cols_for(2 * MIN_BYTES)
    y_big, y_small = torch.randint(0, small, (ROWS,)), torch.randint(0, small, (ROWS,))

    def check():
        u = usage()
        assert u["kept_bytes"] + u["live_bytes"] <= u["peak_bytes"], u
        return u

    grad = fused_grad(torch.randn(ROWS, big), y_big)
    peak = check()["peak_bytes"]
    del grad
    assert check()["kept_bytes"] == ROWS * big * 4
    grad = fused_grad(torch.randn(ROWS, small), y_small)  # kept + new would pass the peak
    u = check()
    assert u["kept_bytes"] == 0 and u["live_bytes"] == base + ROWS * small * 4 and u["peak_bytes"] == peak
    held = [grad, fused_grad(torch.randn(ROWS, small), y_small)]  # two at once: a new peak
    assert check()["peak_bytes"] == base + 2 * ROWS * small * 4
    del grad, held
    assert check()["kept_bytes"] == 2 * ROWS * small * 4
    two = [fused_grad(torch.randn(ROWS, small), y_small) for _ in range(2)]  # both from the blocks
    assert check()["kept_bytes"] == 0
    del two
    assert ak.empty_cache() == 2 * ROWS * small * 4
    u = check()
    assert u["kept_bytes"] == 0 and u["peak_bytes"] == u["live_bytes"] == base


def test_a_block_gradient_can_be_resized():
    c = cols_for(MIN_BYTES)
    grad = fused_grad(torch.randn(ROWS, c), torch.randint(0, c, (ROWS,)))
    head = grad[:2].clone()
    grad.resize_(2 * ROWS, c)
    torch.testing.assert_close(grad[:2], head, rtol=0, atol=0)
    u = usage()  # the old block, freed by the resize, is kept: still within the peak of both
    assert u["kept_bytes"] == ROWS * c * 4 and u["kept_bytes"] + u["live_bytes"] <= u["peak_bytes"]


def test_out_of_memory_gives_kept_blocks_back_and_keeps_the_books():
    """A block the OS refuses: the kept blocks are freed and it is tried once more, then the
    error comes through with the counts as they were."""
    c = cols_for(MIN_BYTES)
    y = torch.randint(0, c, (ROWS,))
    grad = fused_grad(torch.randn(ROWS, 2 * c), y)
    kept = fused_grad(torch.randn(ROWS, c), y)
    del kept
    before = usage()
    assert before["kept_bytes"] == ROWS * c * 4
    with pytest.raises(RuntimeError, match="memory"):
        grad.resize_(1 << 30, 1 << 30)  # 4 EiB: more than any address space
    after = usage()
    assert after["kept_bytes"] == 0 and after["live_bytes"] == before["live_bytes"]
    assert after["peak_bytes"] == after["live_bytes"]  # the refused block is not counted in it


def test_blocks_freed_on_other_threads_keep_the_books():
    """Autograd frees gradients on its own threads; the counts must come out exact."""
    base = usage()["live_bytes"]
    c = cols_for(MIN_BYTES)
    y = torch.randint(0, c, (ROWS,))
    errors = []

    def work():
        try:
            for _ in range(4):
                grad = fused_grad(torch.randn(ROWS, c), y)
                assert torch.isfinite(grad).all()
                del grad
        except (AssertionError, RuntimeError) as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    u = usage()
    assert u["live_bytes"] == base and u["kept_bytes"] + u["live_bytes"] <= u["peak_bytes"]
    assert u["kept_bytes"] % (ROWS * c * 4) == 0 and u["kept_bytes"] <= 4 * ROWS * c * 4


def test_empty_cache_without_kept_blocks_frees_nothing():
    assert ak.empty_cache() == 0
