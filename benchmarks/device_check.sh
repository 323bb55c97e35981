#!/usr/bin/env bash
# A GPU session (benchmarks/README.md): build the extension for sm_90, then `aepg-bench device-check`,
# which runs the checks most important first by one deadline (the build counts in it) and writes
# device_check.json after every step, under $OUT (default ./out).
# Usage (device tool): run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
start=$(date +%s)
{
  for wheel in .whl/liger_kernel-*.whl; do  # the CE baseline, when carried
    [[ -e $wheel ]] && timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile "$wheel"
  done
  timeout -k 10 150 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
} > "$OUT/device_check.log" 2>&1
build_rc=$?
exec "$PY" -m aepg_kernels.bench device-check --out "$OUT" --started-at "$start" --build-returncode "$build_rc" "$@"
