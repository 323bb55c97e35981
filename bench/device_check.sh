#!/usr/bin/env bash
# The GPU check for a lent device machine (see ../shared/docs/machines.md and bench/README.md):
# builds the extension for sm_90 only, runs the test suite on the GPU (cuda and triton backends,
# GPU-only tests included), the GPU benchmark sweep (every implementation checked against eager
# before it is timed) and the trainer-step benchmark, within BENCH_TOTAL_S seconds (default 450: under 8 minutes on an H100). Writes under
# $OUT (default ./out), at most 8 files as the device tool brings back:
#   device_check.json  card, driver, torch/triton versions, date, return codes, test and bench tails
#   pytest.xml         the test report
#   checks.log         build and test output
#   bench.log          the benchmark tables
#   gpu-sweep.json/.png  aepg-bench --suite gpu (written after every case: a cut-short run keeps its numbers)
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
TOTAL_S=${BENCH_TOTAL_S:-450}   # the whole script; each stage gets at most what the later ones leave it
TESTS_S=${TESTS_S:-150}         # the test suite is interrupted (SIGINT: pytest still reports) after this at most
SWEEP_MIN_S=120                 # the sweep's share at least (its cases are ordered by priority)
TRAINER_S=${TRAINER_S:-90}      # trainer-step after the sweep
MARGIN_S=30                     # a sweep case that starts just before its budget may run over it
LOG="$OUT/checks.log"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if compgen -G ".whl/liger_kernel-*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl >> "$LOG" 2>&1 \
    || echo "liger wheel install failed (the benchmark runs without Liger)" >> "$LOG"
fi
echo "== build" >> "$LOG"
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >> "$LOG" 2>&1
build_s=$(elapsed)
tests_s=$(( TOTAL_S - $(elapsed) - SWEEP_MIN_S - TRAINER_S - MARGIN_S ))
(( tests_s > TESTS_S )) && tests_s=$TESTS_S
(( tests_s < 30 )) && tests_s=30
echo "== tests (at most ${tests_s}s, after a ${build_s}s build)" >> "$LOG"
timeout -s INT -k 20 "$tests_s" "$PY" -m pytest -q -ra --junitxml="$OUT/pytest.xml" tests > "$OUT/pytest.tmp" 2>&1
tests_rc=$?
cat "$OUT/pytest.tmp" >> "$LOG"

sweep_s=$(( TOTAL_S - $(elapsed) - TRAINER_S - MARGIN_S ))
(( sweep_s < 60 )) && sweep_s=60   # past the total by now (a slow build): still measure the targets
echo "== aepg-bench --suite gpu --max-seconds $sweep_s (at $(elapsed)s)" >> "$OUT/bench.log"
timeout -s INT -k 20 $(( sweep_s + MARGIN_S + 60 )) "$PY" -m aepg_kernels.bench --suite gpu --max-seconds "$sweep_s" \
  --out "$OUT/gpu-sweep.json" >> "$OUT/bench.log" 2>&1
sweep_rc=$?
echo "== aepg-bench trainer-step (at $(elapsed)s)" >> "$OUT/bench.log"
timeout -k 10 "$TRAINER_S" "$PY" -m aepg_kernels.bench trainer-step --out "$OUT/trainer-step.json" \
  >> "$OUT/bench.log" 2>&1
trainer_rc=$?
echo "== done at $(elapsed)s" >> "$OUT/bench.log"

"$PY" - "$OUT" "$build_s" "$tests_rc" "$sweep_rc" "$trainer_rc" "$(elapsed)" <<'PYEOF'
import datetime, json, subprocess, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
build_s, tests_rc, sweep_rc, trainer_rc, total_s = map(int, sys.argv[2:])
import aepg_kernels as ak
from aepg_kernels import _native
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.strip()
def tail(name, lines=40):
    path = out / name
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
    "native": {"has_cpu": _native.has_cpu_kernels(), "has_cuda": _native.has_cuda_kernels(),
               "error": None if _native.has_cuda_kernels() else _native.native_error()},
    "available_backends": list(ak.available_backends()),
    "build_seconds": build_s, "total_seconds": total_s,
    "tests_returncode": tests_rc, "tests_tail": tail("pytest.tmp"),
    "sweep_returncode": sweep_rc, "trainer_step_returncode": trainer_rc, "bench_tail": tail("bench.log", 60),
}
(out / "device_check.json").write_text(json.dumps(result, indent=2) + "\n")
(out / "pytest.tmp").unlink(missing_ok=True)
print(json.dumps({k: result[k] for k in ("card", "available_backends", "tests_returncode", "sweep_returncode",
                                         "trainer_step_returncode", "total_seconds")}))
PYEOF
