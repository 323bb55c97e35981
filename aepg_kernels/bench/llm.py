"""`aepg-bench --suite llm`: an LM head's loss, ``F.linear`` + loss, fwd+bwd with respect to the
hidden states and the weight, side by side in one run:

- eager:   ``F.linear(x, W)`` then the loss on ``logits.float()`` as HF/TRL write it (LOSSES);
- compile: ``torch.compile`` of that eager function (compiled once per case, warmed up, then timed);
- F.linear_cross_entropy: PyTorch's chunked op, ``options=torch.nn.LinearCrossEntropyOptions()`` (CE);
- aepg:    ours, ``ak.linear_*`` (backend "auto"), never the (N, V) logits;
- liger, cce (CUDA only, CE, when importable): Liger's fused linear CE and cut-cross-entropy.

Per case (loss x dtype x N x H x V) each implementation's first call is its warm-up and its gate:
its loss, dx and dW against the reference (the eager formula in fp32 on the same inputs, upcast;
itself checked against float64 on the first GATE_ROWS rows), a failure gets no time. Then REPEATS
interleaved rounds (the order rotating each round); the minimum is reported (the least disturbed
call on a shared VM; the median is in the JSON). Peak extra memory: the CUDA allocator's peak
over the baseline on a GPU; on a CPU the resident set sampled every SAMPLE_SECONDS by a thread
during one untimed call, over the resident set before it (after gc and malloc_trim, so that memory
freed by an earlier implementation does not count), in a process that has run every op before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import os
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import aepg_kernels as ak
from aepg_kernels import utils

from . import output
from .correctness import TOLERANCE, relative_error
from .sweeps import DTYPES
from .timing import cuda_peak_extra_bytes, synchronize

HeadFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, W, y) -> loss

SHAPES = ((2048, 256, 128256), (4096, 1024, 32000))  # the LLM head's target shapes (N, H, V)
LOSS_NAMES = ("ce", "dft", "aepg")
ALPHA, ENTROPY_WEIGHT = 0.5, 0.1
LOGIT_SCALE = 3.0  # W ~ N(0, 9/H): logits ~ N(0, 3^2), as the kernel suites' inputs
REPEATS = 3
GATE_ROWS = 64  # rows of the float64 check of the reference (the dW of all V rows at float64 is costly)
SAMPLE_SECONDS = 1e-3
MEMORY_FRACTION = 0.8  # an implementation runs if its estimated peak fits in this much of MemAvailable
# Estimated peak of the eager composite in fp32 copies of the (N, V) logits (logits, log-softmax,
# their gradients, the entropy's products); the chunked implementations need a few chunks.
EAGER_FP32_COPIES = {"ce": 4, "dft": 5, "aepg": 7}
LOSS_TITLES = {"ce": "CE", "dft": "DFT (timed as ak.linear_epg_loss)", "aepg": "aEPG+entropy"}


@dataclasses.dataclass(frozen=True)
class HeadCase:
    loss: str
    dtype: str
    n: int
    h: int
    v: int

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.h}x{self.v}"

    @property
    def label(self) -> str:
        return f"{self.loss} {self.dtype} {self.shape}"


def cases(
    shapes: Sequence[Tuple[int, int, int]] = SHAPES,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    losses: Sequence[str] = LOSS_NAMES,
) -> List[HeadCase]:
    """By priority, since --max-seconds cuts from the end: CE and DFT (the timed targets) at every
    shape and dtype first, CE before DFT (its F.linear_cross_entropy baseline), then aEPG+entropy."""
    groups = (("ce", "dft"), ("aepg",))
    return [
        HeadCase(loss, dtype, n, h, v)
        for group in groups
        for n, h, v in shapes
        for dtype in dtypes
        for loss in group
        if loss in losses
    ]


# --- the eager losses on fp32 logits, as a user of HF/TRL has them ---------------------------------


def dft_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """TRL's DFT: -p_y.detach() * log p_y, the masked mean over the counted tokens."""
    mask = target != ignore_index
    logp = logits.log_softmax(-1).gather(1, target.masked_fill(~mask, 0)[:, None]).squeeze(1)
    per_token = -logp.exp().detach() * logp
    return (per_token * mask).sum() / mask.sum()


def aepg_loss(logits: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The kernel suites' lean composite (log_softmax, gather, exp, entropy sum) for a 0-d tensor
    alpha. Written out here: implementations.lean_composite branches on its weights (`if ce_weight`),
    which a tensor alpha turns into a data-dependent branch that fullgraph torch.compile refuses."""
    logp = logits.log_softmax(-1)
    lp_y = logp.gather(1, target[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (alpha * -lp_y + (1 - alpha) * (1 - lp_y.exp()) + ENTROPY_WEIGHT * entropy).mean()


def eager_fn(loss: str, alpha: torch.Tensor) -> HeadFn:
    def ce(x, w, y):
        return F.cross_entropy(F.linear(x, w).float(), y)

    def dft(x, w, y):
        return dft_loss(F.linear(x, w).float(), y)

    def aepg(x, w, y):
        return aepg_loss(F.linear(x, w).float(), y, alpha)

    return {"ce": ce, "dft": dft, "aepg": aepg}[loss]


def ours_fn(loss: str, alpha: torch.Tensor) -> HeadFn:
    # DFT's value convention (-p_y.detach() log p_y) is not in the package yet: EPG (1 - p_y) has
    # the same gradient, so its time is DFT's; the gate compares gradients, and its loss to EPG's.
    return {
        "ce": lambda x, w, y: ak.linear_cross_entropy(x, w, y),
        "dft": lambda x, w, y: ak.linear_epg_loss(x, w, y),
        "aepg": lambda x, w, y: ak.linear_aepg_loss(x, w, y, alpha, entropy_weight=ENTROPY_WEIGHT),
    }[loss]


def compiled_fn(loss: str, alpha: torch.Tensor) -> HeadFn:
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit across shapes
    import torch._inductor.config as inductor_config

    # Compile in this process: a pool of compile workers would go on warming up beside the timed
    # calls of the other implementations on a 2-core machine.
    inductor_config.compile_threads = 1
    return torch.compile(eager_fn(loss, alpha), fullgraph=True, dynamic=False)


def torch_linear_ce_fn(loss: str, alpha: torch.Tensor) -> HeadFn:
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options)


def liger_fn(loss: str, alpha: torch.Tensor) -> HeadFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    criterion = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, y: criterion(w, x, y)  # Liger takes the weight first


def cce_fn(loss: str, alpha: torch.Tensor) -> HeadFn:
    from cut_cross_entropy import linear_cross_entropy

    return lambda x, w, y: linear_cross_entropy(x, w, y)


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[str, torch.Tensor], HeadFn]
    losses: Tuple[str, ...] = LOSS_NAMES
    cuda_only: bool = False
    module: str = ""  # what must import for it to run
    compiled: bool = False
    chunked: bool = True  # never holds the (N, V) logits (no memory skip)


IMPLS = (
    Impl("eager", eager_fn, chunked=False),
    Impl("compile", compiled_fn, compiled=True, chunked=False),
    Impl("F.linear_cross_entropy", torch_linear_ce_fn, losses=("ce",)),
    Impl("aepg", ours_fn),
    Impl("liger", liger_fn, losses=("ce",), cuda_only=True, module="liger_kernel.transformers"),
    Impl("cce", cce_fn, losses=("ce",), cuda_only=True, module="cut_cross_entropy"),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)
EAGER, OURS, TORCH_LCE = "eager", "aepg", "F.linear_cross_entropy"


def unavailable(impl: Impl, device: torch.device) -> str:
    """Why `impl` does not run on `device` ('' when it does)."""
    if impl.cuda_only and device.type != "cuda":
        return "CUDA only"
    if impl.module:
        try:
            __import__(impl.module)
        except Exception as error:  # noqa: BLE001  (any import failure: not run, with the reason)
            return f"{impl.module} does not import ({type(error).__name__})"
    return ""


# --- inputs, the call, the gate ---------------------------------------------------------------------


def make_inputs(case: HeadCase, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.n, case.h, generator=gen, device=device).to(DTYPES[case.dtype])
    w = torch.randn(case.v, case.h, generator=gen, device=device) * (LOGIT_SCALE / case.h**0.5)
    y = torch.randint(0, case.v, (case.n,), generator=gen, device=device)
    return x.requires_grad_(), w.to(DTYPES[case.dtype]).requires_grad_(), y


def call(fn: HeadFn, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One training step's loss: fresh .grad (None first, as optimizer.zero_grad() leaves it), backward."""
    x.grad = w.grad = None
    loss = fn(x, w, y)
    loss.backward()
    return loss.detach()


def outputs(fn: HeadFn, x, w, y) -> Dict[str, torch.Tensor]:
    loss = call(fn, x, w, y)
    return {"loss": loss, "dx": x.grad.clone(), "dw": w.grad.clone()}


def errors(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], compare_loss: bool = True) -> Dict[str, float]:
    """max |got - ref| / max |ref| per output (relative_error of the kernel gate)."""
    keys = ("loss", "dx", "dw") if compare_loss else ("dx", "dw")
    return {key: relative_error(got[key], ref[key]) for key in keys}


def float64_check(case: HeadCase, alpha: torch.Tensor, x, w, y) -> dict:
    """The eager formula in fp32 against float64 on the first GATE_ROWS rows (all of W): how far
    the gate's fp32 reference is from exact at this V (the float64 call at the full shape would
    cost minutes on a CPU)."""
    rows = min(case.n, GATE_ROWS)
    sub = [x.detach()[:rows].float().requires_grad_(), w.detach().float().clone().requires_grad_()]
    fp32 = outputs(eager_fn(case.loss, alpha), *sub, y[:rows])
    sub64 = [t.detach().double().requires_grad_() for t in sub]
    fp64 = outputs(eager_fn(case.loss, alpha.double()), *sub64, y[:rows])
    errs = errors(fp32, fp64)
    return {"rows": rows, "errors": errs, "max_error": max(errs.values())}


def reference(
    case: HeadCase, alpha: torch.Tensor, x, w, y, eager: Optional[Dict[str, torch.Tensor]]
) -> Dict[str, torch.Tensor]:
    """The gate's reference at the case's shape: the eager formula in fp32 on the inputs upcast
    (for fp32 inputs that is eager's own warm-up call, `eager`, reused)."""
    wide = [t.detach().float().requires_grad_() for t in (x, w)]
    ref = eager if eager is not None and case.dtype == "fp32" else outputs(eager_fn(case.loss, alpha), *wide, y)
    if case.loss == "dft":  # ours computes EPG's value 1 - p_y: its loss is checked against that
        with torch.no_grad():
            logp = F.linear(*wide).log_softmax(-1).gather(1, y[:, None]).squeeze(1)
            ref = {**ref, "epg_loss": (1 - logp.exp()).mean()}
    return ref


def gate(
    name: str, got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], tolerance: Optional[float], loss: str
) -> dict:
    """Errors of one implementation's warm-up outputs against the reference, and the verdict;
    tolerance None: the yardstick of low precision (see gate_tolerance), passed when finite."""
    if name == OURS and loss == "dft":
        errs = errors(got, ref, compare_loss=False)
        errs["loss (vs EPG 1-p_y)"] = relative_error(got["loss"], ref["epg_loss"])
    else:
        errs = errors(got, ref)
    worst = max(errs.values())
    if tolerance is None:
        tolerance = max(TOLERANCE["bf16"], 2 * worst) if math.isfinite(worst) else TOLERANCE["bf16"]
    return {"errors": errs, "max_error": worst, "tolerance": tolerance, "passed": worst <= tolerance}


def gate_tolerance(dtype: str, eager_gate: Optional[dict]) -> Optional[float]:
    """fp32: TOLERANCE. Low precision: no worse than twice the error of PyTorch's own composite in
    that dtype (the eager row, gated first, whose logits are rounded to it), and never below
    TOLERANCE; None for the eager row itself, the yardstick (refused only for a non-finite error)."""
    if dtype == "fp32":
        return TOLERANCE[dtype]
    if eager_gate is None:
        return None
    return max(TOLERANCE[dtype], 2 * eager_gate["max_error"])


# --- memory -----------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Hand the heap's free memory back to the OS (glibc), so the baseline is what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(
    step: Callable[[], object], device: torch.device, *leaves: torch.Tensor
) -> Tuple[Optional[int], object]:
    """(peak extra bytes of one call of `step`, its result); None where it cannot be measured. The
    `leaves`' .grad are released before the baseline, so that every implementation's number
    includes the fresh gradients of its call (not only the first one to run on these inputs)."""
    for leaf in leaves:
        leaf.grad = None
    if device.type == "cuda":
        return cuda_peak_extra_bytes(step, device)
    if not os.path.exists("/proc/self/statm"):
        return None, step()
    _trim()
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = step()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - baseline, result


def available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_bytes(case: HeadCase, impl: Impl) -> int:
    weights = case.v * case.h * 4 * 3  # W, dW and an fp32 accumulator
    logits = 0 if impl.chunked else case.n * case.v * 4 * EAGER_FP32_COPIES[case.loss]
    return weights + logits


# --- one case ---------------------------------------------------------------------------------------

TINY = HeadCase("ce", "fp32", 8, 16, 64)


def run_case(case: HeadCase, impls: Sequence[Impl], device: torch.device, repeats: int = REPEATS) -> dict:
    """The record of one case: per implementation its status, gate, peak extra bytes and times.
    Eager runs first: in fp32 its warm-up outputs are the gate's reference."""
    alpha = torch.tensor(ALPHA, device=device)  # a 0-d tensor, as a schedule passes it
    x, w, y = make_inputs(case, device)
    record = {
        **dataclasses.asdict(case),
        "shape": case.shape,
        "impls": {},
        "reference_check": float64_check(case, alpha, x, w, y),
    }
    free = available_bytes() if device.type == "cpu" else torch.cuda.mem_get_info(device)[0]
    steps, ref = {}, None
    for impl in sorted(impls, key=lambda impl: impl.name != EAGER):
        row = record["impls"][impl.name] = {}
        if case.loss not in impl.losses:
            row["status"] = output.NOT_APPLICABLE
            continue
        if free is not None and estimated_bytes(case, impl) > MEMORY_FRACTION * free:
            row.update(
                status="skipped",
                reason=f"would need ~{estimated_bytes(case, impl) / 2**30:.1f} GiB "
                f"(> {MEMORY_FRACTION:g} of {free / 2**30:.1f} GiB available)",
            )
            continue
        fn, got = warm_up(impl, case, alpha, x, w, y, device, row)
        if fn is None:
            continue
        if ref is None:
            ref = reference(case, alpha, x, w, y, got if impl.name == EAGER else None)
        eager_gate = record["impls"].get(EAGER, {}).get("gate")
        row["gate"] = gate(impl.name, got, ref, gate_tolerance(case.dtype, eager_gate), case.loss)
        del got
        if not row["gate"]["passed"]:
            row.update(
                status="failed check",
                reason=f"max error {row['gate']['max_error']:.2e} > {row['gate']['tolerance']:.2g}",
            )
            continue
        steps[impl.name] = timed_step(fn, x, w, y, device)
        if "peak_extra_bytes" not in row:  # compiled: a call after the compiling one
            row["peak_extra_bytes"], _ = peak_extra_bytes(steps[impl.name], device, x, w)
    for name, seconds in interleaved(steps, repeats).items():
        record["impls"][name].update(
            status="ok", seconds=seconds, min_s=min(seconds), median_s=statistics.median(seconds)
        )
    return record


def timed_step(fn: HeadFn, x, w, y, device) -> Callable[[], object]:
    def step():
        call(fn, x, w, y)
        synchronize(device)

    return step


def warm_up(impl: Impl, case: HeadCase, alpha, x, w, y, device, row: dict):
    """(fn, outputs of its first call at the case's shape), or (None, None) with the row saying why.
    Not compiled: a call at a tiny shape first (lazy initialisation), then the first call at the
    shape is also the memory measurement. Compiled: the first call compiles (memory measured on a
    later call)."""
    try:
        fn = impl.build(case.loss, alpha)
        if not impl.compiled:
            call(fn, *make_inputs(dataclasses.replace(TINY, loss=case.loss, dtype=case.dtype), device))
        start = time.perf_counter()
        if impl.compiled:
            loss = call(fn, x, w, y)
        else:
            row["peak_extra_bytes"], loss = peak_extra_bytes(lambda: call(fn, x, w, y), device, x, w)
        row["first_call_s"] = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001  (a compile or run failure is recorded, not fatal)
        row.update(
            status="compile failed" if impl.compiled else "error", reason=f"{type(error).__name__}: {str(error)[:300]}"
        )
        return None, None
    return fn, {"loss": loss, "dx": x.grad.clone(), "dw": w.grad.clone()}


def interleaved(steps: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, List[float]]:
    """Seconds per call, `repeats` rounds, the order rotated by one each round; gc off meanwhile."""
    names, times = list(steps), {name: [] for name in steps}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % max(len(names), 1) :] + names[: r % max(len(names), 1)]:
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return times


# --- ratios, targets, tables ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    key: str  # the record's ratios/verdicts key
    quantity: str  # "min_s" or "peak_extra_bytes"
    baseline: str  # the implementation it is measured against
    limit: float  # ratio ours/baseline <= limit: met
    losses: Tuple[str, ...]
    title: str


# For DFT and aEPG F.linear_cross_entropy's CE of the same shape and dtype is the baseline: the
# fused op a user would otherwise have, which computes no other loss.
TARGETS = (
    Target("time_vs_eager", "min_s", EAGER, 1.0, ("ce", "dft"), "time <= eager"),
    Target("time_vs_lce", "min_s", TORCH_LCE, 1.0, ("ce", "dft"), "time <= F.linear_cross_entropy"),
    Target("memory_vs_eager", "peak_extra_bytes", EAGER, 1 / 8, LOSS_NAMES, "peak extra memory <= 1/8 eager"),
    Target(
        "memory_vs_lce", "peak_extra_bytes", TORCH_LCE, 1.0, LOSS_NAMES, "peak extra memory <= F.linear_cross_entropy"
    ),
)


def _value(record: dict, impl: str, quantity: str) -> Optional[float]:
    row = record["impls"].get(impl, {})
    return row.get(quantity) if row.get("status") == "ok" else None


def add_ratios(records: Sequence[dict]) -> None:
    """ratios (ours / baseline) and a verdict per target in every record (the F.linear_cross_entropy
    baseline of a non-CE record from the CE record of its dtype and shape)."""
    ce = {(r["dtype"], r["shape"]): r for r in records if r["loss"] == "ce"}
    for r in records:
        r["ratios"], r["verdicts"] = {}, {}
        for t in TARGETS:
            base_record = ce.get((r["dtype"], r["shape"])) if t.baseline == TORCH_LCE else r
            ours = _value(r, OURS, t.quantity)
            base = _value(base_record, t.baseline, t.quantity) if base_record else None
            ratio = ours / base if ours is not None and base else None
            r["ratios"][t.key] = ratio
            if r["loss"] in t.losses:
                r["verdicts"][t.key] = "not measured" if ratio is None else ("met" if ratio <= t.limit else "failed")


def target_summary(records: Sequence[dict]) -> Dict[str, dict]:
    summary = {}
    for t in TARGETS:
        verdicts = [(r["label"], r["verdicts"][t.key]) for r in records if t.key in r["verdicts"]]
        failed = [label for label, v in verdicts if v == "failed"]
        measured = [v for _, v in verdicts if v != "not measured"]
        overall = "failed" if failed else ("met" if measured else "not measured")
        summary[t.key] = {
            "target": t.title,
            "limit": t.limit,
            "losses": list(t.losses),
            "overall": overall,
            "failed_at": failed,
            "not_measured_at": [label for label, v in verdicts if v == "not measured"],
        }
    return summary


def _impls_in(records: Sequence[dict]) -> List[str]:
    present = {name for r in records for name, row in r["impls"].items() if row.get("status") != output.NOT_APPLICABLE}
    return [name for name in IMPL_NAMES if name in present]


def _cell(record: dict, impl: str, quantity: str, scale: float, digits: str) -> str:
    row = record["impls"].get(impl, {})
    if row.get("status") == output.NOT_APPLICABLE or not row:
        return "n/a"
    if row.get("status") != "ok":
        return row.get("status", "-")
    value = row.get(quantity)
    return "-" if value is None else format(value / scale, digits)


def _ratio(record: dict, key: str) -> str:
    ratio = record["ratios"].get(key)
    text = "-" if ratio is None else f"{ratio:.2f}x"
    verdict = record["verdicts"].get(key)
    return f"{text} {verdict}" if verdict else text


def _gate(record: dict, names: Sequence[str]) -> str:
    parts = []
    for name in names:
        row = record["impls"].get(name, {})
        if "gate" in row:
            error = row["gate"]["max_error"]
            if name == EAGER:  # its own formula is the reference: its error is the float64 check's
                error = max(error, record["reference_check"]["max_error"])
            parts.append(f"{name} {error:.0e}" + ("" if row["gate"]["passed"] else " FAILED"))
    return "; ".join(parts)


def _lead(record: dict) -> List[str]:
    return [LOSS_TITLES[record["loss"]], record["dtype"], record["shape"]]


def markdown(records: Sequence[dict]) -> str:
    """Two tables: seconds per fwd+bwd (min of the repeats) with the time ratios and verdicts; peak
    extra memory (MiB) with its ratios and verdicts, and the gate's max error per implementation."""
    names = _impls_in(records)
    lead = ["loss", "dtype", "N x H x V"]
    time_rows = [
        _lead(r)
        + [_cell(r, n, "min_s", 1.0, ".2f") for n in names]
        + [_ratio(r, "time_vs_eager"), _ratio(r, "time_vs_lce")]
        for r in records
    ]
    time_table = utils.markdown_table(lead + [f"{n} s" for n in names] + ["aepg / eager", "aepg / F.lce"], time_rows)
    memory_rows = [
        _lead(r)
        + [_cell(r, n, "peak_extra_bytes", 2**20, ".0f") for n in names]
        + [_ratio(r, "memory_vs_eager"), _ratio(r, "memory_vs_lce"), _gate(r, names)]
        for r in records
    ]
    memory_table = utils.markdown_table(
        lead + [f"{n} MiB" for n in names] + ["aepg / eager (<= 0.125)", "aepg / F.lce (<= 1)", "gate max error"],
        memory_rows,
    )
    return f"{time_table}\n\n{memory_table}"


def summary_lines(summary: Dict[str, dict]) -> List[str]:
    lines = []
    for key, s in summary.items():
        where = f" (at {', '.join(s['failed_at'])})" if s["failed_at"] else ""
        lines.append(f"target {s['target']} ({'/'.join(s['losses'])}): {s['overall']}{where}")
    return lines


def progress_line(record: dict) -> str:
    parts = []
    for name, row in record["impls"].items():
        if row.get("status") == "ok":
            mib = row.get("peak_extra_bytes")
            parts.append(f"{name} {row['min_s']:.3g} s" + ("" if mib is None else f" {mib / 2**20:.0f} MiB"))
        elif row.get("status") != output.NOT_APPLICABLE:
            parts.append(f"{name} {row.get('status')}: {row.get('reason', '')[:80]}")
    return f"{record['label']:<28} " + ", ".join(parts)


def settings(device: torch.device, repeats: int) -> Dict[str, object]:
    memory = (
        "torch.cuda.max_memory_allocated during one call after reset_peak_memory_stats, minus "
        "memory_allocated before it"
        if device.type == "cuda"
        else f"resident set (/proc/self/statm) sampled every {SAMPLE_SECONDS * 1e3:g} ms by a thread during one "
        "untimed call, minus the resident set just before it (after gc.collect and malloc_trim); not "
        "compiled: the first call at the shape after a call at 8x16x64; compiled: the call after the "
        "compiling one. Includes the call's fresh x.grad and W.grad (released before the baseline)"
    )
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "call": "x.grad = W.grad = None; loss = fn(x, W, y); loss.backward() (x (N,H), W (V,H) leaves, "
        "reduction mean, no bias, no ignored target)",
        "inputs": f"x ~ N(0,1), W ~ N(0, {LOGIT_SCALE:g}^2/H) (logits ~ N(0, {LOGIT_SCALE:g}^2)), y uniform, "
        "in the dtype",
        "implementations": {
            "eager": "F.linear(x, W).float(), then F.cross_entropy (ce), TRL's DFT -exp(logp).detach()*logp masked "
            "mean (dft), lean_composite with alpha=0.5 (0-d tensor), entropy_weight=0.1 (aepg)",
            "compile": "torch.compile(eager, fullgraph=True, dynamic=False), compiled per case",
            "F.linear_cross_entropy": "F.linear_cross_entropy(x, W, y, options=torch.nn.LinearCrossEntropyOptions())",
            "aepg": "ak.linear_cross_entropy / ak.linear_epg_loss / ak.linear_aepg_loss(alpha 0-d tensor, "
            "entropy_weight=0.1), backend auto",
            "liger": "liger_kernel LigerFusedLinearCrossEntropyLoss (CUDA)",
            "cce": "cut_cross_entropy.linear_cross_entropy (CUDA)",
        },
        "dft": "the package has no DFT value convention yet: aepg's 'dft' is ak.linear_epg_loss (1 - p_y), whose "
        "gradient is DFT's; its gate compares dx and dW to DFT's and its loss to 1 - p_y",
        "gate": (
            f"each implementation's first call at the shape (loss, dx, dW) vs the eager formula in fp32 on the "
            f"inputs upcast; max |got - ref| / max |ref| <= {TOLERANCE['fp32']:g} (fp32: both in fp32, "
            f"summation order only) or, in bf16, no more than twice the eager row's own error (PyTorch's "
            f"composite, logits rounded to bf16) and at least {TOLERANCE['bf16']:g}; the fp32 "
            f"reference itself vs float64 on the first {GATE_ROWS} rows (reference_check)"
        ),
        "timing": f"{repeats} interleaved rounds, order rotating; min reported (median_s in the JSON); gc off",
        "memory": memory,
        "targets": {t.key: {"target": t.title, "limit": t.limit, "losses": list(t.losses)} for t in TARGETS},
    }


def run(
    case_list: Sequence[HeadCase],
    impls: Sequence[Impl],
    device: torch.device,
    repeats: int = REPEATS,
    budget_seconds: Optional[float] = None,
    case_done: Callable[[dict], None] = lambda record: None,
) -> List[dict]:
    """Every case in order; those that would start after `budget_seconds` are recorded as skipped."""
    start, records = time.monotonic(), []
    for case in case_list:
        if budget_seconds is not None and time.monotonic() - start > budget_seconds:
            why = f"time budget of {budget_seconds:.0f} s spent"
            record = {
                **dataclasses.asdict(case),
                "shape": case.shape,
                "reference_check": None,
                "impls": {impl.name: {"status": "skipped", "reason": why} for impl in impls},
            }
        else:
            try:
                record = run_case(case, impls, device, repeats)
            except Exception as error:  # noqa: BLE001  (the reference itself failed: no number for the case)
                record = {
                    **dataclasses.asdict(case),
                    "shape": case.shape,
                    "reference_check": None,
                    "impls": {},
                    "status": "error",
                    "reason": f"{type(error).__name__}: {str(error)[:300]}",
                }
        record["label"] = case.label
        records.append(record)
        add_ratios(records)
        case_done(record)
    return records
