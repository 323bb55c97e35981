"""aepg-bench: the benchmark harness of aepg-kernels (installed with the package).

Modules: sweeps (cases and suites), metrics (bytes floor, GB/s), inputs, implementations (the
lean composite baselines, the package reference, the fused backends), correctness (the gate before
timing, against a float64 reference), timing, runner, machine, report (table, JSON, PNG, markdown),
overhead (--suite overhead: nn.CrossEntropyLoss vs ak.PolicyLoss per call), llm (--suite llm: an LM
head, fused linear + loss vs eager, compile and F.linear_cross_entropy), trainer_step, cli (the
`aepg-bench` console script; also `python -m aepg_kernels.bench`).
"""
from .cli import main

__all__ = ["main"]
