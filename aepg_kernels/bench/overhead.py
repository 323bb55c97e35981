"""`aepg-bench --suite overhead`: what a user sees when swapping ``nn.CrossEntropyLoss()`` for
``ak.PolicyLoss()`` in a classification loop, on the CPU (one thread unless --threads says).

Per case (mode x shape, sweeps.overhead_cases) three rows, ROWS: nn.CrossEntropyLoss() (the
reference), ak.PolicyLoss() (backend "auto") and aEPG (ak.AEPGLoss with a 0-d tensor alpha and an
entropy term). A call is what a loop does: "fwd+bwd" is ``x.grad = None; crit(x, y).backward()``
on a leaf x, "eval forward" is ``crit(x, y)`` under torch.no_grad(). The rows are timed
interleaved in one run: rounds of a few calls of each row, the order rotating every round, so that
machine noise hits all of them alike; the median of many rounds per row, the ratio of the medians
to nn.CrossEntropyLoss and a verdict per target (TARGETS). Before timing, the gate checks each
row's loss and gradient (ak.PolicyLoss against nn.CrossEntropyLoss, the others against the float64
reference); a row that fails it gets no time.

With CUDA, `host_times` also measures the host time per call (Python, dispatch and launches) of
ak.PolicyLoss() vs F.cross_entropy on small CUDA tensors; without CUDA the document says so.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import aepg_kernels as ak
from aepg_kernels import utils

from . import output
from .correctness import TOLERANCE, check, float64_reference, gate_rows, loss_and_grad
from .implementations import LossFn
from .inputs import make_inputs
from .sweeps import MODES, OVERHEAD_MODE_TITLES, Case
from .timing import Step, synchronize

ALPHA, ENTROPY_WEIGHT = 0.5, 0.1  # aEPG as LOSSES["aepg"]: 0.5 CE + 0.5 EPG + 0.1 H
FLOAT64 = "float64 reference"

# Interleaved timing: a sample is CALLS_PER_SAMPLE calls of one row (about SAMPLE_SECONDS, from the
# warm-up's time per call, 1 to MAX_CALLS_PER_SAMPLE); as many rounds as fit in CASE_SECONDS, at
# least MIN_SAMPLES and at most MAX_SAMPLES (--repeats sets the count instead).
WARMUP_CALLS, TIMED_WARMUP_CALLS = 3, 3
SAMPLE_SECONDS, MAX_CALLS_PER_SAMPLE = 1e-3, 64
CASE_SECONDS, MIN_SAMPLES, MAX_SAMPLES = 2.0, 15, 400
# Host time on CUDA tensors: small shapes, where the host's time is all a call costs.
HOST_SHAPES = ((8, 10), (256, 100), (256, 1000))
HOST_CALLS, HOST_REPEATS = 50, 15


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # the table's column and the records' key
    build: Callable[[torch.device], LossFn]  # the criterion as a user makes it
    loss: str  # the LOSSES entry it computes
    checked_against: str = FLOAT64  # the gate's reference: FLOAT64 or an earlier row's name
    description: str = ""


ROWS = (
    Row("nn.CrossEntropyLoss", lambda device: nn.CrossEntropyLoss(), "ce", description="nn.CrossEntropyLoss()"),
    Row(
        "ak.PolicyLoss",
        lambda device: ak.PolicyLoss(),
        "ce",
        checked_against="nn.CrossEntropyLoss",
        description='ak.PolicyLoss() (backend "auto")',
    ),
    Row(
        "aEPG",
        lambda device: ak.AEPGLoss(ak.ConstantAlpha(ALPHA, device=device), entropy_weight=ENTROPY_WEIGHT),
        "aepg",
        description=f"ak.AEPGLoss(ak.ConstantAlpha({ALPHA}, device=...), entropy_weight={ENTROPY_WEIGHT}): "
        "alpha a 0-d tensor",
    ),
)
REFERENCE_ROW = ROWS[0].name


@dataclasses.dataclass(frozen=True)
class Target:
    row: str
    met: float  # ratio to nn.CrossEntropyLoss <= met: "met"
    noise: float  # met < ratio <= noise: "within noise"; above it: "failed"


TARGETS = (Target("ak.PolicyLoss", 1.0, 1.10), Target("aEPG", 1.25, 1.25))
VERDICTS = ("met", "within noise", "failed", "not measured")


def verdict(ratio: Optional[float], target: Target) -> str:
    """One of VERDICTS for `ratio` (a row's median over nn.CrossEntropyLoss's)."""
    if ratio is None:
        return "not measured"
    if ratio <= target.met:
        return "met"
    return "within noise" if ratio <= target.noise else "failed"


def overall_verdict(verdicts: Sequence[str]) -> str:
    """A target over every case: failed if it failed anywhere, else within noise if it was so
    anywhere, met if met everywhere measured, not measured if measured nowhere."""
    measured = [v for v in verdicts if v != "not measured"]
    for worst in ("failed", "within noise"):
        if worst in measured:
            return worst
    return "met" if measured else "not measured"


def make_step(fn: LossFn, x: torch.Tensor, y: torch.Tensor, backward: bool) -> Step:
    """A call as a loop makes it: fwd+bwd on a leaf (grad reset to None first), or eval under no_grad."""
    if not backward:
        x = x.detach()

        def eval_call():
            with torch.no_grad():
                return fn(x, y)

        return eval_call
    leaf = x.detach().requires_grad_()

    def train_call():
        leaf.grad = None
        fn(leaf, y).backward()

    return train_call


def calls_per_sample(step: Step) -> Tuple[int, float]:
    """(calls per sample, seconds per call) from WARMUP_CALLS untimed and TIMED_WARMUP_CALLS timed calls."""
    for _ in range(WARMUP_CALLS):
        step()
    start = time.perf_counter()
    for _ in range(TIMED_WARMUP_CALLS):
        step()
    seconds = (time.perf_counter() - start) / TIMED_WARMUP_CALLS
    return max(1, min(MAX_CALLS_PER_SAMPLE, round(SAMPLE_SECONDS / max(seconds, 1e-9)))), seconds


def interleaved_samples(
    steps: Dict[str, Step], samples: Optional[int] = None
) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """Seconds per call of each step, one value per round: in round r each step runs its calls per
    sample back to back, the steps in an order rotated by r. `samples` rounds, else as many as fit
    in CASE_SECONDS (MIN_SAMPLES to MAX_SAMPLES). The garbage collector is off meanwhile (as timeit)."""
    names = list(steps)
    per_call = {name: calls_per_sample(steps[name]) for name in names}
    calls = {name: k for name, (k, _) in per_call.items()}
    if samples is None:
        round_seconds = sum(k * seconds for k, seconds in per_call.values())
        samples = max(MIN_SAMPLES, min(MAX_SAMPLES, int(CASE_SECONDS / max(round_seconds, 1e-9))))
    times: Dict[str, List[float]] = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(samples):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                step, k = steps[name], calls[name]
                start = time.perf_counter()
                for _ in range(k):
                    step()
                times[name].append((time.perf_counter() - start) / k)
    finally:
        if enabled:
            gc.enable()
    return times, calls


def summary_us(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles and minimum of per-call times, in microseconds."""
    us = sorted(s * 1e6 for s in seconds)
    q1, _, q3 = statistics.quantiles(us, n=4) if len(us) > 1 else (us[0], us[0], us[0])
    return {"us": statistics.median(us), "q1_us": q1, "q3_us": q3, "min_us": us[0]}


def paired_ratio(times: Dict[str, List[float]], row: str) -> Optional[float]:
    """Median over rounds of row's time / nn.CrossEntropyLoss's time in the same round."""
    if row not in times or REFERENCE_ROW not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[row], times[REFERENCE_ROW], strict=True))


def gate(case: Case, fns: Dict[str, LossFn]) -> Dict[str, dict]:
    """Each row's check (CheckResult as a dict) on the case's inputs (seed 1, not the timed ones)."""
    backward = MODES[case.mode].backward
    inputs = make_inputs(case, torch.device("cpu"), rows=gate_rows(case.n, case.c), seed=1)
    results: Dict[str, dict] = {}
    for row in ROWS:
        if row.checked_against == FLOAT64:
            reference = float64_reference(dataclasses.replace(case, loss=row.loss), inputs)
        else:
            reference = loss_and_grad(fns[row.checked_against], inputs, backward, in_place=False)
        result = dataclasses.asdict(check(fns[row.name], reference, inputs, case.dtype, backward))
        results[row.name] = {**result, "against": row.checked_against}
    return results


def base_record(case: Case, status: str, reason: str = "") -> Dict[str, object]:
    return {
        **dataclasses.asdict(case),
        "mode_title": OVERHEAD_MODE_TITLES.get(case.mode, case.mode),
        "status": status,
        "reason": reason,
        "rows": {},
    }


def run_case(case: Case, samples: Optional[int] = None) -> Dict[str, object]:
    """The record of one case: per row its check, then (if passed) its time summary; the ratios to
    nn.CrossEntropyLoss and the verdicts. A row that fails the gate (a crash there included) gets no
    time, the others still run; an error while timing leaves the case without times ("error")."""
    device = torch.device("cpu")
    record = base_record(case, "ok")
    rows: Dict[str, dict] = record["rows"]
    fns = {row.name: row.build(device) for row in ROWS}
    try:
        checks = gate(case, fns)
    except Exception as error:  # noqa: BLE001  (a crash in the reference or a row: no number for this case)
        record.update(status="error", reason=f"gate: {type(error).__name__}: {str(error)[:300]}")
        checks = {}
    inputs = make_inputs(case, device)
    steps, failed = {}, []
    for row in ROWS:
        rows[row.name] = {"check": checks.get(row.name)}
        if checks.get(row.name, {}).get("passed"):
            steps[row.name] = make_step(fns[row.name], inputs.logits[0], inputs.target[0], MODES[case.mode].backward)
        elif checks:
            rows[row.name]["status"] = "failed check"
            failed.append(f"{row.name}: {checks[row.name]['message']}")
    if failed:
        record.update(status="failed check", reason="; ".join(failed))
    try:
        times, calls = interleaved_samples(steps, samples) if steps else ({}, {})
    except Exception as error:  # noqa: BLE001
        record.update(status="error", reason=f"timing: {type(error).__name__}: {str(error)[:300]}")
        times, calls = {}, {}
    for name, seconds in times.items():
        rows[name].update(status="ok", samples=len(seconds), calls_per_sample=calls[name], **summary_us(seconds))
    add_ratios(record, times)
    return record


def add_ratios(record: Dict[str, object], times: Dict[str, List[float]]) -> None:
    """ratios (of medians), paired_ratios (median of per-round ratios) and verdicts per target."""
    rows = record["rows"]
    reference = rows.get(REFERENCE_ROW, {}).get("us")
    record["ratios"], record["paired_ratios"], record["verdicts"] = {}, {}, {}
    for target in TARGETS:
        us = rows.get(target.row, {}).get("us")
        ratio = us / reference if us is not None and reference else None
        record["ratios"][target.row] = ratio
        record["paired_ratios"][target.row] = paired_ratio(times, target.row)
        record["verdicts"][target.row] = verdict(ratio, target)


def run(
    cases: Sequence[Case],
    samples: Optional[int] = None,
    budget_seconds: Optional[float] = None,
    case_done: Callable[[Dict[str, object]], None] = lambda record: None,
) -> List[Dict[str, object]]:
    """Every case in order (run_case); those that would start after `budget_seconds` are skipped
    and recorded so. `case_done` gets each record as it finishes."""
    start, records = time.monotonic(), []
    for case in cases:
        if budget_seconds is not None and time.monotonic() - start > budget_seconds:
            record = base_record(case, "skipped", f"time budget of {budget_seconds:.0f} s spent")
            add_ratios(record, {})
        else:
            record = run_case(case, samples)
        records.append(record)
        case_done(record)
    return records


def target_summary(records: Sequence[Dict[str, object]]) -> Dict[str, dict]:
    """Per target: its thresholds, the count of each verdict, the overall verdict and where it failed."""
    summary = {}
    for target in TARGETS:
        verdicts = [r["verdicts"][target.row] for r in records]
        failed = [f"{r['mode_title']} {r['n']}x{r['c']}" for r in records if r["verdicts"][target.row] == "failed"]
        summary[target.row] = {
            "met_at_or_below": target.met,
            "failed_above": target.noise,
            "counts": {v: verdicts.count(v) for v in VERDICTS},
            "overall": overall_verdict(verdicts),
            "failed_at": failed,
        }
    return summary


def _us(value: Optional[float]) -> Optional[str]:
    return None if value is None else output.format_number(value)


def _ratio(record: Dict[str, object], row: str) -> Optional[str]:
    ratio = record["ratios"].get(row)
    return None if ratio is None else f"{ratio:.2f}x"


def _gate_cell(record: Dict[str, object]) -> str:
    if record["status"] == "skipped":
        return "skipped"
    checks = [row.get("check") for row in record["rows"].values()]
    if not checks or any(c is None for c in checks):
        return record["status"]
    worst = max(max(c["loss_error"], c["grad_error"] or 0.0) for c in checks)
    return f"passed (max error {worst:.1e})" if all(c["passed"] for c in checks) else "FAILED"


def markdown(records: Sequence[Dict[str, object]]) -> str:
    """The overhead table: us per call of each row, the ratios to nn.CrossEntropyLoss and their verdicts."""
    headers = ["mode", "N x C"] + [f"{row.name} us" for row in ROWS]
    for target in TARGETS:
        headers += [f"{target.row} / CE", f"target <= {target.met:.2f}"]
    headers.append("gate")
    lines = []
    for r in records:
        cells = [r["mode_title"], f"{r['n']}x{r['c']}"] + [_us(r["rows"].get(row.name, {}).get("us")) for row in ROWS]
        for target in TARGETS:
            cells += [_ratio(r, target.row), r["verdicts"][target.row]]
        lines.append(cells + [_gate_cell(r)])
    return utils.markdown_table(headers, lines)


def progress_line(record: Dict[str, object]) -> str:
    """One terminal line per finished case."""
    lead = f"{record['mode_title']:>12} {str(record['n']) + 'x' + str(record['c']):<9}"
    if record["status"] not in ("ok", "failed check"):
        return f"{lead} {record['status']}: {record['reason']}"
    parts = []
    for row in ROWS:
        us = record["rows"].get(row.name, {}).get("us")
        text = f"{row.name} {_us(us) or '-'} us"
        if row.name in record["ratios"]:
            text += f" ({_ratio(record, row.name) or '-'}: {record['verdicts'][row.name]})"
        parts.append(text)
    tail = f"  [{record['status']}: {record['reason']}]" if record["status"] != "ok" else ""
    return f"{lead} " + ", ".join(parts) + tail


def summary_lines(summary: Dict[str, dict]) -> List[str]:
    lines = []
    for target in TARGETS:
        s = summary[target.row]
        counts = ", ".join(f"{v} {n}" for v, n in s["counts"].items() if n)
        where = f" (above {target.noise:.2f}x at {', '.join(s['failed_at'])})" if s["failed_at"] else ""
        lines.append(f"target {target.row} <= {target.met:.2f}x nn.CrossEntropyLoss: {s['overall']}{where}; {counts}")
    return lines


def host_times(
    device: torch.device,
    shapes: Sequence[Tuple[int, int]] = HOST_SHAPES,
    calls: int = HOST_CALLS,
    repeats: int = HOST_REPEATS,
) -> List[Dict[str, object]]:
    """Host time per call on `device` tensors of F.cross_entropy vs ak.PolicyLoss(), fwd+bwd and
    eval forward: the device synchronised before a loop of `calls` calls, host_us is the loop's
    time per call without waiting for the device (Python, dispatch, launches), with_sync_us with
    it; the median of `repeats` loops, rows interleaved (order rotating). Meant for CUDA tensors."""
    fns = {"F.cross_entropy": F.cross_entropy, "ak.PolicyLoss": ak.PolicyLoss()}
    records = []
    for mode in ("fwd+bwd", "fwd"):
        for n, c in shapes:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(n, c, generator=gen, device=device)
            y = torch.randint(0, c, (n,), generator=gen, device=device)
            steps = {name: make_step(fn, x, y, MODES[mode].backward) for name, fn in fns.items()}
            host, total = {name: [] for name in steps}, {name: [] for name in steps}
            for name, step in steps.items():
                for _ in range(WARMUP_CALLS):
                    step()
            names = list(steps)
            for r in range(repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(calls):
                        steps[name]()
                    queued = time.perf_counter()
                    synchronize(device)
                    host[name].append((queued - start) / calls)
                    total[name].append((time.perf_counter() - start) / calls)
            record = {
                "mode": mode,
                "mode_title": OVERHEAD_MODE_TITLES[mode],
                "n": n,
                "c": c,
                "dtype": "fp32",
                "calls_per_loop": calls,
                "loops": repeats,
            }
            for name in names:
                record[name] = {
                    "host_us": statistics.median(host[name]) * 1e6,
                    "with_sync_us": statistics.median(total[name]) * 1e6,
                }
            record["host_ratio"] = record["ak.PolicyLoss"]["host_us"] / record["F.cross_entropy"]["host_us"]
            records.append(record)
    return records


def host_markdown(records: Sequence[Dict[str, object]]) -> str:
    headers = [
        "mode",
        "N x C",
        "F.cross_entropy host us",
        "ak.PolicyLoss host us",
        "PolicyLoss / F.ce",
        "F.cross_entropy with sync us",
        "ak.PolicyLoss with sync us",
    ]
    rows = [
        [
            r["mode_title"],
            f"{r['n']}x{r['c']}",
            _us(r["F.cross_entropy"]["host_us"]),
            _us(r["ak.PolicyLoss"]["host_us"]),
            f"{r['host_ratio']:.2f}x",
            _us(r["F.cross_entropy"]["with_sync_us"]),
            _us(r["ak.PolicyLoss"]["with_sync_us"]),
        ]
        for r in records
    ]
    return utils.markdown_table(headers, rows)


def settings() -> Dict[str, object]:
    """The document's description of the method (rows, targets, timing, gate)."""
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "tolerance": TOLERANCE,
        "rows": {row.name: {"call": row.description, "gate_against": row.checked_against} for row in ROWS},
        "targets": {t.row: {"met_at_or_below": t.met, "within_noise_up_to": t.noise} for t in TARGETS},
        "modes": {
            "fwd+bwd": "x a leaf: x.grad = None; loss = crit(x, y); loss.backward()",
            "fwd": "eval forward: crit(x, y) under torch.no_grad()",
        },
        "timing": (
            f"interleaved rounds, the row order rotating each round; a sample is ~{SAMPLE_SECONDS * 1e3:g} ms "
            f"of back-to-back calls of one row (1-{MAX_CALLS_PER_SAMPLE} calls) after {WARMUP_CALLS} + "
            f"{TIMED_WARMUP_CALLS} warm-up calls; {MIN_SAMPLES}-{MAX_SAMPLES} rounds (~{CASE_SECONDS:g} s per "
            f"case) unless --repeats; medians of perf_counter; gc off; inputs N(0, 3^2), one copy (warm caches, "
            f"as a loop's fresh logits)"
        ),
        "ratio": "median us of the row / median us of nn.CrossEntropyLoss (paired_ratios: median of per-round ratios)",
        "host_time": (
            f"CUDA only: {HOST_CALLS} calls between synchronisations, perf_counter before the final "
            f"synchronize (host_us) and after it (with_sync_us), median of {HOST_REPEATS} loops"
        ),
    }
