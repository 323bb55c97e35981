"""CPU benchmark of the native kernels, side by side in one run: forward + backward of aEPG
(alpha = 0.5) with an entropy term (beta = 0.1), fp32, through the eager composite
(backend="eager"), torch.compile of that composite, and the native CPU kernels (backend="cpu").

    .venv/bin/python bench/cpu_native.py [--shapes 256x100,4096x1000] [--threads 2,1] [--repeats 20] [--out PATH]

Prints median milliseconds and the speed-up over eager; writes JSON (with the machine and its load
average: on a shared machine other processes slow every variant, the ratios measured side by side
stay comparable; the one-thread run is the least sensitive to a core taken by another process) to
bench/results/cpu-<date>.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import aepg_kernels as ak
from aepg_kernels import _native

SHAPES = [(256, 100), (256, 1000), (4096, 1000), (8192, 32000)]
LARGE = 8192 * 32000  # shapes this big get fewer repeats (eager needs seconds and ~5x the logits' memory)


def loss_fn(backend):
    def fn(x, y):
        return ak.aepg_loss(x, y, 0.5, entropy_weight=0.1, backend=backend)
    return fn


def time_fwd_bwd(fn, x, y, repeats, warmup):
    times = []
    for i in range(warmup + repeats):
        x.grad = None
        start = time.perf_counter()
        fn(x, y).backward()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed * 1e3)
    return statistics.median(times)


def run_shape(shape, variants, repeats):
    n, c = map(int, shape.split("x"))
    torch.manual_seed(0)
    x = torch.randn(n, c, requires_grad=True)
    y = torch.randint(0, c, (n,))
    repeats, warmup = (3, 1) if n * c >= LARGE else (repeats, 3)
    row = {"n": n, "c": c, "dtype": "float32", "repeats": repeats}
    grads = {}
    for name, fn in variants.items():
        row[f"{name}_ms"] = round(time_fwd_bwd(fn, x, y, repeats, warmup), 3)
        grads[name] = x.grad
        x.grad = None
    diff = (grads["native_cpu"] - grads["eager"]).abs().max().item()
    row["max_abs_grad_diff_vs_eager"] = diff
    for name in ("compile", "native_cpu"):
        row[f"{name}_speedup"] = round(row["eager_ms"] / row[f"{name}_ms"], 2)
    print(f"{n:>6}x{c:<6} eager {row['eager_ms']:9.3f} ms | compile {row['compile_ms']:9.3f} ms "
          f"({row['compile_speedup']:5.2f}x) | native cpu {row['native_cpu_ms']:9.3f} ms "
          f"({row['native_cpu_speedup']:5.2f}x)  max|dgrad| {diff:.1e}", flush=True)
    return row


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{n}x{c}" for n, c in SHAPES))
    parser.add_argument("--threads", default=f"{torch.get_num_threads()},1", help="intra-op thread counts to run")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not _native.has_cpu_kernels():
        raise SystemExit(f"backend 'cpu' unavailable: {_native.native_error()}")

    runs = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        torch._dynamo.reset()  # Inductor bakes the thread count into its kernels: compile afresh
        variants = {"eager": loss_fn("eager"), "compile": torch.compile(loss_fn("eager"), fullgraph=True),
                    "native_cpu": loss_fn("cpu")}
        print(f"{threads} thread(s)")
        runs.append({"threads": threads, "results": [run_shape(shape, variants, args.repeats)
                                                     for shape in args.shapes.split(",")]})

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "fwd+bwd aEPG alpha=0.5 entropy_weight=0.1 fp32, median ms",
        "date": now.isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "native_cpu_capability": _native._C.cpu_capability(),
                    "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]},
        "runs": runs,
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"cpu-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
