"""`aepg-bench --suite vocab-parallel`: the vocab-parallel op (``process_group=``, docs/design.md section 9) on
WORLD_SIZE ranks of one CPU (gloo, torch.multiprocessing.spawn, file:// rendezvous in a temporary
directory) against the unsharded op in one process, time and bytes communicated per call.

Rows, per case (fwd+bwd, fp32, loss.backward of the mean):
- sharded: ``ak.policy_loss(logits[:, shard], target, process_group=dist.group.WORLD,
  shard_sizes=sizes, ...)`` (``ak.linear_policy_loss(x, w[shard], target, ...)`` for the linear
  op), each rank 1 thread, each holding an even contiguous shard of the classes;
- sharded-gather-sizes: the same without ``shard_sizes`` (the op gathers them: one more collective);
- unsharded-auto: the same call without process_group on the whole tensor, backend "auto" (the
  native CPU kernel), in rank 0's process with UNSHARDED_THREADS threads while rank 1 waits in a
  barrier (its CPU time meanwhile is recorded: ``idle_rank_cpu_s_per_call``);
- unsharded-eager: the same with backend "eager": the composite the sharded op is built from.

Rank 0 runs the unsharded rows inside the same interleaved rounds (llm.interleaved: the order
rotates each round, gc off), so every row sees the same machine state. Each timed call ends in a
barrier, so a sharded call's time is the slower rank's; the barrier itself (``barrier_s``) is in
every row's time. Reported: the median over the rounds (per round the max over the ranks).

Bytes communicated per call: counted, not estimated, by wrapping torch.distributed's collectives
during one call: per rank, the nbytes of the tensor it contributes times (world_size - 1) (what it
must deliver to the other ranks: for an all-gather exact, for an all-reduce the direct exchange;
ring all-reduce sends 2 (R - 1) / R of it). Per row of the batch this is independent of C: the
collectives carry O(N) floats (the linear op's backward adds the all-reduce of dX, O(N H)).

Gate (before timing): every rank's loss and its gradient shard against the unsharded eager op on
the whole tensor, max |got - ref| / max |ref| <= GATE_TOLERANCE: both are fp32 and compute the same
row sums in another order (per-shard sums rescaled by exp(m_r - M) and added in rank order), a few
ulps of the row sums (~1e-7 relative), while a wrong term or a missing shard errs by 1e-2 or more.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from aepg_kernels import utils

from . import llm, output
from .correctness import relative_error

WORLD_SIZE = 2
UNSHARDED_THREADS = 2  # the same two cores the sharded op uses, as one process
LOGITS_SHAPES = ((4096, 1000), (4096, 32000))  # N x C
LINEAR_SHAPES = ((2048, 256, 32000),)  # N x H x V
LOSSES = ("ce", "aepg")
LOSS_OPTIONS = {
    "ce": {},
    "aepg": {"ce_weight": llm.ALPHA, "epg_weight": 1 - llm.ALPHA, "entropy_weight": llm.ENTROPY_WEIGHT},
}
LOSS_TITLES = {"ce": "CE", "aepg": f"aEPG+entropy (alpha {llm.ALPHA:g}, entropy {llm.ENTROPY_WEIGHT:g})"}
REPEATS = 7
WARMUP = 2
GATE_TOLERANCE = 1e-5
TIMEOUT_S = 120
SHARDED, GATHER_SIZES, AUTO, EAGER = "sharded", "sharded-gather-sizes", "unsharded-auto", "unsharded-eager"
ROWS = {
    SHARDED: f"{WORLD_SIZE} ranks x 1 thread, shard_sizes passed",
    GATHER_SIZES: f"{WORLD_SIZE} ranks x 1 thread, shard_sizes=None (gathered by the op)",
    AUTO: f"1 process x {UNSHARDED_THREADS} threads, whole tensor, backend 'auto' (native CPU kernel)",
    EAGER: f"1 process x {UNSHARDED_THREADS} threads, whole tensor, backend 'eager' (the composite)",
}
COUNTED = ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


@dataclasses.dataclass(frozen=True)
class VPCase:
    op: str  # "logits" (policy_loss) or "linear" (linear_policy_loss)
    loss: str  # ce | aepg
    n: int
    c: int  # classes (the vocabulary V of the linear op)
    h: int = 0  # hidden size (linear op)

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.h}x{self.c}" if self.op == "linear" else f"{self.n}x{self.c}"

    @property
    def label(self) -> str:
        name = "linear_policy_loss" if self.op == "linear" else "policy_loss"
        return f"{name} {LOSS_TITLES[self.loss]} fp32 {self.shape}"

    def shard_sizes(self, world_size: int = WORLD_SIZE) -> List[int]:
        return [self.c // world_size + (r < self.c % world_size) for r in range(world_size)]


def cases(
    logits_shapes: Sequence[Tuple[int, int]] = LOGITS_SHAPES,
    linear_shapes: Sequence[Tuple[int, int, int]] = LINEAR_SHAPES,
    losses: Sequence[str] = LOSSES,
) -> List[VPCase]:
    return [VPCase("logits", loss, n, c) for n, c in logits_shapes for loss in losses] + [
        VPCase("linear", loss, n, v, h) for n, h, v in linear_shapes for loss in losses
    ]


def parse_shapes(text: str) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int, int]]]:
    """'4096x1000,2048x256x32000' -> ([(4096, 1000)], [(2048, 256, 32000)]): NxC the logits op,
    NxHxV the linear op."""
    from .sweeps import parse_head_shapes, parse_shapes as parse_nc

    two, three = [], []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) == 3:
            three += parse_head_shapes(item)
        else:
            try:
                two += parse_nc(item)
            except ValueError:
                raise ValueError(
                    f"--shapes: expected NxC (policy_loss) or NxHxV (linear_policy_loss) with "
                    f"positive integers, got {item!r}"
                ) from None
    if any(c < WORLD_SIZE for _, c in two) or any(v < WORLD_SIZE for _, _, v in three):
        raise ValueError(f"--shapes: C (V) must be >= {WORLD_SIZE}: a class per rank at least")
    return two, three


# --- inside a rank --------------------------------------------------------------------------------


def make_inputs(case: VPCase, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The whole tensors, the same on every rank (one seed): logits ~ N(0, 3^2) (the linear op: x
    ~ N(0, 1), w ~ N(0, 3^2 / H), so are its logits), targets uniform in [0, C)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, case.c, (case.n,), generator=g)
    if case.op == "linear":
        x = torch.randn(case.n, case.h, generator=g)
        w = torch.randn(case.c, case.h, generator=g) * (llm.LOGIT_SCALE / case.h**0.5)
        return {"x": x, "w": w, "target": target}
    return {"logits": torch.randn(case.n, case.c, generator=g) * llm.LOGIT_SCALE, "target": target}


Call = Callable[[], Tuple[torch.Tensor, List[torch.Tensor]]]  # () -> (loss, gradients)


def make_call(
    case: VPCase,
    inputs: Dict[str, torch.Tensor],
    shard: Optional[slice],
    sizes: Optional[List[int]],
    backend: str = "auto",
) -> Call:
    """One fwd+bwd call: the sharded op when `shard` is given (this rank's classes), else the
    unsharded op on the whole tensor with `backend`. Gradients returned, never accumulated."""
    import aepg_kernels as ak

    options = dict(LOSS_OPTIONS[case.loss])
    if shard is not None:
        options.update(process_group=dist.group.WORLD, shard_sizes=sizes)
    else:
        options["backend"] = backend
    target = inputs["target"]
    if case.op == "linear":
        w = inputs["w"] if shard is None else inputs["w"][shard].contiguous()
        leaves = [inputs["x"].detach().requires_grad_(), w.detach().requires_grad_()]

        def call():
            loss = ak.linear_policy_loss(leaves[0], leaves[1], target, **options)
            return loss.detach(), list(torch.autograd.grad(loss, leaves))

        return call
    logits = inputs["logits"] if shard is None else inputs["logits"][:, shard].contiguous()
    leaf = logits.detach().requires_grad_()

    def call():
        loss = ak.policy_loss(leaf, target, **options)
        return loss.detach(), list(torch.autograd.grad(loss, leaf))

    return call


class CollectiveCounter:
    """Wraps torch.distributed's collectives while active: per call the op name and the bytes this
    rank sends, nbytes of its contribution x (world_size - 1)."""

    def __init__(self, world_size: int):
        self.world_size, self.calls, self._saved = world_size, [], {}

    def __enter__(self):
        for name in COUNTED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            # the tensor this rank contributes: all_gather(list, tensor), all_reduce(tensor),
            # all_gather_into_tensor(out, tensor), reduce_scatter_tensor(out, tensor), broadcast(tensor)
            index = 0 if name in ("all_reduce", "broadcast") else 1
            tensor = args[index] if len(args) > index else kwargs.get("tensor", kwargs.get("input"))
            self.calls.append(
                {
                    "op": name,
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).replace("torch.", ""),
                    "bytes": tensor.numel() * tensor.element_size() * (self.world_size - 1),
                }
            )
            return original(*args, **kwargs)

        return counted

    def summary(self, rows: int) -> dict:
        sent = sum(call["bytes"] for call in self.calls)
        return {
            "collectives": len(self.calls),
            "bytes_per_rank": sent,
            "bytes_per_row": sent / max(rows, 1),
            "calls": self.calls,
        }


def count_bytes(call: Call, world_size: int, rows: int) -> dict:
    with CollectiveCounter(world_size) as counter:
        call()
    return counter.summary(rows)


def gate(case: VPCase, inputs: Dict[str, torch.Tensor], sharded: Call, shard: slice) -> dict:
    """This rank's loss and gradients against the unsharded eager op on the whole tensor."""
    want_loss, want_grads = make_call(case, inputs, None, None, backend="eager")()
    got_loss, got_grads = sharded()
    if case.op == "linear":  # dX summed over the ranks in backward: the whole op's; dW this shard's rows
        refs = {"loss": want_loss, "dx": want_grads[0], "dw": want_grads[1][shard]}
        gots = {"loss": got_loss, "dx": got_grads[0], "dw": got_grads[1]}
    else:
        refs = {"loss": want_loss, "dlogits": want_grads[0][:, shard]}
        gots = {"loss": got_loss, "dlogits": got_grads[0]}
    errors = {key: relative_error(gots[key], refs[key]) for key in refs}
    return {"errors": errors, "max_error": max(errors.values())}


def timed_steps(
    case: VPCase, inputs, shard: slice, sizes: List[int], rank: int, idle: List[float]
) -> Dict[str, Callable[[], object]]:
    """The interleaved rounds' steps, each ending in a barrier; the unsharded rows on rank 0 only
    (UNSHARDED_THREADS threads), rank 1 waiting in the barrier meanwhile (its CPU time in `idle`)."""

    def sharded(call):
        def step():
            call()
            dist.barrier()

        return step

    def unsharded(backend):
        call = make_call(case, inputs, None, None, backend) if rank == 0 else None

        def step():
            if rank == 0:
                torch.set_num_threads(UNSHARDED_THREADS)
                try:
                    call()
                finally:
                    torch.set_num_threads(1)
            else:
                start = time.process_time()
            dist.barrier()
            if rank != 0:
                idle.append(time.process_time() - start)

        return step

    return {
        SHARDED: sharded(make_call(case, inputs, shard, sizes)),
        GATHER_SIZES: sharded(make_call(case, inputs, shard, None)),
        AUTO: unsharded("auto"),
        EAGER: unsharded("eager"),
    }


def barrier_seconds(rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(case: VPCase, rank: int, world_size: int, repeats: int) -> dict:
    """The record of one case (complete on rank 0)."""
    sizes = case.shard_sizes(world_size)
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])
    inputs = make_inputs(case)
    record = {
        **dataclasses.asdict(case),
        "shape": case.shape,
        "label": case.label,
        "world_size": world_size,
        "shard_sizes": sizes,
        "rows": {},
    }
    sharded = make_call(case, inputs, shard, sizes)
    mine = gate(case, inputs, sharded, shard)
    communicated = {
        "sizes_passed": count_bytes(sharded, world_size, case.n),
        "sizes_gathered": count_bytes(make_call(case, inputs, shard, None), world_size, case.n),
    }
    idle: List[float] = []
    steps = timed_steps(case, inputs, shard, sizes, rank, idle)
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    idle.clear()
    barrier_s = barrier_seconds()
    times = llm.interleaved(steps, repeats)
    every = [None] * world_size
    dist.all_gather_object(every, {"gate": mine, "bytes": communicated, "times": times, "idle": idle})
    if rank != 0:
        return record
    errors = {key: max(r["gate"]["errors"][key] for r in every) for key in mine["errors"]}
    record["gate"] = {
        "reference": "unsharded eager op on the whole tensor (fp32), every rank's loss and gradient shard",
        "errors": errors,
        "max_error": max(errors.values()),
        "tolerance": GATE_TOLERANCE,
        "passed": max(errors.values()) <= GATE_TOLERANCE,
    }
    record["bytes"] = every[0]["bytes"]
    record["bytes_equal_on_ranks"] = all(r["bytes"] == every[0]["bytes"] for r in every)
    record["barrier_s"] = barrier_s
    record["idle_rank_cpu_s_per_call"] = (
        statistics.mean(every[1]["idle"]) if world_size > 1 and every[1]["idle"] else None
    )
    for name in steps:
        if name in (SHARDED, GATHER_SIZES):  # the slower rank's time, per round
            seconds = [max(r["times"][name][i] for r in every) for i in range(repeats)]
        else:
            seconds = every[0]["times"][name]
        record["rows"][name] = {
            "status": "ok",
            "seconds": seconds,
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
        }
    if not record["gate"]["passed"]:
        for name in (SHARDED, GATHER_SIZES):
            record["rows"][name].update(status="failed check", reason=f"gate error {record['gate']['max_error']:.2e}")
    for name, row in record["rows"].items():
        row["vs_auto"] = row["median_s"] / record["rows"][AUTO]["median_s"]
        row["vs_eager"] = row["median_s"] / record["rows"][EAGER]["median_s"]
    return record


def worker(rank: int, world_size: int, init_file: str, case_list: Sequence[VPCase], repeats: int, results: str) -> None:
    """One rank: every case in order; rank 0 rewrites `results` (JSON list) after each case."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        records = []
        for case in case_list:
            record = run_case(case, rank, world_size, repeats)
            if rank == 0:
                records.append(record)
                print(progress_line(record), flush=True)
                utils.write_json(results, records, "records")  # atomic: the parent may read it meanwhile
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(
    case_list: Sequence[VPCase], repeats: int = REPEATS, world_size: int = WORLD_SIZE, done: Optional[List[dict]] = None
) -> List[dict]:
    """Spawns the ranks (file:// rendezvous in a temporary directory) and returns rank 0's records;
    `done` receives them too, also those finished before a rank raised or the run was interrupted."""
    import torch.multiprocessing as mp

    done = [] if done is None else done
    with tempfile.TemporaryDirectory(prefix="aepg-vocab-parallel-") as tmp:
        results = Path(tmp) / "records.json"
        try:
            mp.spawn(
                worker,
                args=(world_size, str(Path(tmp) / "rendezvous"), list(case_list), repeats, str(results)),
                nprocs=world_size,
                join=True,
            )
        finally:
            done[:] = json.loads(results.read_text()) if results.exists() else []
    return done


# --- tables, settings, the command ----------------------------------------------------------------


def _ms(row: dict) -> str:
    return f"{row['median_s'] * 1e3:.1f}" if row.get("median_s") is not None else row.get("status", "-")


def markdown(records: Sequence[dict]) -> str:
    """Two tables: per case the median ms of each row and the sharded/unsharded ratios; then the
    bytes each rank sends per call (shard_sizes passed and gathered) and per row, and the gate."""
    times, traffic = [], []
    for r in records:
        rows = r["rows"]
        times.append(
            [
                r["op"],
                LOSS_TITLES[r["loss"]],
                r["shape"],
                *(_ms(rows[name]) for name in ROWS),
                f"{rows[SHARDED]['vs_auto']:.2f}",
                f"{rows[SHARDED]['vs_eager']:.2f}",
                f"{r['barrier_s'] * 1e3:.2f}",
            ]
        )
        passed, gathered = r["bytes"]["sizes_passed"], r["bytes"]["sizes_gathered"]
        errors = ", ".join(f"{key} {value:.1e}" for key, value in r["gate"]["errors"].items())
        traffic.append(
            [
                r["op"],
                LOSS_TITLES[r["loss"]],
                r["shape"],
                passed["collectives"],
                passed["bytes_per_rank"],
                f"{passed['bytes_per_row']:g}",
                gathered["collectives"],
                gathered["bytes_per_rank"],
                f"{gathered['bytes_per_row']:g}",
                errors + ("" if r["gate"]["passed"] else " FAILED"),
            ]
        )
    first = utils.markdown_table(
        ["op", "loss", "shape", *(f"{name} ms" for name in ROWS), "sharded / auto", "sharded / eager", "barrier ms"],
        times,
    )
    second = utils.markdown_table(
        [
            "op",
            "loss",
            "shape",
            "collectives (sizes passed)",
            "bytes/call/rank",
            "bytes/row",
            "collectives (sizes gathered)",
            "bytes/call/rank",
            "bytes/row",
            "gate (max relative error vs unsharded eager)",
        ],
        traffic,
    )
    return f"{first}\n\n{second}"


def progress_line(record: dict) -> str:
    rows = ", ".join(f"{name} {_ms(row)} ms" for name, row in record["rows"].items())
    sent = record["bytes"]["sizes_passed"]
    return (
        f"{record['label']}: {rows}; {sent['bytes_per_rank']} B/rank/call ({sent['collectives']} collective), "
        f"gate {record['gate']['max_error']:.1e}" + ("" if record["gate"]["passed"] else " FAILED")
    )


def settings(repeats: int) -> Dict[str, object]:
    return {
        "world_size": WORLD_SIZE,
        "backend": "gloo",
        "launch": f"torch.multiprocessing.spawn, init_method file:// in a temporary directory, timeout {TIMEOUT_S} s",
        "threads_per_rank": 1,
        "unsharded_threads": UNSHARDED_THREADS,
        "dtype": "fp32",
        "mode": "fwd+bwd (torch.autograd.grad of the mean)",
        "shards": "even contiguous shards of the classes (the first ranks one more when C % world_size)",
        "losses": {key: {"options": LOSS_OPTIONS[key], "title": LOSS_TITLES[key]} for key in LOSSES},
        "inputs": f"logits ~ N(0, {llm.LOGIT_SCALE:g}^2) (linear: x ~ N(0, 1), w ~ N(0, {llm.LOGIT_SCALE:g}^2 / H)), "
        "targets uniform in [0, C), seed 0, the same whole tensors on every rank",
        "rows": ROWS,
        "repeats": repeats,
        "warmup_calls": WARMUP,
        "timing": f"{WARMUP} warm-up calls per row, then {repeats} interleaved rounds (llm.interleaved: order "
        "rotating, gc off); every step ends in dist.barrier() (barrier_s: its median alone, in every "
        "row's time); sharded rows: per round the slower rank; unsharded rows: rank 0 with "
        f"{UNSHARDED_THREADS} threads while rank 1 waits in the barrier (idle_rank_cpu_s_per_call: "
        "its process CPU seconds meanwhile); the median reported",
        "bytes": "counted by wrapping torch.distributed's collectives during one call: per rank, nbytes of the "
        "tensor it contributes x (world_size - 1); all-gather: exact; all-reduce: the direct exchange "
        "(a ring sends 2 (R - 1) / R of it); bytes_per_row = bytes_per_rank / N",
        "gate": f"every rank's loss and gradient shard vs the unsharded eager op on the whole tensor, max |got - ref| "
        f"/ max |ref| <= {GATE_TOLERANCE:g}: fp32 both, the same row sums in another order (per-shard sums "
        "rescaled by exp(m_r - M), added in rank order), a few ulps apart; a wrong term errs by >= 1e-2",
    }


def run_cli(parser, args, argv: Sequence[str], device: torch.device) -> int:
    """--suite vocab-parallel: the cases in one spawn of WORLD_SIZE ranks; FILE.json and FILE.md
    at the end; 1 when the sharded op fails its gate or a rank raises."""
    from . import machine
    from .sweeps import check_names

    for name in ("implementations", "modes", "no_graphs", "no_profile", "threads"):
        if getattr(args, name):
            parser.error(
                f"--{name.replace('_', '-')}: --suite vocab-parallel has fixed rows ({', '.join(ROWS)}), "
                f"fwd+bwd, 1 thread per rank and {UNSHARDED_THREADS} unsharded"
            )
    if args.dtypes and args.dtypes != ["fp32"]:
        parser.error("--dtypes: --suite vocab-parallel runs fp32 only")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        losses = check_names("losses", args.losses, LOSSES) if args.losses else LOSSES
        shapes = parse_shapes(args.shapes) if args.shapes else (LOGITS_SHAPES, LINEAR_SHAPES)
    except ValueError as error:
        parser.error(str(error))
    case_list = cases(*shapes, losses)
    if args.list:
        print("\n".join(case.label for case in case_list))
        return 0
    if not dist.is_available() or not dist.is_gloo_available():
        parser.error("--suite vocab-parallel needs torch.distributed with gloo")
    repeats = args.repeats or REPEATS
    torch.set_num_threads(UNSHARDED_THREADS)
    info = machine.describe(torch.device("cpu"))
    print(
        f"aepg-bench --suite vocab-parallel: {len(case_list)} cases, {WORLD_SIZE} ranks (gloo) vs 1 process, on "
        f"{machine.cpu_model()}, {repeats} rounds (median reported)"
    )
    json_path = output.output_path(args.out, f"{output.device_tag(info)}-vocab-parallel")
    document = {
        "suite": "vocab-parallel",
        "argv": list(argv),
        "command": " ".join(["aepg-bench", *argv]),
        "complete": False,
        "machine": info,
        "settings": settings(repeats),
        "records": [],
    }
    start = time.monotonic()
    failed = False
    try:
        run(case_list, repeats, done=document["records"])
    except KeyboardInterrupt:
        document["interrupted"] = "KeyboardInterrupt: the cases after the last record did not run"
    except Exception as error:  # noqa: BLE001  (a rank raised: keep the cases done, report it)
        failed = True
        document["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
        print(f"error: {document['error']}")
    document["wall_seconds"] = time.monotonic() - start
    document["load_average_1_5_15min_end"] = (
        [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    )
    document["complete"] = "interrupted" not in document and not failed
    text = markdown(document["records"])
    print("\n" + text + "\n")
    output.write_json_and_markdown(document, json_path, text)
    if "interrupted" in document:
        return output.INTERRUPTED
    return int(failed or any(not r["gate"]["passed"] for r in document["records"]))
