"""aepg-bench: the benchmark harness of aepg-kernels (installed with the package).

Modules: sweeps (cases and suites), metrics (bytes floor, GB/s), inputs, implementations,
correctness (the gate before timing), timing, runner, machine, report (table, JSON, PNG),
trainer_step, cli (the `aepg-bench` console script; also `python -m aepg_kernels.bench`).
"""
from .cli import main

__all__ = ["main"]
