"""aepg-bench: the benchmark harness of aepg-kernels (installed with the package).

Modules: sweeps (cases and suites), bandwidth (bytes floor, GB/s, speed-ups), inputs,
implementations (the lean composite baselines, the package reference, the fused backends),
correctness (the gate before timing, against a float64 reference), timing, measure (runs the cases
over the implementations), machine, output (table, JSON, PNG and where they go), overhead (--suite
overhead: nn.CrossEntropyLoss vs ak.PolicyLoss per call), llm (--suite llm: an LM head, fused
linear + loss vs eager, compile and F.linear_cross_entropy), llm_step, vocab_parallel, resources,
trainer_step, perf_model (the static bound of each GPU-sweep case), device_check (a GPU session,
most important first), commands (the `aepg-bench` console script; also `python -m aepg_kernels.bench`).
"""

from .commands import main

__all__ = ["main"]
