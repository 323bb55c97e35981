"""`aepg-bench device-check`: the checks of a GPU session, most important first, by one deadline.

    aepg-bench device-check --out DIR [--dry-run] [--total-seconds S] [--started-at EPOCH]
                            [--build-returncode RC]

Each step has its own time budget: a child process gets SIGINT when its budget (less GRACE_S) is
spent, so that pytest still prints its summary and the benchmarks write what they measured, and
SIGKILL GRACE_S later; a step that would start with less than its minimum left before the deadline
is skipped and recorded so. DIR/device_check.json is rewritten before and after every step, so a
session cut short keeps the machine and every finished step; the children's output goes to
DIR/device_check.log. Everything written fits the 8 files a device session brings back
(`output_files`).

Without a CUDA device the command refuses and says why; --dry-run prints the plan, runs the steps
that need no GPU (the environment, the performance model) and records the others as skipped.
`benchmarks/device_check.sh` builds the extension and then runs this.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import machine, output, perf_model

TOTAL_SECONDS = 480.0  # 8 minutes from the wrapper's start, the build included (of a 15-minute device budget)
FINAL_RESERVE_S = 10.0  # kept before the deadline for the last device_check.json
GRACE_S = 15.0  # between SIGINT and SIGKILL, inside a step's budget
MIN_STEP_S = 20.0  # a step with less than this left is skipped
SUMMARY = "device_check.json"
LOG = "device_check.log"
MAX_FILES = 8  # what a device session brings back from $OUT
LOG_TAIL_LINES = 40
REFUSED = 2  # the exit status without a CUDA device (and without --dry-run)

Argv = Callable[[Path, float], List[str]]


@dataclass(frozen=True)
class Step:
    """One check: a child process (`argv(out_dir, budget_seconds)`) or an in-process function
    (`function(out_dir, dry_run)` returning a JSON-ready result)."""

    name: str
    purpose: str
    budget_seconds: float
    needs_gpu: bool
    outputs: tuple = ()
    argv: Optional[Argv] = None
    function: Optional[Callable[[Path, bool], Dict]] = None
    min_seconds: float = MIN_STEP_S
    # Why the step cannot run here (None: it can), asked just before it would start.
    unavailable: Callable[[], Optional[str]] = lambda: None

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.function is None):
            raise ValueError(f"step {self.name!r}: give exactly one of argv and function")


def _bench(*args: str) -> List[str]:
    return [sys.executable, "-m", "aepg_kernels.bench", *args]


def _pytest(marker: str, *paths: str) -> List[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-ra",
        "--durations=5",
        "-p",
        "no:cacheprovider",
        "-m",
        marker,
        *paths,
    ]


# The op tests that say most about a first run on a card, run first; the other tests/test_*.py follow.
FIRST_OP_TESTS = ("test_kernel_parity.py", "test_linear.py", "test_edge_cases.py", "test_cross_entropy_parity.py")


def op_test_files(tests_dir: Path = Path("tests")) -> List[str]:
    """The op-level test files (tests/test_*.py), FIRST_OP_TESTS first: with a GPU they run every
    backend on it."""
    first = [tests_dir / name for name in FIRST_OP_TESTS if (tests_dir / name).is_file()]
    rest = sorted(set(tests_dir.glob("test_*.py")) - set(first))
    return [str(path) for path in first + rest]


def gpu_test_files(tests_dir: Path = Path("tests")) -> List[str]:
    """The files that hold GPU-only tests (marked gpu): naming them spares collecting the others."""
    return sorted(str(path) for path in tests_dir.rglob("test_*.py") if "pytest.mark.gpu" in path.read_text())


def no_tests(files: Callable[[], List[str]]) -> Callable[[], Optional[str]]:
    """The `unavailable` check of a pytest step: its files must exist (pytest given no path would
    collect every test)."""

    def why_not() -> Optional[str]:
        if not Path("tests").is_dir():
            return f"no tests/ folder in the working directory {Path.cwd()}"
        return None if files() else f"no test files for it under {Path.cwd() / 'tests'}"

    return why_not


def other_test_dirs(tests_dir: Path = Path("tests")) -> List[str]:
    """The harness, trainer and integration tests (the subfolders of tests/)."""
    return sorted(str(path) for path in tests_dir.iterdir() if path.is_dir() and not path.name.startswith((".", "_")))


SWEEP_STARTUP_S = 25.0  # imports, the machine, the copy bandwidth: before the sweep's own budget counts


def sweep_argv(out: Path, budget: float) -> List[str]:
    return _bench(
        "--suite",
        "gpu",
        "--max-seconds",
        f"{budget - GRACE_S - SWEEP_STARTUP_S:.0f}",
        "--out",
        str(out / "gpu-sweep.json"),
    )


def llm_argv(out: Path, budget: float) -> List[str]:
    """bf16 only and without torch.compile (a fresh compile per case would not fit the budget): ours against eager,
    F.linear_cross_entropy and, when they import, Liger and cut-cross-entropy."""
    return _bench(
        "--suite",
        "llm",
        "--dtypes",
        "bf16",
        "--implementations",
        "eager,F.linear_cross_entropy,aepg,liger,cce",
        "--max-seconds",
        f"{budget - GRACE_S - SWEEP_STARTUP_S:.0f}",
        "--out",
        str(out / "llm.json"),
    )


def environment(out: Path, dry_run: bool) -> Dict:
    """The card, driver, library versions and date (machine.describe), the native build, and
    nvidia-smi's clocks and power limit (the clock the SFU bound of the performance model assumes)."""
    from aepg_kernels.backends import native

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine.describe(device)
    info["native"] = {
        "has_cpu": native.has_cpu_kernels(),
        "has_cuda": native.has_cuda_kernels(),
        "error": None if native.has_cuda_kernels() else native.native_error(),
    }
    info["nvidia_smi"] = nvidia_smi()
    return info


def nvidia_smi() -> Optional[str]:
    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit,persistence_mode"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def performance_model(out: Path, dry_run: bool) -> Dict:
    """perf-model.json: the static model of every GPU-sweep case, with measured / predicted from
    gpu-sweep.json when the sweep ran."""
    sweep = out / "gpu-sweep.json"
    measured = json.loads(sweep.read_text()) if sweep.exists() else None
    document = perf_model.build_document(measured)
    document["markdown"] = perf_model.markdown(document)
    output.write_json(out / "perf-model.json", document)
    lines = perf_model.summary_lines(document)
    print("\n".join(lines), flush=True)
    return {"measured_from": document["measured_from"], "summary": lines}


def plan() -> List[Step]:
    """The steps in priority order: what a session cut short must have brought back comes first."""
    return [
        Step(
            "environment",
            "card, driver, versions, date, native build, clocks",
            15,
            False,
            function=environment,
            min_seconds=5,
        ),
        Step(
            "gpu-tests",
            "the GPU-only tests: CUDA-graph replay, offsets beyond int32, the harness on CUDA",
            40,
            True,
            argv=lambda out, budget: _pytest("gpu", *gpu_test_files()),
            unavailable=no_tests(gpu_test_files),
        ),
        Step(
            "op-tests",
            "every op's tests on the GPU (parity, edge cases, the linear op, compile, bad input)",
            60,
            True,
            argv=lambda out, budget: _pytest("not slow and not gpu", *op_test_files()),
            unavailable=no_tests(op_test_files),
        ),
        Step(
            "gpu-sweep",
            "aepg-bench --suite gpu, its target cases first",
            190,
            True,
            ("gpu-sweep.json", "gpu-sweep.png"),
            argv=sweep_argv,
            min_seconds=GRACE_S + SWEEP_STARTUP_S + 20,
        ),
        Step(
            "perf-model",
            "the static bound of every sweep case, and measured / predicted",
            10,
            False,
            ("perf-model.json",),
            function=performance_model,
            min_seconds=5,
        ),
        Step(
            "llm",
            "aepg-bench --suite llm, bf16: the fused LM head vs eager, F.linear_cross_entropy, Liger",
            45,
            True,
            ("llm.json", "llm.md"),
            argv=llm_argv,
            min_seconds=GRACE_S + SWEEP_STARTUP_S + 5,
        ),
        Step(
            "trainer-step",
            "aepg-bench trainer-step: ViT-B/16 + LoRA, fused vs eager loss",
            45,
            True,
            ("trainer-step.json",),
            argv=lambda out, budget: _bench("trainer-step", "--out", str(out / "trainer-step.json")),
        ),
        Step(
            "other-tests",
            "the harness, trainer and integration tests with a GPU present",
            60,
            True,
            argv=lambda out, budget: _pytest("not slow and not gpu", *other_test_dirs()),
            unavailable=no_tests(other_test_dirs),
        ),
    ]


def output_files(steps: Sequence[Step]) -> List[str]:
    return [SUMMARY, LOG, *[name for step in steps for name in step.outputs]]


def no_gpu_reason() -> Optional[str]:
    """Why torch sees no CUDA device, or None when it sees one."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device "
        f"(torch.cuda.device_count() = {torch.cuda.device_count()})"
    )


def pytest_summary(lines: Sequence[str]) -> Optional[str]:
    """pytest's last count line ('3 failed, 120 passed, 4 skipped in 61.2s'), if it printed one."""
    pattern = re.compile(r"\d+ (passed|failed|error|errors|skipped|deselected|xfailed)\b|no tests ran")
    return next((line.strip(" =") for line in reversed(lines) if pattern.search(line)), None)


def _default_sigint() -> None:
    """In the child before exec: SIGINT to its default. An ignored SIGINT survives exec (a job
    started with `&` or nohup has it ignored), and a Python child then never raises
    KeyboardInterrupt, so the interrupt at the budget would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_child(argv: Sequence[str], budget: float, log_path: Path, grace: float) -> Dict:
    """Runs `argv` in its own process group with its output appended to the log; SIGINT to the
    group when `budget - grace` seconds have passed, SIGKILL `grace` seconds later."""
    start = time.monotonic()
    with log_path.open("ab") as log:
        offset = log.tell()
        process = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint
        )
        ended = "finished"
        try:
            returncode = process.wait(timeout=max(1.0, budget - grace))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            ended = "interrupted at its budget (SIGINT)"
            try:
                returncode = process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                ended = f"killed {grace:.0f} s after SIGINT"
                returncode = process.wait()
    with log_path.open("rb") as log:
        log.seek(offset)
        tail = log.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return {
        "returncode": returncode,
        "ended": ended,
        "seconds": round(time.monotonic() - start, 1),
        "log_tail": tail,
        "pytest": pytest_summary(tail),
    }


def run_step(step: Step, out: Path, budget: float, dry_run: bool) -> Dict:
    """The step's record: status ok / failed / error / timeout, with its result or log tail."""
    log_path = out / LOG
    with log_path.open("a") as log:
        now = datetime.datetime.now(datetime.timezone.utc)
        log.write(f"\n== {step.name} (at most {budget:.0f} s, {now:%H:%M:%S} UTC): {step.purpose}\n")
    if step.function is not None:
        start = time.monotonic()
        try:
            result = step.function(out, dry_run)
            status = "ok"
        except Exception as error:  # noqa: BLE001  (one broken step must not end the session)
            result, status = {"error": f"{type(error).__name__}: {str(error)[:500]}"}, "error"
        return {"status": status, "seconds": round(time.monotonic() - start, 1), "result": result}
    assert step.argv is not None  # __post_init__: a step without a function has argv
    argv = step.argv(out, budget)
    shown = ["python", *argv[1:]] if argv[0] == sys.executable else argv
    record = {"command": " ".join(shown), **run_child(argv, budget, log_path, GRACE_S)}
    if record["ended"] != "finished":
        record["status"] = "timeout"
    else:
        record["status"] = "ok" if record["returncode"] == 0 else "failed"
    return record


def skip_reason(step: Step, left: float, dry_run: bool) -> Optional[str]:
    if dry_run and step.needs_gpu:
        return "dry run: needs a CUDA device"
    if left < step.min_seconds:
        return f"{max(left, 0):.0f} s left before the deadline, {step.min_seconds:.0f} s needed"
    return step.unavailable()


def run_plan(steps: Sequence[Step], out: Path, document: Dict, deadline: float, dry_run: bool) -> Dict:
    """Every step in order, each within min(its budget, what the deadline leaves); the summary is
    rewritten before each step (the step 'running') and after it."""
    summary = out / SUMMARY
    for step in steps:
        left = deadline - time.time() - FINAL_RESERVE_S
        budget = min(step.budget_seconds, left)
        entry = {"name": step.name, "budget_seconds": round(max(budget, 0), 1)}
        document["steps"].append(entry)
        why_not = skip_reason(step, left, dry_run)
        if why_not is not None:
            entry.update(status="skipped", reason=why_not)
            print(f"-- {step.name}: skipped ({why_not})", flush=True)
            continue
        entry["status"] = "running"
        output.write_json(summary, document)
        print(f"-- {step.name} (at most {budget:.0f} s): {step.purpose}", flush=True)
        entry.update(run_step(step, out, budget, dry_run))
        if step.name == "environment" and entry["status"] == "ok":
            document["machine"] = entry.pop("result")
        print(
            f"   {step.name}: {entry['status']} in {entry['seconds']} s"
            + (f" ({entry['pytest']})" if entry.get("pytest") else ""),
            flush=True,
        )
        output.write_json(summary, document)
    return document


def describe_plan(steps: Sequence[Step], total_seconds: float) -> List[str]:
    lines = [
        f"device-check plan: {len(steps)} steps by a deadline {total_seconds:.0f} s after the start "
        f"(SIGINT at a step's budget less {GRACE_S:.0f} s, SIGKILL at its budget)"
    ]
    for index, step in enumerate(steps, 1):
        where = "GPU" if step.needs_gpu else "any machine"
        files = f" -> {', '.join(step.outputs)}" if step.outputs else ""
        lines.append(f"{index}. {step.name:<13} at most {step.budget_seconds:>4.0f} s  [{where}] {step.purpose}{files}")
    return lines


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="aepg-bench device-check", description=__doc__.splitlines()[0])
    result.add_argument("--out", type=Path, default=Path("."), help="the folder for every file (default: here)")
    result.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, run the steps that need no GPU, record the others as skipped",
    )
    result.add_argument(
        "--total-seconds",
        type=float,
        default=TOTAL_SECONDS,
        help=f"the deadline after --started-at (default {TOTAL_SECONDS:.0f})",
    )
    result.add_argument(
        "--started-at",
        type=float,
        default=None,
        help="the session's start, seconds since the epoch (the wrapper's, so the build counts)",
    )
    result.add_argument("--build-returncode", type=int, default=None, help="the wrapper's build result, recorded")
    return result


def new_document(args, argv: Sequence[str], steps: Sequence[Step], started_at: float) -> Dict:
    start = datetime.datetime.fromtimestamp(started_at, datetime.timezone.utc)
    return {
        "command": "aepg-bench device-check",
        "argv": list(argv),
        "dry_run": args.dry_run,
        "complete": False,
        "started_at": start.isoformat(timespec="seconds"),
        "total_seconds": args.total_seconds,
        "build": {"returncode": args.build_returncode, "log": LOG},
        "plan": [
            {
                "name": s.name,
                "purpose": s.purpose,
                "budget_seconds": s.budget_seconds,
                "needs_gpu": s.needs_gpu,
                "outputs": list(s.outputs),
            }
            for s in steps
        ],
        "files": output_files(steps),
        "machine": None,
        "steps": [],
    }


def exit_code(document: Dict) -> int:
    """1 when a step failed or raised; a step cut by its budget or skipped is recorded, not a failure."""
    return int(any(step["status"] in ("failed", "error") for step in document["steps"]))


def main(argv: Optional[Sequence[str]] = None, steps: Optional[Sequence[Step]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    steps = plan() if steps is None else list(steps)
    started_at = time.time() if args.started_at is None else args.started_at
    args.out.mkdir(parents=True, exist_ok=True)
    document = new_document(args, argv, steps, started_at)
    print("\n".join(describe_plan(steps, args.total_seconds)), flush=True)
    reason = no_gpu_reason()
    if reason is not None and not args.dry_run:
        document["refused"] = f"no CUDA device: {reason}"
        output.write_json(args.out / SUMMARY, document)
        print(
            f"aepg-bench device-check: refused, {document['refused']}; --dry-run prints the plan and runs the "
            "steps that need no GPU",
            file=sys.stderr,
        )
        return REFUSED
    run_plan(steps, args.out, document, started_at + args.total_seconds, args.dry_run)
    document["complete"] = True
    document["total_elapsed_seconds"] = round(time.time() - started_at, 1)
    print(f"wrote {output.write_json(args.out / SUMMARY, document)}")
    return exit_code(document)
