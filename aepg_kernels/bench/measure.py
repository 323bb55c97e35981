"""Runs a list of cases over the implementations: per case, the correctness gate (against the
float64 reference), then the timing and (on a GPU) memory, launches, host synchronisation, and for
small shapes the time per call back to back with and without a CUDA graph; one JSON-ready record
per (case, implementation), with its speed-ups over the baselines (SPEEDUP_BASELINES)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import bandwidth, output, timing
from .correctness import check, float64_reference, gate_rows
from .implementations import SPEEDUP_BASELINES, Implementation
from .inputs import make_inputs
from .sweeps import COMPILE_SKIPPED, MODES, Case, fits, logits_bytes, memory_needed, rotations, target

# Rotate input copies until they cover FLUSH_BYTES (more than any last-level cache), at most
# MAX_ROTATIONS[device type]. A CPU has no cache flush between calls: the copies (views of one
# allocation) must cover the bytes, so only shapes under FLUSH_BYTES / 16384 = 16 KiB of logits
# (e.g. 256x10 fp32) stay cache-resident. On a GPU do_bench clears L2 before every call anyway;
# the cap bounds the memory the copies take from the skip rule.
FLUSH_BYTES = 256 << 20
MAX_ROTATIONS = {"cpu": 1 << 14, "cuda": 32}
# Launch-bound shapes: N <= GRAPH_MAX_N or N*C <= GRAPH_MAX_ELEMENTS get the back-to-back and
# CUDA-graph times (GPU).
GRAPH_MAX_N, GRAPH_MAX_ELEMENTS = 256, 1 << 21

Record = Dict[str, object]
Report = Callable[[List[Record]], None]


@dataclasses.dataclass
class RunSettings:
    device: torch.device
    memory_bytes: Optional[int]  # device memory for the skip rule; None on a CPU
    budget_seconds: Optional[float] = None  # cases starting after this are skipped (and recorded so)
    graphs: bool = True  # CUDA-graph timing of small shapes (GPU only)
    profile: bool = True  # kernel launches per call (GPU only)
    compile_targets_only: bool = False  # torch.compile only where sweeps.target(case) (the GPU suite)


def launch_bound(case: Case) -> bool:
    """Small shapes, whose time per call may be the host's launch time: they get back-to-back and
    CUDA-graph times."""
    return case.n <= GRAPH_MAX_N or case.elements <= GRAPH_MAX_ELEMENTS


def max_rotations(device: torch.device) -> int:
    return MAX_ROTATIONS["cuda" if device.type == "cuda" else "cpu"]


def base_record(case: Case, impl: str, status: str, reason: str = "", label: Optional[str] = None) -> Record:
    """`label`: the table's name of the implementation when it is not `impl`."""
    record = {
        **dataclasses.asdict(case),
        "implementation": impl,
        "status": status,
        "reason": reason,
        "minimal_bytes": bandwidth.minimal_bytes(case),
    }
    if label and label != impl:
        record["label"] = label
    return record


def add_speedups(records: List[Record]) -> None:
    """Each record's SPEEDUP_BASELINES fields: that baseline's time in the case over the record's."""
    seconds = {r["implementation"]: r.get("seconds") for r in records}
    for record in records:
        for key, baseline in SPEEDUP_BASELINES.items():
            record[key] = bandwidth.speedup(seconds.get(baseline), record.get("seconds"))


def measure(impl: Implementation, fn, inputs, case: Case, settings: RunSettings, copy_gbps: Optional[float]) -> Record:
    """Times one implementation that passed the gate; the other GPU metrics are best-effort (an
    error there is recorded, the time stays)."""
    device, backward = settings.device, MODES[case.mode].backward
    step = timing.make_step(fn, inputs, backward)
    seconds = timing.median_seconds(step, device)
    record = {"seconds": seconds, "ms": seconds * 1e3, "gbps": bandwidth.gbps(bandwidth.minimal_bytes(case), seconds)}
    record["percent_of_copy"] = bandwidth.percent_of(record["gbps"], copy_gbps)
    if device.type != "cuda":
        record["peak_extra_bytes"] = None
        record["peak_extra_note"] = "not measured on a CPU (no allocator statistics)"
        return record
    # After the timing's warm-up: a first call may synchronise once (lazy initialisation, autotuning).
    try:
        record["host_sync"], message = timing.host_sync(step)
        if message:
            record["host_sync_error"] = message
    except Exception as error:  # noqa: BLE001
        record["host_sync"], record["host_sync_error"] = None, f"not measured: {type(error).__name__}: {error}"
    peak = timing.peak_extra_bytes(step, device)
    record["peak_extra_bytes"] = peak
    record["peak_extra_over_logits"] = peak / logits_bytes(case) if peak is not None else None
    if settings.profile:
        try:
            ops = timing.device_ops_per_call(step, device)
            record["kernels_per_call"], record["memcpy_memset_per_call"] = ops["kernels"], ops["memcpy_memset"]
        except Exception as error:  # noqa: BLE001
            record["profile_error"] = f"{type(error).__name__}: {error}"
    if not launch_bound(case):
        return record
    try:
        record["back_to_back_us"] = timing.back_to_back_seconds(step, device) * 1e6
    except Exception as error:  # noqa: BLE001
        record["back_to_back_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    if not settings.graphs:
        return record
    if record["host_sync"] is not False:  # a capture would fail, or worse leave the stream unusable
        record["graph_skipped"] = (
            "a host synchronisation in the call" if record["host_sync"] else "host synchronisation not measured"
        )
        return record
    try:
        record["graph_us"] = timing.cuda_graph_seconds(step, device) * 1e6
    except Exception as error:  # noqa: BLE001
        record["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return record


def run_case(
    case: Case, impls: Sequence[Implementation], settings: RunSettings, copy_gbps: Optional[float]
) -> List[Record]:
    device, backward = settings.device, MODES[case.mode].backward
    copies = rotations(case, FLUSH_BYTES, max_rotations(device))
    if not fits(case, settings.memory_bytes, 0.0, copies):
        return [
            base_record(
                case,
                "*",
                "skipped",
                f"does not fit: needs {memory_needed(case, 0, copies) / 1e9:.1f} GB "
                f"of {settings.memory_bytes / 1e9:.1f} GB",
            )
        ]
    gate_inputs = make_inputs(case, device, rows=gate_rows(case.n, case.c), seed=1)
    reference = float64_reference(case, gate_inputs)
    inputs = make_inputs(case, device, rotations=copies)
    records = []
    for impl in sorted(impls, key=lambda impl: impl.in_place):  # in-place ones last: they overwrite inputs
        why_not = impl.unsupported(case)
        if why_not is not None:
            records.append(base_record(case, impl.name, output.NOT_APPLICABLE, why_not, impl.label))
            continue
        if impl.compiled and settings.compile_targets_only and target(case) is None:
            records.append(base_record(case, impl.name, "skipped", COMPILE_SKIPPED, impl.label))
            continue
        if not fits(case, settings.memory_bytes, impl.workspace_fp32_copies, copies):
            why_not = (
                f"does not fit: needs ~{memory_needed(case, impl.workspace_fp32_copies, copies) / 1e9:.1f} "
                f"GB of {settings.memory_bytes / 1e9:.1f} GB"
            )
        if why_not is not None:
            records.append(base_record(case, impl.name, "skipped", why_not, impl.label))
            continue
        record = base_record(case, impl.name, "ok", label=impl.label)
        record["rotations"] = copies
        try:
            fn = impl.build(case)
            result = check(fn, reference, gate_inputs, case.dtype, backward, impl.in_place)
            record["check"] = dataclasses.asdict(result)
            if not result.passed:
                record.update(status="failed check", reason=result.message)
            else:
                record.update(measure(impl, fn, inputs, case, settings, copy_gbps))
        except Exception as error:  # noqa: BLE001  (one broken implementation must not end the run)
            record.update(status="error", reason=f"{type(error).__name__}: {str(error)[:300]}")
        records.append(record)
    add_speedups(records)
    del inputs, gate_inputs, reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def run(
    cases: Sequence[Case],
    impls: Sequence[Implementation],
    settings: RunSettings,
    copy_gbps: Optional[float],
    report: Report,
    progress=None,
) -> List[Record]:
    """All cases in order; `report` gets each case's records as they finish (the terminal table);
    `progress` (a bar of aepg_kernels.utils.progress_bar, or None) is advanced per case."""
    start, records = time.monotonic(), []
    for case in cases:
        if settings.budget_seconds is not None and time.monotonic() - start > settings.budget_seconds:
            case_records = [base_record(case, "*", "skipped", f"time budget of {settings.budget_seconds:.0f} s spent")]
        else:
            case_records = run_case(case, impls, settings, copy_gbps)
        records += case_records
        report(case_records)
        if progress is not None:
            progress.update(1)
    return records
