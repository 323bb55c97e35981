"""The static performance model: bytes floor and bound by hand, the memory / SFU switch, the
kernel path rule, the JSON and markdown, measured / predicted from a sweep's JSON."""

import json

import pytest

from aepg_kernels.backends.triton import launch
from aepg_kernels.bench import commands, perf_model
from aepg_kernels.bench.sweeps import Case, gpu_suite

H100, H200 = perf_model.GPUS["h100-sxm"], perf_model.GPUS["h200"]


def test_floor_and_bound_of_the_large_vocabulary_target_by_hand():
    case = Case("ce", "fwd+bwd", "bf16", 8192, 128256)
    logits = 8192 * 128256 * 2  # bf16
    model = perf_model.bound(case, perf_model.kernel_path(case), H100)
    assert perf_model.kernel_path(case) is perf_model.RECOMPUTE  # C > 16384: streamed, gradient recomputed
    assert model["floor_us"] == pytest.approx(2 * logits / 3.35e12 * 1e6)  # 1R + 1W: 1254.5 us
    assert model["floor_us"] == pytest.approx(1254.5, abs=0.1)
    assert model["memory_us"] == pytest.approx(3 * logits / 3.35e12 * 1e6)  # 2R + 1W
    sfu_rate = 132 * 16 * 1.98e9
    assert model["sfu_us"] == pytest.approx((2 * 8192 * 128256 + 4 * 8192) / sfu_rate * 1e6)
    assert model["bound_us"] == pytest.approx(model["memory_us"] + 2 * perf_model.LAUNCH_FLOOR_S * 1e6)
    assert model["bound_by"] == "memory"


def test_fused_path_moves_exactly_the_bytes_floor():
    case = Case("aepg", "fwd+bwd", "bf16", 65536, 1000)
    record = perf_model.build_document(cases=[case])["records"][0]
    assert record["path"] == "fused"
    assert record["floor_bytes"] == record["path_bytes"] == 2 * 65536 * 1000 * 2
    assert record["bounds"]["h200"]["floor_us"] == pytest.approx(2 * 65536 * 1000 * 2 / 4.8e12 * 1e6)


def test_bound_switches_from_memory_to_sfu_with_transcendentals_per_byte():
    case = Case("aepg", "fwd", "bf16", 65536, 4096)  # 2 bytes per element
    one_exp = perf_model.FORWARD
    assert perf_model.bound(case, one_exp, H200)["bound_by"] == "memory"
    # An exp and a log per element (a log-softmax kernel, say): 1 transcendental per byte, above
    # the H200's 0.87 crossover and below the H100's 1.25: the same kernel is SFU-bound only there.
    exp_and_log = perf_model.KernelPath("exp+log", "test", 1, 0, 1, 1, 0)
    assert H200.sfu_per_byte == pytest.approx(0.871, abs=1e-3) and H100.sfu_per_byte == pytest.approx(1.248, abs=1e-3)
    assert perf_model.bound(case, exp_and_log, H200)["bound_by"] == "sfu"
    assert perf_model.bound(case, exp_and_log, H100)["bound_by"] == "memory"
    sfu = perf_model.bound(case, exp_and_log, H200)
    assert sfu["bound_us"] == pytest.approx(sfu["sfu_us"] + sfu["launch_us"])


def test_tiny_shapes_are_launch_bound():
    case = Case("aepg", "fwd+bwd", "bf16", 256, 100)
    model = perf_model.bound(case, perf_model.kernel_path(case), H100)
    assert model["bound_by"] == "launch"
    assert model["bound_us"] == pytest.approx(model["memory_us"] + perf_model.LAUNCH_FLOOR_S * 1e6)


def test_paths_follow_the_on_chip_rule_of_both_gpu_backends():
    for case in gpu_suite().cases:
        path = perf_model.kernel_path(case)
        assert perf_model.on_chip(case.c) == launch.fits_on_chip(case.c)  # CUDA and Triton agree
        if case.mode == "fwd":
            assert path is perf_model.FORWARD
        elif case.mode == "fwd+bwd" and case.c <= 16384:
            assert path is perf_model.FUSED
        else:
            assert path is perf_model.RECOMPUTE


def test_every_sweep_case_is_memory_or_launch_bound_on_both_cards():
    summary = perf_model.build_document()["summary"]
    for key in perf_model.GPUS:
        assert summary[key]["bound_by"]["sfu"] == 0
        assert summary[key]["max_sfu_over_memory"] < 1


def test_document_schema_without_measurements(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert commands.main(["perf-model", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["schema"] == "aepg-bench/1" and document["suite"] == "perf-model"
    assert set(document["gpus"]) == {"h100-sxm", "h200"} and set(document["paths"]) == {"forward", "fused", "recompute"}
    assert len(document["records"]) == len(gpu_suite().cases)
    for record in document["records"]:
        assert {
            "loss",
            "mode",
            "dtype",
            "n",
            "c",
            "path",
            "floor_bytes",
            "path_bytes",
            "exp_per_element",
            "log_per_element",
            "transcendentals",
            "bounds",
            "measured",
        } <= set(record)
        for bound in record["bounds"].values():
            assert {"floor_us", "memory_us", "sfu_us", "launch_us", "bound_us", "bound_by"} <= set(bound)
            assert bound["bound_us"] >= bound["floor_us"]
        assert record["measured"] == {
            "cuda": {"status": "not measured on GPU"},
            "triton": {"status": "not measured on GPU"},
        }
    table = out.with_suffix(".md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(document["records"]) + 1  # + header
    assert "- cuda: not measured on GPU" in table
    assert "cuda: not measured on GPU" in capsys.readouterr().out


def test_measured_over_predicted_from_a_sweep_document():
    case = Case("aepg", "fwd+bwd", "bf16", 65536, 1000)
    sweep = {
        "machine": {"card": "NVIDIA H200", "date": "2026-12-02"},
        "complete": True,
        "records": [
            {**case.__dict__, "implementation": "cuda", "status": "ok", "seconds": 100e-6},
            {**case.__dict__, "implementation": "triton", "status": "failed check", "reason": "loss off"},
            {**case.__dict__, "implementation": "lean-eager", "status": "ok", "seconds": 1e-3},
        ],
    }
    document = perf_model.build_document(sweep, cases=[case])
    record = document["records"][0]
    predicted = record["bounds"]["h200"]["bound_us"]
    assert record["measured"]["cuda"]["measured_over_predicted"] == pytest.approx(100 / predicted)
    assert record["measured"]["triton"] == {"status": "failed check", "reason": "loss off"}
    assert document["summary"]["cuda"]["measured"] == 1 and document["summary"]["triton"]["measured"] == 0
    unknown = perf_model.build_document({**sweep, "machine": {"card": "NVIDIA A100"}}, cases=[case])
    assert "no spec in the model" in unknown["records"][0]["measured"]["cuda"]["reason"]
