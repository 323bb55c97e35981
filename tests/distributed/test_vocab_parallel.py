"""Vocab-parallel policy_loss over gloo (spawned CPU processes): on every rank the loss and stats
equal the single-process op on the whole logits, and the gradient equals that op's gradient on
this rank's shard; bad shard sizes and targets raise on every rank (no rank left waiting)."""

import datetime
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import aepg_kernels as ak

# float64: the merged sums differ from the single-process reductions by summation order only
TOL = dict(rtol=1e-12, atol=1e-14, equal_nan=True)  # all rows ignored: "mean" is 0/0, as PyTorch
TOL32 = dict(rtol=2e-6, atol=1e-7)  # fp32: a few ulps of the row sums

LOSSES = {
    "ce": dict(),
    "epg": dict(ce_weight=0.0, epg_weight=1.0),
    "aepg-tensor": dict(
        ce_weight=torch.tensor(0.3, dtype=torch.float64), epg_weight=torch.tensor(0.7, dtype=torch.float64)
    ),
    "entropy": dict(ce_weight=0.5, epg_weight=0.5, entropy_weight=0.2),
    "smoothing": dict(label_smoothing=0.1, entropy_weight=-0.1),
    "focal": dict(focal_gamma=2.0, epg_weight=0.5),
    "dft": dict(ce_weight=0.0, epg_weight=1.0, loss_value="dft"),
}


def _shards(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _case_inputs(n, c, sizes, seed, dtype, prob):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    if prob:
        target = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1).to(dtype)
    else:
        target = torch.randint(0, c, (n,), generator=g)
        boundaries = [sum(sizes[:r]) for r in range(1, len(sizes))]
        for i, b in enumerate(boundaries):  # a target on each side of every shard boundary
            target[2 * i % n], target[(2 * i + 1) % n] = b - 1, b
        target[-1] = -100
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return logits, target, weight


def _compare(rank, sizes, logits, target, weight, kwargs, tol, failures, label):
    shard = _shards(sizes, rank)
    full = logits.clone().requires_grad_()
    want, want_stats = ak.policy_loss(full, target, weight=weight, backend="eager", return_stats=True, **kwargs)
    local = logits[:, shard].clone().requires_grad_()
    local_target = target[:, shard] if target.is_floating_point() else target
    got, got_stats = ak.policy_loss(
        local,
        local_target,
        weight=None if weight is None else weight[shard],
        process_group=dist.group.WORLD,
        return_stats=True,
        **kwargs,
    )
    grad_out = torch.rand_like(want) if want.dim() else torch.ones_like(want)
    (want * grad_out).sum().backward()
    (got * grad_out).sum().backward()
    try:
        torch.testing.assert_close(got, want, **tol)
        for name in ak.LossStats._fields:
            torch.testing.assert_close(getattr(got_stats, name), getattr(want_stats, name), **tol, msg=name)
        torch.testing.assert_close(local.grad, full.grad[:, shard], **tol)
    except AssertionError as error:
        failures.append(f"rank {rank} {label}: {error}")


def _expect_error(kind, match, call, failures, label):
    try:
        call()
    except kind as error:
        if match not in str(error):
            failures.append(f"{label}: wrong message {error}")
        return
    failures.append(f"{label}: no {kind.__name__}")


def _linear_cases(rank, sizes, failures):
    """linear_policy_loss with this rank's rows of the head: loss and stats equal the whole op's,
    the head's gradient is this rank's rows of the whole op's, the input's the whole op's."""
    shard, v = _shards(sizes, rank), sum(sizes)
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    w0, b0 = torch.randn(v, 8, generator=g, dtype=torch.float64), torch.randn(v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (3, 4), generator=g)
    target[0, 0] = -100
    for label, kwargs in (
        ("linear aEPG softcap", dict(ce_weight=0.4, epg_weight=0.6, softcap=3.0, logit_scale=0.5)),
        (
            "linear DFT token_weight",
            dict(
                ce_weight=0.0,
                epg_weight=1.0,
                loss_value="dft",
                token_weight=torch.rand(3, 4, generator=g, dtype=torch.float64),
            ),
        ),
    ):
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        want, want_stats = ak.linear_policy_loss(
            leaves[0], leaves[1], target, linear_bias=leaves[2], backend="eager", return_stats=True, **kwargs
        )
        mine = [t.clone().requires_grad_() for t in (x0, w0[shard], b0[shard])]
        got, got_stats = ak.linear_policy_loss(
            mine[0], mine[1], target, linear_bias=mine[2], process_group=dist.group.WORLD, return_stats=True, **kwargs
        )
        want.backward()
        got.backward()
        try:
            torch.testing.assert_close(got, want, **TOL)
            torch.testing.assert_close(got_stats.p_target, want_stats.p_target, **TOL)
            torch.testing.assert_close(mine[0].grad, leaves[0].grad, **TOL)
            torch.testing.assert_close(mine[1].grad, leaves[1].grad[shard], **TOL)
            torch.testing.assert_close(mine[2].grad, leaves[2].grad[shard], **TOL)
        except AssertionError as error:
            failures.append(f"rank {rank} {label}: {error}")


def _dtensor_case(rank, world_size, c, failures):
    """A DTensor sharded on the classes (torchtitan's loss_parallel) takes the same path."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    logits, target, _ = _case_inputs(6, c, [c], 13, torch.float64, prob=False)
    full = logits.clone().requires_grad_()
    want = ak.aepg_loss(full, target, 0.25, entropy_weight=0.1, backend="eager")
    want.backward()
    sharded = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    got = ak.aepg_loss(sharded, target, 0.25, entropy_weight=0.1)
    got.backward()
    try:
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(sharded.grad.full_tensor(), full.grad, **TOL)
    except AssertionError as error:
        failures.append(f"rank {rank} DTensor: {error}")


def _worker(rank, world_size, init_file, sizes):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    failures = []
    try:
        c = sum(sizes)
        cases = itertools.product(LOSSES.items(), ["none", "mean", "sum"], [False, True], [False, True])
        for seed, ((name, kwargs), reduction, weighted, prob) in enumerate(cases):
            if prob and name in ("focal", "dft"):
                continue
            logits, target, weight = _case_inputs(9, c, sizes, seed, dtype=torch.float64, prob=prob)
            _compare(
                rank,
                sizes,
                logits,
                target,
                weight if weighted else None,
                dict(kwargs, reduction=reduction),
                TOL,
                failures,
                f"{name} {reduction} weighted={weighted} prob={prob}",
            )
        logits, target, weight = _case_inputs(9, c, sizes, 7, torch.float32, prob=False)
        aepg32 = dict(ce_weight=0.3, epg_weight=0.7, entropy_weight=0.1, label_smoothing=0.05)
        _compare(rank, sizes, logits, target, weight, aepg32, TOL32, failures, "fp32 aEPG")
        token_weight = torch.rand(9, dtype=torch.float64)
        logits, target, _ = _case_inputs(9, c, sizes, 8, torch.float64, prob=False)
        _compare(
            rank,
            sizes,
            logits,
            target,
            None,
            dict(token_weight=token_weight, ce_weight=0.0, epg_weight=1.0, loss_value="dft"),
            TOL,
            failures,
            "dft token_weight",
        )
        _compare(rank, sizes, logits, torch.full_like(target, -100), None, {}, TOL, failures, "all rows ignored")
        _compare(
            rank,
            sizes,
            logits,
            torch.full_like(target, sizes[0]),
            None,
            dict(epg_weight=1.0),
            TOL,
            failures,
            "every target on rank 1's shard",
        )
        # shard sizes passed: the same result with one collective less; wrong ones raise on every rank
        shard = _shards(sizes, rank)
        got = ak.policy_loss(logits[:, shard], target, process_group=dist.group.WORLD, shard_sizes=list(sizes))
        torch.testing.assert_close(got, ak.policy_loss(logits, target, backend="eager"), **TOL)
        wrong = list(sizes)
        wrong[0], wrong[-1] = wrong[0] + 1, wrong[-1] - 1
        _expect_error(
            ValueError,
            "do not match",
            lambda: ak.policy_loss(logits[:, shard], target, process_group=dist.group.WORLD, shard_sizes=wrong),
            failures,
            "wrong sizes",
        )
        _expect_error(
            IndexError,
            f"out of bounds for C={c}",
            lambda: ak.policy_loss(logits[:, shard], torch.full_like(target, c), process_group=dist.group.WORLD),
            failures,
            "target >= C",
        )
        _linear_cases(rank, sizes, failures)
        _dtensor_case(rank, len(sizes), c, failures)
        dist.barrier()  # every rank got here: nothing left waiting
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError("\n".join(failures[:10]))


@pytest.mark.parametrize(
    "sizes", [(6, 6), (5, 6), (1, 500, 502)], ids=["2-ranks-even", "2-ranks-uneven", "3-ranks-one-class-shard"]
)
def test_vocab_parallel_policy_loss_equals_the_whole_op(tmp_path, sizes):
    mp.spawn(_worker, args=(len(sizes), str(tmp_path / "store"), sizes), nprocs=len(sizes), join=True)


def test_process_group_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ak.policy_loss(torch.randn(2, 3), torch.tensor([0, 1]), process_group=object())
