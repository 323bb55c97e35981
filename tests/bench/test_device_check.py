"""aepg-bench device-check without a GPU: the plan's order and budgets, the refusal and its
reason, the dry run's partial JSON, and a child cut at its budget."""

import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from aepg_kernels.bench import commands, device_check
from aepg_kernels.bench.device_check import Step

CHECKOUT = Path(__file__).resolve().parents[2]


def test_plan_order_and_budgets_fit_eight_minutes_with_the_build():
    steps = device_check.plan()
    assert [s.name for s in steps] == [
        "environment",
        "gpu-tests",
        "op-tests",
        "gpu-sweep",
        "perf-model",
        "llm",
        "trainer-step",
        "other-tests",
    ]
    budgets = {s.name: s.budget_seconds for s in steps}
    assert budgets == {
        "environment": 15,
        "gpu-tests": 40,
        "op-tests": 60,
        "gpu-sweep": 190,
        "perf-model": 10,
        "llm": 45,
        "trainer-step": 45,
        "other-tests": 60,
    }
    assert device_check.TOTAL_SECONDS == 480  # 8 minutes of the 15-minute device budget, the build included
    assert "timeout -k 10 150" in (CHECKOUT / "benchmarks" / "device_check.sh").read_text()  # the build at most
    # Everything up to the sweep and its measured / predicted fits after a build of 120 s (the
    # upper end of the 60-120 s expected), each step using its whole budget.
    up_to_model = sum(s.budget_seconds for s in steps[: [s.name for s in steps].index("perf-model") + 1])
    assert 120 + up_to_model + device_check.FINAL_RESERVE_S <= device_check.TOTAL_SECONDS
    assert [s.name for s in steps if not s.needs_gpu] == ["environment", "perf-model"]
    assert all(s.min_seconds <= s.budget_seconds for s in steps)


def test_plan_writes_at_most_the_eight_files_a_session_brings_back():
    files = device_check.output_files(device_check.plan())
    assert len(files) == len(set(files)) <= device_check.MAX_FILES == 8


def test_sweep_stops_starting_cases_before_its_budget():
    argv = device_check.sweep_argv(Path("out"), 190)
    assert argv[-6:] == ["--suite", "gpu", "--max-seconds", "150", "--out", "out/gpu-sweep.json"]


def test_refuses_without_a_gpu_and_names_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert commands.main(["device-check", "--out", str(tmp_path)]) == device_check.REFUSED
    error = capsys.readouterr().err
    if torch.version.cuda is None:
        assert "built without CUDA" in error
    else:
        assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in error
    assert "--dry-run" in error
    document = json.loads((tmp_path / "device_check.json").read_text())
    assert document["refused"].startswith("no CUDA device: ") and document["steps"] == []


def test_no_gpu_reason_without_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    reason = device_check.no_gpu_reason()
    assert "built without CUDA" in reason or "finds no CUDA device" in reason


def test_dry_run_runs_the_cpu_steps_and_records_the_others(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert commands.main(["device-check", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "1. environment" in printed and "8. other-tests" in printed
    document = json.loads((tmp_path / "device_check.json").read_text())
    assert document["schema"] == "aepg-bench/1" and document["complete"] and document["dry_run"]
    steps = {s["name"]: s for s in document["steps"]}
    assert [s["name"] for s in document["steps"]] == [s.name for s in device_check.plan()]
    assert steps["environment"]["status"] == steps["perf-model"]["status"] == "ok"
    assert all(
        s["status"] == "skipped" and s["reason"] == "dry run: needs a CUDA device"
        for s in document["steps"]
        if s["name"] not in ("environment", "perf-model")
    )
    for key in ("cpu", "torch", "triton", "aepg_kernels", "date", "native", "nvidia_smi"):
        assert key in document["machine"]
    model = json.loads((tmp_path / "perf-model.json").read_text())
    assert model["measured_from"] is None and "not measured on GPU" in model["markdown"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_check.json", "device_check.log", "perf-model.json"]


def _sleeper(seconds: float):
    code = f"import time; print('started', flush=True); time.sleep({seconds})"
    return lambda out, budget: [sys.executable, "-c", code]


def test_partial_json_survives_a_step_cut_at_its_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device_check, "GRACE_S", 1.0)
    seen = {}

    def first(out, dry_run):
        return {"value": 1}

    def second(out, dry_run):  # the summary already holds the first step's result and this one running
        seen.update(json.loads((out / device_check.SUMMARY).read_text()))
        return {}

    steps = [
        Step("first", "in-process", 5, False, function=first, min_seconds=1),
        Step("second", "in-process", 5, False, function=second, min_seconds=1),
        Step("sleeper", "a child that overruns", 3, False, argv=_sleeper(60), min_seconds=1),
        Step("broken", "raises", 5, False, function=lambda out, dry: 1 / 0, min_seconds=1),
        Step("late", "after the deadline", 5, False, argv=_sleeper(0), min_seconds=60),
    ]
    start = time.monotonic()
    rc = device_check.main(["--dry-run", "--out", str(tmp_path), "--total-seconds", "30"], steps=steps)
    assert time.monotonic() - start < 20  # the sleeper was cut at its 3 s budget
    assert rc == 1  # the broken step
    assert [s["status"] for s in seen["steps"]] == ["ok", "running"]
    assert seen["steps"][0]["result"] == {"value": 1} and not seen["complete"]
    document = json.loads((tmp_path / device_check.SUMMARY).read_text())
    steps = {s["name"]: s for s in document["steps"]}
    assert steps["sleeper"]["status"] == "timeout" and steps["sleeper"]["ended"].startswith("interrupted")
    assert steps["sleeper"]["log_tail"][0] == "started"
    assert steps["broken"]["status"] == "error" and "ZeroDivisionError" in steps["broken"]["result"]["error"]
    assert steps["late"]["status"] == "skipped" and "s left before the deadline" in steps["late"]["reason"]


def test_a_child_is_interrupted_when_its_parent_ignores_sigint(tmp_path):
    """A job started with `&` or nohup ignores SIGINT, and so would its children: run_child
    gives them the default back, so that the interrupt at the budget still reaches them."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        record = device_check.run_child(_sleeper(60)(None, None), 3, tmp_path / "log", grace=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert record["ended"].startswith("interrupted") and record["log_tail"][0] == "started"


def test_a_child_that_ignores_sigint_is_killed(tmp_path):
    ignore = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    start = time.monotonic()
    record = device_check.run_child([sys.executable, "-c", ignore], 3, tmp_path / "log", grace=1)
    assert time.monotonic() - start < 15
    assert record["ended"].startswith("killed") and record["returncode"] != 0


def test_pytest_summary_line():
    lines = ["....F", "FAILED tests/test_x.py::test_y", "======= 1 failed, 4 passed in 2.1s ======="]
    assert device_check.pytest_summary(lines) == "1 failed, 4 passed in 2.1s"
    assert device_check.pytest_summary(["collecting ...", "== no tests ran in 25.6s =="]) == "no tests ran in 25.6s"
    assert device_check.pytest_summary(["Traceback (most recent call last):"]) is None


@pytest.mark.parametrize("name", ["perf-model", "device-check"])
def test_subcommands_have_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        commands.main([name, "--help"])
    assert exit_info.value.code == 0 and f"aepg-bench {name}" in capsys.readouterr().out


def test_a_step_is_either_a_command_or_a_function():
    with pytest.raises(ValueError, match="exactly one of argv and function"):
        Step("neither", "nothing to run", 5, False)
    with pytest.raises(ValueError, match="exactly one of argv and function"):
        Step("both", "two things", 5, False, argv=_sleeper(0), function=lambda out, dry: {})
