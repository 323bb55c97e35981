#!/usr/bin/env bash
# The GPU check for a lent device machine (see ../shared/docs/machines.md): builds the extension
# for sm_90 only, runs the whole test suite on the GPU (cuda and triton backends, GPU-only tests
# included) and the quickcheck timings, and writes JSON under $OUT (default ./out):
#   device_check.json  card, driver, torch/triton versions, date, test summary, quickcheck output
#   pytest.xml         the test report
# Usage (device tool): bash bench/device_check.sh     (one run of roughly 5-8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 TRITON_INTERPRET=0
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}

start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
build_s=$(( $(date +%s) - start ))
"$PY" -m pytest -q -ra -x --junitxml="$OUT/pytest.xml" tests > "$OUT/pytest.log" 2>&1
tests_rc=$?
"$PY" -m aepg_kernels.quickcheck > "$OUT/quickcheck.log" 2>&1
quick_rc=$?

"$PY" - "$OUT" "$build_s" "$tests_rc" "$quick_rc" <<'PYEOF'
import datetime, json, subprocess, sys
from pathlib import Path
import torch
out, build_s, tests_rc, quick_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import aepg_kernels as ak
from aepg_kernels import _native
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.strip()
tail = lambda name: (out / name).read_text().splitlines()[-40:] if (out / name).exists() else []
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
    "native": {"has_cpu": _native.has_cpu_kernels(), "has_cuda": _native.has_cuda_kernels(),
               "error": None if _native.has_cuda_kernels() else _native.native_error()},
    "available_backends": list(ak.available_backends()),
    "build_seconds": build_s, "tests_returncode": tests_rc, "tests_tail": tail("pytest.log"),
    "quickcheck_returncode": quick_rc, "quickcheck": tail("quickcheck.log"),
}
(out / "device_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("card", "available_backends", "tests_returncode")}))
PYEOF
