#!/usr/bin/env bash
# The GPU check for a GPU session (see bench/README.md):
# builds the extension for sm_90 only, runs the test suite on the GPU (GPU-only tests first, then
# the rest without the slow CPU demo), the GPU benchmark sweep (every implementation checked
# against eager before it is timed; the performance targets first) and the trainer-step benchmark.
# Everything ends by one deadline, BENCH_TOTAL_S seconds after the start (default 450, build
# included): each stage's timeout, its kill grace included, is what the deadline leaves after
# the later stages' shares and FINAL_S for the last summary.
# Writes under $OUT (default ./out) 7 files (the device tool brings back at most 8):
#   device_check.json  machine (aepg_kernels.bench.machine.describe), native build, return codes,
#                      log tails; written after the build and again at the end
#   pytest.xml         the report of the main test run
#   checks.log         build and test output
#   bench.log          the benchmark tables
#   gpu-sweep.json/.png  aepg-bench --suite gpu (rewritten after every case and on SIGINT)
#   trainer-step.json  aepg-bench trainer-step (ViT-B/16 + LoRA, batch 256, 100 and 21843 classes)
# A Liger-Kernel wheel carried in .whl/ (see bench/README.md) is installed first, for the CE baseline.
# Usage (device tool): bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
LOG="$OUT/checks.log"
BENCH_LOG="$OUT/bench.log"

TOTAL_S=${BENCH_TOTAL_S:-450}  # the one deadline, from the start
FINAL_S=20        # kept for the final device_check.json
GRACE_S=15        # SIGINT (runs write what they measured), SIGKILL this much later: inside each share
SUMMARY_S=15      # the early device_check.json
BUILD_S=150       # the build at most (expected 60-120 s)
TESTS_S=100       # the tests at most (GPU-only tests, then -m "not slow")
GPU_TESTS_S=45    # of which the GPU-only tests at most
SWEEP_MIN_S=200   # the sweep at least: its target cases come first and fit in this
SWEEP_START_S=25  # the sweep's start-up (imports, machine, copy bandwidth) before its budget counts
TRAINER_S=60      # trainer-step: what is left after the sweep, this much is kept for it
MIN_STAGE_S=25    # a stage with less than this left is skipped (and recorded so)
start=$(date +%s)
deadline=$(( start + TOTAL_S ))
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( deadline - FINAL_S - $(date +%s) )); }  # seconds for the stages still to run
min() { if (( $1 < $2 )); then echo "$1"; else echo "$2"; fi; }
# bounded SECONDS CMD...: SIGINT after SECONDS - GRACE_S, SIGKILL at SECONDS (exit 124 or 137 then).
bounded() {
  local seconds=$(( $1 - GRACE_S )); shift
  (( seconds < 1 )) && seconds=1  # timeout 0 would mean no limit
  timeout -s INT -k "$GRACE_S" "$seconds" "$@"
}

build_rc=pending gpu_tests_rc=pending tests_rc=pending sweep_rc=pending trainer_rc=pending build_s=0

summary() {  # device_check.json (atomically) from the stages so far; $1: its time limit, 5 s grace included
  timeout -k 5 $(( $1 > 10 ? $1 - 5 : 5 )) "$PY" - "$OUT" "$(elapsed)" "$build_s" "$build_rc" "$gpu_tests_rc" "$tests_rc" "$sweep_rc" \
    "$trainer_rc" <<'PYEOF'
import json, os, sys
from pathlib import Path

import torch

from aepg_kernels import _native
from aepg_kernels.bench import machine

out = Path(sys.argv[1])
names = ("build", "gpu_tests", "tests", "sweep", "trainer_step")
codes = {name: int(v) if v.lstrip("-").isdigit() else v for name, v in zip(names, sys.argv[4:9], strict=True)}


def tail(name, lines):
    path = out / name
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


result = {
    "machine": machine.describe(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    "native": {"has_cpu": _native.has_cpu_kernels(), "has_cuda": _native.has_cuda_kernels(),
               "error": None if _native.has_cuda_kernels() else _native.native_error()},
    "total_seconds": int(sys.argv[2]), "build_seconds": int(sys.argv[3]),
    "returncodes": codes,  # 124: cut by its time limit (SIGINT), 137: killed after the grace
    "checks_tail": tail("checks.log", 50), "bench_tail": tail("bench.log", 60),
}
tmp = out / "device_check.json.tmp"
tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
os.replace(tmp, out / "device_check.json")
print(json.dumps({"card": result["machine"].get("card"), "backends": result["machine"]["available_backends"],
                  "returncodes": codes, "total_seconds": result["total_seconds"]}))
PYEOF
}

# -- build (the Liger wheel install counts in it)
budget=$(min "$BUILD_S" $(( $(left) - SUMMARY_S - MIN_STAGE_S - SWEEP_MIN_S - TRAINER_S )))
echo "== build (at most ${budget}s)" >> "$LOG"
if compgen -G ".whl/liger_kernel-*.whl" > /dev/null; then
  timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl >> "$LOG" 2>&1 \
    || echo "liger wheel install failed (the benchmark runs without Liger)" >> "$LOG"
fi
bounded $(( budget - $(elapsed) )) "$PY" -m pip install -q --no-build-isolation --no-deps -e . >> "$LOG" 2>&1
build_rc=$?
build_s=$(elapsed)
summary "$SUMMARY_S"   # early: a kill later still leaves the machine and the build's result

# -- tests: the GPU-only ones first (a cut run still has them), then the rest without the slow CPU demo
budget=$(min "$TESTS_S" $(( $(left) - SWEEP_MIN_S - TRAINER_S )))
if (( budget >= MIN_STAGE_S )); then
  tests_end=$(( $(date +%s) + budget ))
  gpu_budget=$(min "$GPU_TESTS_S" "$budget")
  echo "== GPU-only tests (at most ${gpu_budget}s, at $(elapsed)s)" >> "$LOG"
  bounded "$gpu_budget" "$PY" -m pytest -q -ra -m gpu tests >> "$LOG" 2>&1
  gpu_tests_rc=$?
  budget=$(( tests_end - $(date +%s) ))
  if (( budget >= MIN_STAGE_S )); then
    echo "== tests -m 'not slow and not gpu' (at most ${budget}s, at $(elapsed)s)" >> "$LOG"
    bounded "$budget" "$PY" -m pytest -q -ra -m "not slow and not gpu" --junitxml="$OUT/pytest.xml" tests \
      >> "$LOG" 2>&1
    tests_rc=$?
  else
    tests_rc="skipped: ${budget}s left"
    echo "== tests: $tests_rc" >> "$LOG"
  fi
else
  gpu_tests_rc="skipped: ${budget}s left" tests_rc="skipped: ${budget}s left"
  echo "== tests: $tests_rc" >> "$LOG"
fi

# -- the sweep: all but the trainer's share; --max-seconds stops starting cases in time, SIGINT
#    cuts a case that runs over (the JSON and the PNG are written then too)
budget=$(( $(left) - TRAINER_S ))
if (( budget >= MIN_STAGE_S + SWEEP_START_S + GRACE_S )); then
  max_seconds=$(( budget - GRACE_S - SWEEP_START_S ))
  echo "== aepg-bench --suite gpu --max-seconds $max_seconds (at most ${budget}s, at $(elapsed)s)" >> "$BENCH_LOG"
  bounded "$budget" "$PY" -m aepg_kernels.bench --suite gpu --max-seconds "$max_seconds" \
    --out "$OUT/gpu-sweep.json" >> "$BENCH_LOG" 2>&1
  sweep_rc=$?
else
  sweep_rc="skipped: ${budget}s left"
  echo "== sweep: $sweep_rc" >> "$BENCH_LOG"
fi

# -- trainer-step: what is left
budget=$(left)
if (( budget >= MIN_STAGE_S )); then
  echo "== aepg-bench trainer-step (at most ${budget}s, at $(elapsed)s)" >> "$BENCH_LOG"
  bounded "$budget" "$PY" -m aepg_kernels.bench trainer-step --out "$OUT/trainer-step.json" >> "$BENCH_LOG" 2>&1
  trainer_rc=$?
else
  trainer_rc="skipped: ${budget}s left"
  echo "== trainer-step: $trainer_rc" >> "$BENCH_LOG"
fi
echo "== done at $(elapsed)s" >> "$BENCH_LOG"
summary $(( deadline - $(date +%s) ))
