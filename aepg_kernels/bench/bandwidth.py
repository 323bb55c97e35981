"""The formulas of the benchmark, in one place: the bytes floor, achieved bandwidth, the share
of the measured copy bandwidth, and speed-ups."""

from __future__ import annotations

from typing import Optional

from .sweeps import MODES, Case, logits_bytes


def minimal_bytes(case: Case) -> int:
    """The bytes floor (benchmarks/README.md, "How the numbers are read"): forward reads the logits
    once; forward + backward also writes the gradient (same dtype as the logits) once. Targets,
    per-row values and the loss are O(N) and left out."""
    passes = 2 if MODES[case.mode].backward else 1
    return passes * logits_bytes(case)


def copy_bytes(buffer_bytes: int) -> int:
    """A device-to-device copy of `buffer_bytes` reads and writes them: the same 1R + 1W count."""
    return 2 * buffer_bytes


def gbps(num_bytes: int, seconds: Optional[float]) -> Optional[float]:
    """Achieved GB/s (1e9 bytes per second)."""
    return None if not seconds else num_bytes / seconds / 1e9


def percent_of(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    return None if value is None or not reference else 100.0 * value / reference


def speedup(baseline_seconds: Optional[float], seconds: Optional[float]) -> Optional[float]:
    """How many times faster than the baseline (baseline time / this time)."""
    return None if not baseline_seconds or not seconds else baseline_seconds / seconds
