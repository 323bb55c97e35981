"""aepg-bench end to end on the CPU (tiny shapes) and its argument errors."""

import json
import subprocess
import sys

import pytest
import torch

import aepg_kernels as ak
from aepg_kernels.bench import bandwidth, commands, implementations, measure, output
from aepg_kernels.bench.sweeps import Case

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_cpu_run_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "run.json"
    fused = ["cpu"] if "cpu" in ak.available_backends() else []
    impls = ",".join(["lean-eager", "reference", "F.cross_entropy", "triton"] + fused)
    rc = commands.main(
        [
            "--device",
            "cpu",
            "--shapes",
            "8x10,16x33",
            "--losses",
            "ce,aepg",
            "--modes",
            "fwd,fwd+bwd,fwd+bwd/rows",
            "--implementations",
            impls,
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    document = json.loads(out.read_text())
    assert document["schema"] == "aepg-bench/1"
    for key in ("cpu", "cores", "torch", "triton", "date", "load_average_1_5_15min", "available_backends"):
        assert key in document["machine"]
    assert document["copy"]["gbps"] > 0
    assert "triton" in document["not_run"]  # never timed on a CPU (there only the interpreter runs it)
    records = document["records"]
    assert len({(r["loss"], r["mode"], r["n"], r["c"]) for r in records}) == 12
    timed = [r for r in records if r["status"] == "ok"]
    assert {r["implementation"] for r in timed} == {"lean-eager", "reference", "F.cross_entropy", *fused}
    for r in timed:
        case = Case(r["loss"], r["mode"], r["dtype"], r["n"], r["c"])
        assert r["gbps"] == pytest.approx(bandwidth.minimal_bytes(case) / r["seconds"] / 1e9)
        assert r["check"]["passed"] and r["peak_extra_bytes"] is None
    assert all(
        r["status"] == output.NOT_APPLICABLE
        for r in records
        if r["implementation"] == "F.cross_entropy" and r["loss"] != "ce"
    )
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    for r in timed:
        if r["loss"] == "ce":
            ce_seconds = next(
                o["seconds"]
                for o in timed
                if o["implementation"] == "F.cross_entropy"
                and (o["mode"], o["n"], o["c"]) == (r["mode"], r["n"], r["c"])
            )
            assert r["speedup_vs_torch_ce"] == pytest.approx(ce_seconds / r["seconds"])
        else:
            assert r["speedup_vs_torch_ce"] is None
        assert r["speedup_vs_lean_compile"] is None  # lean-compile did not run
    assert "gate_reference" in document["settings"] and "speedup_vs_lean_eager" in document["settings"]["speedups"]
    assert "x lean-eager" in printed and "reference (package eager)" in printed and "16x33" in printed
    assert f"wrote {out}" in printed


def test_compile_runs_and_is_checked(tmp_path):
    out = tmp_path / "compile.json"
    argv = [
        "--device",
        "cpu",
        "--shapes",
        "8x10",
        "--modes",
        "fwd",
        "--implementations",
        "lean-compile",
        "--out",
        str(out),
    ]
    assert commands.main(argv) == 0
    records = {r["implementation"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {"lean-eager", "lean-compile"}  # lean-eager always runs: the baseline
    compiled = records["lean-compile"]
    assert compiled["status"] == "ok" and compiled["check"]["passed"]
    assert compiled["speedup_vs_lean_compile"] == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "nll"], "--losses: unknown"),
        (["--shapes", "10"], "--shapes: expected NxC"),
        (["--implementations", "apex"], "--implementations: unknown"),
        (["--implementations", "eager"], "'eager' is now lean-eager"),
        (["--suite", "overhead", "--implementations", "reference"], "--suite overhead has fixed rows"),
        (["--suite", "overhead", "--repeats", "0"], "--repeats must be >= 1"),
        (["--repeats", "3"], "--repeats: for --suite overhead only"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--max-seconds", "0"], "--max-seconds must be > 0"),
        (["--suite", "nightly"], "invalid choice"),
        (["trainer-step", "--classes", "ten"], "--classes: expected a comma list of integers"),
        (["trainer-step", "--batch", "0"], "--batch must be >= 1"),
    ],
)
def test_argument_errors_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        commands.main(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_only_requests_fail_clearly_without_a_gpu(capsys):
    for argv, message in (
        (["--suite", "gpu"], "--suite gpu: the full GPU sweep needs a CUDA device"),
        (["--device", "cuda"], "--device cuda: no CUDA device"),
    ):
        with pytest.raises(SystemExit):
            commands.main(argv)
        assert message in capsys.readouterr().err


def test_time_budget_skips_the_remaining_cases_and_says_so():
    cases = [Case("ce", "fwd", "fp32", 8, 10), Case("ce", "fwd", "fp32", 8, 11)]
    settings = measure.RunSettings(torch.device("cpu"), memory_bytes=None, budget_seconds=1e-9)
    records = measure.run(cases, [implementations.LEAN_EAGER], settings, copy_gbps=None, report=lambda rows: None)
    assert records[-1]["status"] == "skipped" and "time budget" in records[-1]["reason"]
    assert records[-1]["c"] == 11


def test_python_dash_m_lists_the_quick_suite():
    out = subprocess.run(
        [sys.executable, "-m", "aepg_kernels.bench", "--list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "aepg fwd+bwd fp32 4096x1000" in out


def test_trainer_step_on_a_tiny_vit(tmp_path, capsys):
    out = tmp_path / "step.json"
    rc = commands.main(
        [
            "trainer-step",
            "--device",
            "cpu",
            "--model",
            "vit_tiny_patch16_224",
            "--image-size",
            "32",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--classes",
            "5,300",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert "(CPU: batch 2 instead of 256" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert [(r["classes"], r["loss_backend"]) for r in records] == [
        (5, "fused"),
        (5, "eager"),
        (300, "fused"),
        (300, "eager"),
    ]
    assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["batch"] == 2 for r in records)
    assert records[0]["speedup_vs_eager"] == pytest.approx(records[1]["step_ms"] / records[0]["step_ms"])


def test_exit_code_fails_only_for_our_backends():
    # Built explicitly: select() leaves the cpu backend out where it is not available.
    impls = [implementations.LEAN_EAGER, implementations.LIGER, implementations.fused_backend("cpu")]
    baseline_failed = [{"implementation": "liger", "status": "failed check"}]
    assert commands.exit_code(baseline_failed, impls) == 0
    for status in ("error", "failed check"):
        assert commands.exit_code(baseline_failed + [{"implementation": "cpu", "status": status}], impls) == 1


def test_default_file_names_tell_the_machine_apart():
    assert output.device_tag({"card": "NVIDIA H100 80GB HBM3", "cores": 16}) == "nvidia-h100-80gb-hbm3"
    assert output.device_tag({"card": None, "cores": 2, "torch_threads": 1}) == "cpu2c1t"


def test_an_interrupted_run_writes_what_it_measured_and_exits_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut.json"
    calls = []
    run_case = measure.run_case

    def interrupted_after_one_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_case(*args, **kwargs)

    monkeypatch.setattr(measure, "run_case", interrupted_after_one_case)
    rc = commands.main(
        ["--device", "cpu", "--shapes", "8x10,8x11,8x12", "--implementations", "lean-eager", "--out", str(out)]
    )
    assert rc == output.INTERRUPTED == 130
    document = json.loads(out.read_text())
    assert document["complete"] is False and "KeyboardInterrupt" in document["interrupted"]
    assert [(r["c"], r["status"]) for r in document["records"]] == [(10, "ok")]
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    assert "interrupted" in capsys.readouterr().out


def test_compile_runs_only_on_target_shapes_when_the_suite_says_so():
    case = Case("aepg", "fwd+bwd", "fp32", 8, 10)  # not a target: compile is not even built
    settings = measure.RunSettings(torch.device("cpu"), memory_bytes=None, compile_targets_only=True)
    impls = [implementations.LEAN_EAGER, implementations.LEAN_COMPILE, implementations.REFERENCE_COMPILE]
    records = {r["implementation"]: r for r in measure.run_case(case, impls, settings, copy_gbps=None)}
    for name in ("lean-compile", "reference-compile"):
        assert records[name]["status"] == "skipped" and "target shapes only" in records[name]["reason"]
    assert records["lean-eager"]["status"] == "ok" and records["lean-eager"]["speedup_vs_lean_compile"] is None


def test_implementations_share_the_rotation_of_input_copies():
    """Each implementation goes on from the copy where the previous one stopped."""
    from aepg_kernels.bench import inputs as bench_inputs, timing

    case = Case("ce", "fwd", "fp32", 8, 10)
    inputs = bench_inputs.make_inputs(case, torch.device("cpu"), rotations=5)
    assert len({x.data_ptr() for x in inputs.logits}) == 5
    seen = []
    fn = lambda x, y: seen.append(x.data_ptr()) or x.sum()
    first, second = timing.make_step(fn, inputs, False), timing.make_step(fn, inputs, False)
    first(), first(), second(), second()
    assert seen == [x.data_ptr() for x in inputs.logits[:4]]
