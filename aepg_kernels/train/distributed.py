"""Multi-process data parallel through torch.distributed, launched by `torchrun`.

A single process (no torchrun variables) is world size 1 and every helper is a no-op, so the
trainer has one code path. Backends: nccl on CUDA, gloo on the CPU.

    rank, world_size, device = init_from_env(cfg.run.device)
"""

from __future__ import annotations

import os
from typing import Iterable, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

import aepg_kernels

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": this process's GPU when there is one, else the CPU; "cuda" means cuda:<local rank>."""
    return aepg_kernels.utils.resolve_device(device, local_rank)


def init_from_env(device: str = "auto") -> Tuple[int, int, torch.device]:
    """Joins the process group described by torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); without them, a single process. Returns (rank, world_size, device)."""
    present = [v for v in TORCHRUN_VARIABLES if v in os.environ]
    if not present:
        return 0, 1, resolve_device(device)
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"incomplete torch.distributed environment: {present} set but {missing} missing "
            f"(launch with torchrun, or unset them for a single process)"
        )
    resolved = resolve_device(device, int(os.environ["LOCAL_RANK"]))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not is_distributed():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", init_method="env://")
    return rank(), world_size(), resolved


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (the tensor itself when alone)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(value) -> List:
    """Every rank's `value`, in rank order."""
    if not is_distributed():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_module(module: nn.Module, source: int = 0) -> None:
    """Every parameter and buffer of `module` from rank `source`: identical replicas whatever each
    rank's initialisation drew."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=source)


def all_reduce_gradients(params: Iterable[nn.Parameter], weight: float = 1.0) -> None:
    """grad <- sum over ranks of weight * grad, in one all_reduce of a flat buffer.

    Not torch DDP: its buckets are fixed at wrap time, and here the heads grow per task and the
    PEFT modules toggle requires_grad (frozen for the first epochs of a task). The caller passes the
    parameters trained at this step (the same list on every rank) and its share of the global batch
    as `weight` (rows here / global rows), so the sum is the gradient of the global batch's mean loss
    even when the last batch splits unevenly. A missing gradient (a rank with no rows) counts as 0;
    a parameter that no rank has a gradient for keeps grad None, as in one process (Adam skips it:
    a zero gradient would still move it through its momentum)."""
    params = list(params)
    if not is_distributed() or not params:
        return  # alone, the local batch is the global batch (weight 1)
    has_grad = [p.grad is not None for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(weight)
    # The count of ranks with a gradient rides in the same all_reduce, after the gradients.
    # non_blocking: a pageable host-to-device copy that does not wait for the device.
    counts = torch.tensor(has_grad, dtype=flat.dtype).to(flat.device, non_blocking=True)
    flat = torch.cat([flat, counts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    sizes = [g.numel() for g in grads]
    chunks, counts = flat[: -len(params)].split(sizes), flat[-len(params) :]
    # Only a rank that lacks a gradient reads the counts (a device sync); a parameter it has a
    # gradient for has one on some rank by definition.
    nobody = set()
    if not all(has_grad):
        nobody = {i for i, count in enumerate(counts.tolist()) if count == 0}
    for i, (p, chunk) in enumerate(zip(params, chunks, strict=True)):
        if i in nobody:
            p.grad = None
        else:
            p.grad = chunk.view_as(p).clone() if p.grad is None else p.grad.copy_(chunk.view_as(p))
