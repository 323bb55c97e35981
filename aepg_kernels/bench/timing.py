"""How a call is timed and profiled: median time after a warm-up (triton.testing.do_bench or CUDA
events on a GPU, perf_counter on a CPU), the copy bandwidth of the device, the peak extra memory
of a call, kernel launches per call, host synchronisations, and the time per call back to back
with and without a CUDA graph."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from .implementations import LossFn
from .inputs import CaseInputs

Step = Callable[[], object]

# CPU timing: warm-up calls, then repeats until MIN_SECONDS of calls or MAX_REPEATS (at least MIN_REPEATS).
CPU_WARMUP, CPU_MIN_REPEATS, CPU_MAX_REPEATS, CPU_MIN_SECONDS = 2, 3, 50, 0.3
# GPU timing (do_bench's arguments, milliseconds of warm-up and of timed calls).
GPU_WARMUP_MS, GPU_REP_MS = 25, 100
# Copy-bandwidth buffer: far larger than any last-level cache (H100 L2 50 MB, H200 60 MB).
COPY_BYTES_GPU, COPY_BYTES_CPU = 1 << 30, 1 << 28
PROFILED_CALLS = 5
# Back-to-back timing: calls per CUDA-event pair, median over repeats.
BACK_TO_BACK_CALLS, BACK_TO_BACK_REPEATS = 100, 3


def make_step(fn: LossFn, inputs: CaseInputs, backward: bool) -> Step:
    """A call of the case: the next copy of the inputs each time (rotation), forward, and backward
    with the mode's upstream gradient. The gradient is returned, never accumulated into .grad."""
    logits = [x.detach().requires_grad_(backward) for x in inputs.logits]
    order = inputs.cursor

    if not backward:

        def forward():
            i = next(order)
            with torch.no_grad():
                return fn(logits[i], inputs.target[i])

        return forward

    def forward_backward():
        i = next(order)
        loss = fn(logits[i], inputs.target[i])
        return torch.autograd.grad(loss, logits[i], inputs.upstream)

    return forward_backward


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on a CPU, where calls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds_cpu(step: Step) -> float:
    """Median of at least CPU_MIN_REPEATS calls after CPU_WARMUP warm-up calls (one when a call takes
    longer than CPU_MIN_SECONDS: a shape that slow has nothing left to warm after one call)."""
    start = time.perf_counter()
    step()
    if time.perf_counter() - start < CPU_MIN_SECONDS:
        for _ in range(CPU_WARMUP - 1):
            step()
    times = []
    while len(times) < CPU_MIN_REPEATS or (sum(times) < CPU_MIN_SECONDS and len(times) < CPU_MAX_REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_seconds_cuda(step: Step) -> float:
    """triton.testing.do_bench (it also clears L2 between calls) or, without triton, CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(step, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, return_mode="median") / 1e3
    for _ in range(3):
        step()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def median_seconds(step: Step, device: torch.device) -> float:
    return median_seconds_cuda(step) if device.type == "cuda" else median_seconds_cpu(step)


def copy_bandwidth(device: torch.device) -> Dict[str, float]:
    """A large device-to-device copy, timed like the kernels: buffer bytes and seconds per copy."""
    buffer_bytes = COPY_BYTES_GPU if device.type == "cuda" else COPY_BYTES_CPU
    if device.type == "cuda":
        buffer_bytes = min(buffer_bytes, torch.cuda.mem_get_info(device)[0] // 8)
    src = torch.empty(buffer_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return {"buffer_bytes": src.numel() * 4, "seconds": seconds}


def peak_extra_bytes(step: Step, device: torch.device) -> Optional[int]:
    """max_memory_allocated during one call over what was allocated before it (inputs excluded,
    the returned gradient included). None on a CPU: no allocator statistics there."""
    if device.type != "cuda":
        return None
    return cuda_peak_extra_bytes(step, device)[0]


def cuda_peak_extra_bytes(step: Step, device: torch.device):
    """(peak extra bytes of one call on a CUDA device, the call's result), from the allocator."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline, result


def device_ops_per_call(step: Step, device: torch.device) -> Optional[Dict[str, float]]:
    """Kernels and other device operations (memset, memcpy) per call, from torch.profiler's
    CUDA events over PROFILED_CALLS calls; None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            step()
        synchronize(device)
    # User annotations (record_function ranges) also appear on the CUDA timeline: not operations.
    names = [
        e.name
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    copies = sum(name.startswith(("Memcpy", "Memset")) for name in names)
    return {"kernels": (len(names) - copies) / PROFILED_CALLS, "memcpy_memset": copies / PROFILED_CALLS}


def host_sync(step: Step) -> Tuple[bool, str]:
    """(whether one call synchronises the host with the device, the error text) from one call under
    torch.cuda.set_sync_debug_mode("error"); the previous mode is restored. Run it after a warm-up:
    first calls may synchronise once (lazy initialisation, autotuning). Other errors propagate."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        if "synchronizing CUDA operation" not in str(error):
            raise
        return True, f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False, ""


def back_to_back_seconds(call: Step, device: torch.device) -> float:
    """Time per call of BACK_TO_BACK_CALLS calls queued back to back between two CUDA events,
    caches left warm (median of BACK_TO_BACK_REPEATS): unlike do_bench, which clears L2 before
    every call, the host's launch time shows whenever it exceeds the device time, as in a training
    loop. The measure for 'us per call with and without a CUDA graph' (same method for both)."""
    for _ in range(3):
        call()
    synchronize(device)
    times = []
    for _ in range(BACK_TO_BACK_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(BACK_TO_BACK_CALLS):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / BACK_TO_BACK_CALLS)
    return statistics.median(times)


def cuda_graph_seconds(step: Step, device: torch.device) -> float:
    """Time per replay of `step` captured in a CUDA graph, replays back to back
    (back_to_back_seconds). Raises if the call cannot be captured; check host_sync first."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (lazy initialisation, autotuning)
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return back_to_back_seconds(graph.replay, device)
