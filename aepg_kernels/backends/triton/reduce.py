"""The two reductions over rows around the forward kernel, each one program (deterministic, no
atomics): the "mean" denominator before it (the fused gradient is scaled by it) and the reduced
loss after it. They replace the handful of small torch ops (and launches) these would cost."""

import triton
import triton.language as tl


@triton.jit
def denominator_kernel(
    y_ptr,
    w_ptr,
    denom_out_ptr,
    n_rows,
    n_cols,
    ignore_index,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """As nn.CrossEntropyLoss: the summed class weights of the counted rows (index targets; an
    out-of-range index counts 1, its loss is NaN), or the number of rows (probability targets)."""
    if PROB_TARGET:
        tl.store(denom_out_ptr, n_rows.to(ACC))
    else:
        total = tl.zeros([BLOCK], ACC)
        for start in range(0, n_rows, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            y = tl.load(y_ptr + rows, mask=rows < n_rows, other=ignore_index).to(tl.int64)
            counted = y != ignore_index
            w = tl.full([BLOCK], 1.0, ACC)
            if HAS_WEIGHT:
                in_range = (y >= 0) & (y < n_cols)
                w = tl.load(w_ptr + tl.where(in_range, y, 0), mask=counted & in_range, other=1.0).to(ACC)
            total += tl.where(counted, w, 0.0)
        tl.store(denom_out_ptr, tl.sum(total, 0))


@triton.jit
def reduce_rows_kernel(
    row_loss_ptr, denom_ptr, out_ptr, n_rows, MEAN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    """out = sum of the per-row losses, divided by the denominator for "mean", in out's dtype."""
    total = tl.zeros([BLOCK], ACC)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        total += tl.load(row_loss_ptr + rows, mask=rows < n_rows, other=0.0).to(ACC)
    result = tl.sum(total, 0)
    if MEAN:
        result = result / tl.load(denom_ptr).to(ACC)
    tl.store(out_ptr, result.to(out_ptr.dtype.element_ty))
