"""Sweep definitions, skip rules and the formulas of aepg-bench (pure arithmetic, no timing)."""

import pytest
import torch

from aepg_kernels.bench import bandwidth, measure
from aepg_kernels.bench.sweeps import (
    CLASSIFICATION_C,
    DTYPES,
    LLM_C,
    LOSSES,
    MODES,
    SUITES,
    Case,
    check_names,
    fits,
    logits_bytes,
    memory_needed,
    parse_shapes,
    rotations,
    target,
)

GB = 10**9


def test_gpu_suite_covers_every_shape_mode_loss_and_dtype():
    cases = SUITES["gpu"]().cases
    assert {c.c for c in cases} >= set(CLASSIFICATION_C) | set(LLM_C)
    assert {c.mode for c in cases} == set(MODES)
    assert {c.loss for c in cases} == set(LOSSES)
    assert {c.dtype for c in cases} == set(DTYPES)
    assert max(c.n for c in cases if c.c in CLASSIFICATION_C) >= 2**20  # "N up to about 1M rows"
    assert {c.n for c in cases if c.c in LLM_C} <= set(range(2048, 16385))
    assert len(cases) == len(set(cases))


def test_gpu_suite_starts_with_the_issue_targets():
    first = SUITES["gpu"]().cases[:4]
    assert Case("ce", "fwd+bwd", "bf16", 8192, 128256) in first
    assert Case("ce", "fwd+bwd", "fp32", 16384, 32000) in first
    assert first[0].n == 256 and measure.launch_bound(first[0])  # us per call with and without a CUDA graph
    # Every target kind within the first cases; torch.compile (seconds per case) only on those.
    suite = SUITES["gpu"]()
    assert suite.compile_targets_only
    assert {target(case) for case in suite.cases[:8]} == {"large C", "classification", None}
    compiled = [case for case in suite.cases if target(case)]
    assert len(compiled) < len(suite.cases) / 3


def test_targets_are_the_issue_shapes_in_fwd_bwd():
    assert target(Case("ce", "fwd+bwd", "bf16", 8192, 128256)) == "large C"
    assert target(Case("aepg", "fwd+bwd", "fp32", 16384, 32000)) == "large C"
    assert target(Case("ce", "fwd+bwd", "fp32", 8192, 128256)) is None  # fp32 at that shape is not a target
    assert target(Case("aepg", "fwd+bwd", "bf16", 4096, 100)) == "classification"
    assert target(Case("aepg", "fwd+bwd", "fp32", 65536, 21843)) == "classification"
    for case in (
        Case("aepg", "fwd+bwd", "bf16", 256, 1000),
        Case("aepg", "fwd+bwd", "bf16", 4096, 10),
        Case("aepg", "fwd", "bf16", 4096, 1000),
        Case("aepg", "fwd+bwd/rows", "bf16", 4096, 1000),
    ):
        assert target(case) is None, case
    assert not SUITES["quick"]().compile_targets_only and not SUITES["cpu"]().compile_targets_only


def test_quick_suite_is_small_fp32_and_covers_the_three_modes():
    cases = SUITES["quick"]().cases
    assert len(cases) <= 6
    assert {c.dtype for c in cases} == {"fp32"}
    assert {c.mode for c in cases} == set(MODES)
    assert max(c.n * c.c for c in cases) <= 4096 * 1000


def test_cpu_suite_has_the_cpu_table_shapes():
    shapes = {(c.n, c.c) for c in SUITES["cpu"]().cases}
    assert shapes >= {(256, 100), (256, 1000), (4096, 1000), (8192, 32000)}


def test_bytes_floor_matches_the_worked_examples():
    # benchmarks/README.md, "How the numbers are read": bf16 8192x128256 fwd+bwd -> 4.2 GB; fp32 4096x100 -> 3.3 MB.
    assert bandwidth.minimal_bytes(Case("ce", "fwd+bwd", "bf16", 8192, 128256)) == 8192 * 128256 * 2 * 2
    assert round(bandwidth.minimal_bytes(Case("ce", "fwd+bwd", "bf16", 8192, 128256)) / GB, 1) == 4.2
    assert bandwidth.minimal_bytes(Case("aepg", "fwd+bwd/rows", "fp32", 4096, 100)) == 4096 * 100 * 4 * 2
    assert bandwidth.minimal_bytes(Case("aepg", "fwd", "fp16", 10, 7)) == 10 * 7 * 2  # one read


def test_bandwidth_percent_and_speedup():
    floor = bandwidth.minimal_bytes(Case("ce", "fwd+bwd", "bf16", 8192, 128256))
    assert bandwidth.gbps(floor, 1.40e-3) == pytest.approx(3000, rel=0.01)  # benchmarks/README.md's floor at 3.0 TB/s
    assert bandwidth.copy_bytes(2**30) == 2**31
    assert bandwidth.percent_of(2550.0, 3000.0) == pytest.approx(85.0)
    assert bandwidth.speedup(3.0, 1.5) == 2.0
    assert bandwidth.gbps(floor, None) is None and bandwidth.speedup(None, 1.0) is None


def test_skip_rule_by_memory():
    huge = Case("ce", "fwd+bwd", "bf16", 16384, 262144)  # 8.6 GB of logits
    h100 = 80 * GB
    assert fits(huge, h100, workspace_fp32_copies=0)  # logits + gradient: 17 GB
    assert not fits(huge, h100, workspace_fp32_copies=7)  # + 7 fp32 copies: 137 GB
    assert fits(huge, None, workspace_fp32_copies=7)  # unknown memory (a CPU): run it
    assert memory_needed(huge, 0, rotations=3) == huge.n * huge.c * 2 * 4


def test_rotations_cover_the_flush_size_within_the_cap():
    small, big = Case("ce", "fwd", "fp32", 256, 100), Case("ce", "fwd", "fp32", 65536, 4096)
    assert rotations(small, 256 << 20, 32) == 32
    assert rotations(big, 256 << 20, 32) == 1
    assert rotations(Case("ce", "fwd", "fp32", 1024, 1024), 16 << 20, 32) == 4


def test_cpu_rotations_cover_the_flush_bytes_down_to_16_kib_of_logits():
    """No cache flush between CPU calls: the copies must cover FLUSH_BYTES (benchmarks/README.md says
    which shapes stay cache-resident)."""
    cap = measure.max_rotations(torch.device("cpu"))
    assert measure.FLUSH_BYTES // cap == 16 << 10
    for shape in ((256, 100), (256, 1000), (4096, 1000), (64, 64)):
        case = Case("aepg", "fwd+bwd", "fp32", *shape)
        assert rotations(case, measure.FLUSH_BYTES, cap) * logits_bytes(case) >= measure.FLUSH_BYTES, shape
    resident = Case("aepg", "fwd+bwd", "fp32", 256, 10)  # 10 KiB
    assert rotations(resident, measure.FLUSH_BYTES, cap) * logits_bytes(resident) < measure.FLUSH_BYTES
    assert measure.max_rotations(torch.device("cuda")) == 32  # do_bench clears L2 there


def test_parse_shapes_and_names():
    assert parse_shapes("256x100, 4096X1000") == [(256, 100), (4096, 1000)]
    for bad in ("256", "0x10", "ax10", "4x4x4"):
        with pytest.raises(ValueError, match="--shapes"):
            parse_shapes(bad)
    with pytest.raises(ValueError, match="--losses: unknown \\['nll'\\]"):
        check_names("losses", ["ce", "nll"], LOSSES)


def test_only_the_gpu_suite_has_a_time_budget_under_eight_minutes():
    assert SUITES["gpu"]().budget_seconds <= 8 * 60 - 30
    assert SUITES["quick"]().budget_seconds is None and SUITES["cpu"]().budget_seconds is None
