"""What the compiler says about every kernel for sm_90, without a GPU: registers per thread, spills,
local memory (the stack frame), shared memory, 16-byte loads, and the occupancy all of that allows
at the launch configuration the launchers pick.

Triton: each kernel variant the launcher (backends/triton/launch.py) uses is compiled ahead of time
for sm_90 (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, as the codegen tests
do) with the alignment specialisation Triton's JIT applies at launch (pointers and integer
arguments divisible by 16 get `tt.divisibility`), and its PTX goes through `ptxas -v` with the
ptxas and flags Triton itself uses for the cubin it runs (its bundled ptxas, --gpu-name=sm_90a,
--regAllocOptLevel=2). Dynamic shared memory is Triton's `metadata.shared`.

CUDA: csrc/cuda/policy_loss_cuda.cu alone through `nvcc -cubin -arch=sm_90 --resource-usage --keep`
with setup.py's flags and include paths (every template instantiation is reported; the kept PTX
gives the vector loads); names demangled with c++filt.

Both results are cached (JSON) under build/resources-cache of the checkout, keyed by a hash of the
sources, the compiler versions and this file, so the tests recompile only when something changed.

    aepg-bench --suite resources [--out FILE.json]
    python -m aepg_kernels.bench.resources --triton-json FILE   (the child that compiles when the
                                                                 parent runs under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from aepg_kernels import utils

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CHECKOUT = PACKAGE_DIR.parent
CUDA_SOURCE = "csrc/cuda/policy_loss_cuda.cu"
LOW_PRECISION = ("fp32", "bf16", "fp16")  # the dtypes whose variants must not spill (fp64 is for gradcheck)
CACHE_VERSION = 2  # bump when what a cached record holds changes

# ---- occupancy on sm_90 -----------------------------------------------------------------------


@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of compute capability 9.0 (H100 / H200): CUDA C++ Programming Guide, "Compute
    Capabilities" table, and the Hopper tuning guide (228 KiB shared memory per SM, up to 227 KiB
    per block, 1 KiB of it reserved by the system per block)."""

    name: str = "sm_90"
    registers_per_sm: int = 65536
    registers_per_block: int = 65536
    register_granularity: int = 256  # registers are allocated per warp, in units of 256
    max_registers_per_thread: int = 255
    sub_partitions: int = 4  # the register file is split over 4 SM sub-partitions
    shared_per_sm: int = 228 * 1024
    max_shared_per_block: int = 227 * 1024
    reserved_shared_per_block: int = 1024
    shared_granularity: int = 128
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    warp_size: int = 32

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // self.warp_size


SM90 = SmLimits()


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(registers: int, threads: int, shared_bytes: int = 0, limits: SmLimits = SM90) -> Dict[str, object]:
    """Resident blocks and warps per SM for a kernel using `registers` per thread, `threads` per block
    and `shared_bytes` of shared memory per block (static + dynamic), and what limits them.

    The rules are NVIDIA's occupancy calculation as the CUDA Occupancy Calculator and the toolkit's
    cuda_occupancy.h describe it (written here from those rules): a warp's registers are rounded up
    to the allocation unit; registers are granted per sub-partition, so the warps that fit are
    (registers per SM / sub-partitions) // registers per warp, times the sub-partitions; a block's
    shared memory is its own plus the per-block reservation, rounded up to the allocation unit; the
    resident blocks are the least of the thread, block, register and shared-memory limits."""
    if threads < 1 or threads > limits.max_threads_per_block:
        raise ValueError(f"threads per block must be 1..{limits.max_threads_per_block}, got {threads}")
    warps = -(-threads // limits.warp_size)
    by = {"threads": limits.max_warps_per_sm // warps, "blocks": limits.max_blocks_per_sm}
    regs_per_warp = _round_up(max(registers, 1) * limits.warp_size, limits.register_granularity)
    if (
        registers > limits.max_registers_per_thread
        or regs_per_warp * _round_up(warps, limits.sub_partitions) > limits.registers_per_block
    ):
        by["registers"] = 0
    else:
        warps_by_regs = (limits.registers_per_sm // limits.sub_partitions) // regs_per_warp * limits.sub_partitions
        by["registers"] = warps_by_regs // warps
    shared = _round_up(shared_bytes + limits.reserved_shared_per_block, limits.shared_granularity)
    by["shared"] = 0 if shared_bytes > limits.max_shared_per_block else limits.shared_per_sm // shared
    limiter = min(by, key=lambda name: (by[name], name != "threads"))  # ties: say "threads" (the ideal)
    blocks = by[limiter]
    return {
        "threads_per_block": threads,
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy_percent": round(100.0 * blocks * warps / limits.max_warps_per_sm, 1),
        "limiter": limiter,
        "limits_blocks_per_sm": by,
    }


# ---- ptxas and PTX parsing --------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CUMULATIVE = re.compile(r"(\d+) bytes cumulative stack size")
VECTOR_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*\.v([24])\.")
GLOBAL_LOAD = re.compile(r"\bld\.global\.")


def parse_ptxas(text: str) -> Dict[str, Dict[str, int]]:
    """{entry name: registers, spill_stores, spill_loads, stack_frame, cumulative_stack, static_shared}
    from ptxas -v (or nvcc --resource-usage) output."""
    result: Dict[str, Dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        match = _ENTRY.search(line)
        if match:
            current = result.setdefault(
                match.group(1),
                dict(registers=0, spill_stores=0, spill_loads=0, stack_frame=0, cumulative_stack=0, static_shared=0),
            )
            continue
        if current is None:
            continue
        match = _PROPS.search(line)
        if match:
            current.update(
                stack_frame=int(match.group(1)), spill_stores=int(match.group(2)), spill_loads=int(match.group(3))
            )
        match = _USED.search(line)
        if match:
            current["registers"] = int(match.group(1))
            smem, cumulative = _SMEM.search(line), _CUMULATIVE.search(line)
            current["static_shared"] = int(smem.group(1)) if smem else 0
            current["cumulative_stack"] = int(cumulative.group(1)) if cumulative else 0
    return result


def ptx_loads(ptx: str) -> Dict[str, int]:
    """Counts of global loads in PTX text: 16-byte-or-wider vectors (.v4), 8-byte (.v2), scalars."""
    vectors = [m.group(1) for m in VECTOR_LOAD.finditer(ptx)]
    return {"v4": vectors.count("4"), "v2": vectors.count("2"), "scalar": len(GLOBAL_LOAD.findall(ptx)) - len(vectors)}


def ptx_entries(ptx: str) -> Dict[str, str]:
    """{entry name: its PTX body} of a PTX module."""
    entries = {}
    for match in re.finditer(r"\.entry\s+([\w$]+)\s*\(", ptx):
        end = ptx.find("\n}", match.end())
        entries[match.group(1)] = ptx[match.start() : end if end >= 0 else len(ptx)]
    return entries


# ---- cache ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """AEPG_RESOURCES_CACHE, else build/resources-cache of the checkout, else ~/.cache."""
    if os.environ.get("AEPG_RESOURCES_CACHE"):
        return Path(os.environ["AEPG_RESOURCES_CACHE"])
    if (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT / "build" / "resources-cache"
    return Path.home() / ".cache" / "aepg_kernels" / "resources"


def _digest(parts: Sequence[object]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _tool_version(path: Optional[str]) -> str:
    if not path:
        return "missing"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except OSError:
        return "missing"
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"


def _cached(kind: str, key: str, compute, refresh: bool = False) -> Dict:
    path = cache_dir() / f"{kind}-{key}.json"
    if path.is_file() and not refresh:
        document = json.loads(path.read_text())
        document["cached"] = True
        return document
    start = time.monotonic()
    document = compute()
    document.update(cache_key=key, compile_seconds=round(time.monotonic() - start, 1))
    utils.write_json(path, document, kind)
    document["cached"] = False
    return document


def _finish(record: Dict) -> Dict:
    """Adds the occupancy at the record's threads per block and shared memory."""
    record["shared_bytes"] = record["static_shared"] + record.get("dynamic_shared", 0)
    record.update(occupancy(record["registers"], record["threads_per_block"], record["shared_bytes"]))
    return record


# ---- Triton variants --------------------------------------------------------------------------
# Argument types of the Triton kernels by name: "X" the logits' dtype, "A" the accumulation dtype.
POINTERS = dict(
    x_ptr="X",
    q_ptr="X",
    grad_ptr="X",
    y_ptr="i64",
    w_ptr="fp32",
    w_total_ptr="fp32",
    a_ptr="fp32",
    b_ptr="fp32",
    denom_ptr="fp32",
    loss_ptr="A",
    stats_ptr="A",
    g_ptr="X",
    row_loss_ptr="A",
    denom_out_ptr="A",
    out_ptr="X",
)
SCALARS = dict(
    a_value="fp64",
    b_value="fp64",
    beta="fp64",
    eps="fp64",
    gamma="fp64",
    ignore_index="i64",
    x_stride="i64",
    q_stride="i64",
    grad_stride="i64",
    g_stride="i64",
    n_rows="i32",
    n_cols="i32",
    numel="i64",
)
FWD_FLAGS = [
    "PROB_TARGET",
    "HAS_WEIGHT",
    "SMOOTHING",
    "FOCAL",
    "ENTROPY",
    "A_FROM_PTR",
    "B_FROM_PTR",
    "B_ONE_MINUS_A",
    "MEAN",
]
BWD_FLAGS = [
    "PROB_TARGET",
    "HAS_WEIGHT",
    "SMOOTHING",
    "ENTROPY_TERM",
    "A_FROM_PTR",
    "B_FROM_PTR",
    "B_ONE_MINUS_A",
    "MEAN",
]
TRITON_DTYPES = ("fp32", "bf16", "fp16", "fp64")
# Flag sets reported: CE as nn.CrossEntropyLoss() calls it, and the most work one row can carry
# (probability targets, class weights, smoothing, entropy term, aEPG with a tensor alpha), the
# variant with the most live values per element. FOCAL excludes PROB_TARGET.
PRESETS = {
    "ce": dict(MEAN=True),
    "max": dict(
        PROB_TARGET=True,
        HAS_WEIGHT=True,
        SMOOTHING=True,
        ENTROPY=True,
        ENTROPY_TERM=True,
        A_FROM_PTR=True,
        B_ONE_MINUS_A=True,
        MEAN=True,
    ),
}
# One C per tile regime of launch._tiling (N large): BLOCK_C 16 (64 rows), 128 (32 rows, aligned), 1024
# (4 rows; C = 1000 is the unaligned classification case), 4096 (1 row), 16384 (1 row, 8 warps),
# and the streamed path (C > 16384). Every on-chip C from 64 to 8192 holds 32 elements per thread
# at 4 warps (8192: 8 warps), 16384 holds 64: the sample spans the per-thread register load.
TRITON_COLUMNS = (10, 128, 1000, 4096, 16384, 32000)
TRITON_ROWS = 65536
BANDWIDTH_BOUND = (
    "policy_loss_fwd_kernel",
    "policy_loss_bwd_kernel",
    "scale_grad_kernel",
    "forward_on_chip_kernel",
    "forward_streamed_kernel",
    "backward_kernel",
    "scale_kernel",
)


@dataclass
class TritonVariant:
    kernel: str
    dtype: str
    preset: str
    regime: str
    constexprs: Dict[str, object]
    num_warps: int
    values: Dict[str, int] = field(default_factory=dict)  # integer arguments' values (alignment)

    @property
    def label(self) -> str:
        shape = ", ".join(f"{k}={self.constexprs[k]}" for k in ("BLOCK_R", "BLOCK_C", "BLOCK") if k in self.constexprs)
        extra = ", WRITE_GRAD" if self.constexprs.get("WRITE_GRAD") else ""
        return f"{self.kernel} [{self.preset}] {self.regime} ({shape}{extra}, {self.num_warps} warps)"

    @property
    def aligned(self) -> bool:
        """Every row starts on a 16-element boundary (Triton sees tt.divisibility on the strides)."""
        return all(v % 16 == 0 for k, v in self.values.items() if k in ("x_stride", "n_cols", "numel"))


def _flags(names, preset: str) -> Dict[str, bool]:
    return {name: bool(PRESETS[preset].get(name, False)) for name in names}


def triton_variants() -> List[TritonVariant]:
    """The variants the launcher picks for TRITON_COLUMNS x TRITON_DTYPES x PRESETS, deduplicated;
    the tile sizes and warps come from launch.py itself."""
    from ..backends.triton import launch

    config = launch.CONFIG
    variants: List[TritonVariant] = []
    for dtype in TRITON_DTYPES:
        for preset in PRESETS if dtype != "fp64" else ("ce",):  # fp64 (gradcheck only): CE alone
            for c in TRITON_COLUMNS:
                block_r, block_c, num_warps = launch._tiling(TRITON_ROWS, c)
                on_chip = launch.fits_on_chip(c)
                regime = f"C={c}"
                values = dict(
                    x_stride=c,
                    q_stride=c if PRESETS[preset].get("PROB_TARGET") else 0,
                    grad_stride=c if on_chip else 0,
                    n_rows=TRITON_ROWS,
                    n_cols=c,
                )
                fwd = dict(
                    _flags(FWD_FLAGS, preset),
                    BLOCK_R=block_r,
                    BLOCK_C=block_c,
                    ONE_TILE=on_chip,
                    ENTROPY_TERM=bool(PRESETS[preset].get("ENTROPY_TERM")),
                    WRITE_GRAD=on_chip,
                )
                variants.append(TritonVariant("policy_loss_fwd_kernel", dtype, preset, regime, fwd, num_warps, values))
                bwd = dict(_flags(BWD_FLAGS, preset), BLOCK_R=block_r, BLOCK_C=min(block_c, config.chunk_cols))
                variants.append(
                    TritonVariant(
                        "policy_loss_bwd_kernel",
                        dtype,
                        preset,
                        regime,
                        bwd,
                        num_warps,
                        dict(values, grad_stride=c, g_stride=0),
                    )
                )
        n = TRITON_ROWS * 1024
        variants.append(
            TritonVariant("scale_grad_kernel", dtype, "-", "any C", dict(BLOCK=config.scale_block), 8, dict(numel=n))
        )
        variants.append(
            TritonVariant(
                "denominator_kernel",
                dtype,
                "weights",
                "any C",
                dict(PROB_TARGET=False, HAS_WEIGHT=True, BLOCK=config.reduce_block),
                4,
                dict(n_rows=TRITON_ROWS, n_cols=1000),
            )
        )
        variants.append(
            TritonVariant(
                "reduce_rows_kernel",
                dtype,
                "mean",
                "any C",
                dict(MEAN=True, BLOCK=config.reduce_block),
                4,
                dict(n_rows=TRITON_ROWS),
            )
        )
    unique: Dict[str, TritonVariant] = {}
    for v in variants:  # C=4096 and C=32000 share the backward tile: keep the first
        key = json.dumps([v.kernel, v.dtype, v.preset, v.constexprs, v.num_warps, v.aligned], sort_keys=True)
        unique.setdefault(key, v)
    return list(unique.values())


def _kernel_object(name: str):
    from ..backends.triton import backward, forward, reduce, scale

    return {
        "policy_loss_fwd_kernel": forward.policy_loss_fwd_kernel,
        "policy_loss_bwd_kernel": backward.policy_loss_bwd_kernel,
        "scale_grad_kernel": scale.scale_grad_kernel,
        "denominator_kernel": reduce.denominator_kernel,
        "reduce_rows_kernel": reduce.reduce_rows_kernel,
    }[name]


def triton_source(kernel, dtype: str, constexprs: Dict[str, object], values: Optional[Dict[str, int]] = None):
    """ASTSource of `kernel` for logits of `dtype` ("fp32", "bf16", "fp16", "fp64"): the signature
    from the argument names (POINTERS, SCALARS), ACC from the dtype, and, as Triton's JIT does at a
    launch, tt.divisibility 16 on every pointer (torch allocations are aligned) and on each integer
    argument in `values` divisible by 16. Without `values`: no alignment facts at all."""
    import triton.language as tl
    from triton.compiler import ASTSource

    acc = "fp64" if dtype == "fp64" else "fp32"
    constexprs = dict(constexprs, ACC=tl.float64 if dtype == "fp64" else tl.float32)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + POINTERS[name].replace("X", dtype).replace("A", acc)
            if values is not None:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = SCALARS[name]
            if values is not None and name in values and values[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(
        fn=kernel,
        signature=signature,
        attrs=attrs,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
    )


def compile_triton(
    kernel, dtype: str, constexprs: Dict[str, object], num_warps: int = 4, values: Optional[Dict[str, int]] = None
):
    """triton.compile for sm_90 (no GPU needed); TRITON_INTERPRET must be unset."""
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compile(
        triton_source(kernel, dtype, constexprs, values),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )


def triton_ptxas() -> str:
    """The ptxas Triton runs for sm_90 (its bundled one, or TRITON_PTXAS_PATH)."""
    from triton import knobs

    return knobs.nvidia.ptxas.path


def _ptxas_info(ptx: str, ptxas: str) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    (info,) = parse_ptxas(out.stderr + out.stdout).values()
    return info


def _compile_with_log(variant: TritonVariant):
    """(compiled kernel, ptxas -v log of Triton's own ptxas run or "" when Triton's cache served it)."""
    import contextlib
    import io

    from triton import knobs

    captured = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v and prints its log
    try:
        with contextlib.redirect_stdout(captured):
            compiled = compile_triton(
                _kernel_object(variant.kernel), variant.dtype, variant.constexprs, variant.num_warps, variant.values
            )
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    return compiled, captured.getvalue()


def _triton_record(variant: TritonVariant, ptxas: str) -> Dict:
    compiled, log = _compile_with_log(variant)
    ptx = compiled.asm["ptx"]
    info = list(parse_ptxas(log).values())
    info = info[0] if len(info) == 1 else _ptxas_info(ptx, ptxas)
    record = dict(
        backend="triton",
        kernel=variant.kernel,
        variant=variant.label,
        dtype=variant.dtype,
        preset=variant.preset,
        regime=variant.regime,
        num_warps=variant.num_warps,
        threads_per_block=variant.num_warps * 32,
        aligned=variant.aligned,
        constexprs={k: v for k, v in variant.constexprs.items() if isinstance(v, (bool, int))},
        dynamic_shared=int(compiled.metadata.shared),
        loads=ptx_loads(ptx),
        **info,
    )
    return record


def _triton_worker(variants: List[Dict]) -> List[Dict]:
    ptxas = triton_ptxas()
    return [_triton_record(TritonVariant(**v), ptxas) for v in variants]


def _triton_sources() -> List[Path]:
    return sorted((PACKAGE_DIR / "backends" / "triton").glob("*.py")) + [PACKAGE_DIR / "_contract.py"]


def _triton_key() -> str:
    triton_dir = Path(metadata.distribution("triton").locate_file("triton"))
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or str(triton_dir / "backends" / "nvidia" / "bin" / "ptxas")
    variants = json.dumps([asdict(v) for v in triton_variants()], sort_keys=True, default=str)
    return _digest(
        [CACHE_VERSION, metadata.version("triton"), _tool_version(ptxas), variants]
        + [p.read_bytes() for p in _triton_sources()]
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compute_triton(jobs: int) -> Dict:
    if _interpreting():  # @triton.jit made interpreted functions here: compile in a child without it
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "triton.json"
            child = subprocess.run(
                [sys.executable, "-m", "aepg_kernels.bench.resources", "--triton-json", str(out), "--jobs", str(jobs)],
                env=dict(os.environ, TRITON_INTERPRET="0"),
                cwd=str(CHECKOUT),
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if child.returncode != 0:
                raise RuntimeError(
                    f"compiling the Triton kernels failed:\n{child.stdout[-3000:]}{child.stderr[-3000:]}"
                )
            return json.loads(out.read_text())
    variants = [asdict(v) for v in triton_variants()]
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        chunks = [variants[i::jobs] for i in range(jobs)]
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_triton_worker, chunks))
        labels = [TritonVariant(**v).label + v["dtype"] for v in variants]
        records = sorted((r for part in parts for r in part), key=lambda r: labels.index(r["variant"] + r["dtype"]))
    else:
        records = _triton_worker(variants)
    import triton

    return {
        "triton": triton.__version__,
        "ptxas": _tool_version(triton_ptxas()),
        "ptxas_flags": "-v --regAllocOptLevel=2 --gpu-name=sm_90a",
        "records": records,
    }


def triton_report(refresh: bool = False, jobs: Optional[int] = None) -> Dict:
    """Every Triton variant's resources (cached); records carry their occupancy."""
    jobs = jobs or min(2, os.cpu_count() or 1)
    document = _cached("triton", _triton_key(), lambda: _compute_triton(jobs), refresh)
    document["records"] = [_finish(r) for r in document["records"]]
    return document


# ---- CUDA variants ----------------------------------------------------------------------------
CUDA_DTYPES = {"c10::BFloat16": "bf16", "c10::Half": "fp16", "float": "fp32", "double": "fp64"}
_CUDA_NAME = re.compile(r"(?:void )?(?:aepg::cuda::)?(?:\(anonymous namespace\)::)?(\w+)<([^>]*)>")
# Threads per block as the launch code of policy_loss_cuda.cu picks them (kSmallBlock, kStreamBlock).
CUDA_SMALL_BLOCK, CUDA_STREAM_BLOCK, CUDA_ITEMS = 256, 512, 16


def nvcc_path() -> Optional[str]:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (Path(cuda_home) / "bin" / "nvcc", shutil.which("nvcc")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def cuda_home(nvcc: str) -> Path:
    return Path(os.environ.get("CUDA_HOME") or Path(nvcc).parent.parent)


def nvcc_command(nvcc: str, out_dir: Path) -> List[str]:
    """setup.py's nvcc flags (and torch's common ones) for sm_90, device code only, with ptxas' report."""
    from torch.utils import cpp_extension

    torch_include = [p for p in cpp_extension.include_paths() if "torch" in p]
    includes = [str(CHECKOUT / "csrc"), *torch_include, str(cuda_home(nvcc) / "include")]
    return [
        nvcc,
        "-cubin",
        "-arch=sm_90",
        "-O3",
        "--expt-relaxed-constexpr",
        "-DAEPG_WITH_CUDA",
        "-std=c++20",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *[f"-I{p}" for p in includes],
        "--resource-usage",
        "--keep",
        f"--keep-dir={out_dir}",
        str(CHECKOUT / CUDA_SOURCE),
        "-o",
        str(out_dir / "policy_loss_cuda.cubin"),
    ]


def _cuda_sources() -> List[Path]:
    return sorted((CHECKOUT / "csrc").glob("*.h")) + [CHECKOUT / CUDA_SOURCE]


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    return dict(zip(names, lines, strict=True)) if len(lines) == len(names) else {n: n for n in names}


def cuda_launch(kernel: str, params: Sequence[str], dtype: str) -> Tuple[int, str, bool]:
    """(threads per block, the C range the launcher sends there, on the launcher's paths) of an
    instantiation, from the launch code (forward_vec, backward_vec, scale)."""
    vec = int(params[-1]) if kernel != "scale_kernel" else 1
    native_vec = {"fp32": 4, "fp64": 2}.get(dtype, 8)
    used = vec in (1, native_vec)
    if kernel == "forward_on_chip_kernel":
        g = int(params[2])
        lower = {8: 0, 32: 8, 128: 32, 512: 128, 1024: 512}[g] * CUDA_ITEMS
        return (g if g > 32 else CUDA_SMALL_BLOCK), f"{lower} < C <= {g * CUDA_ITEMS}", used
    if kernel == "forward_streamed_kernel":
        return CUDA_STREAM_BLOCK, f"C > {1024 * CUDA_ITEMS}", used
    return CUDA_SMALL_BLOCK, "any C", used


def _compute_cuda() -> Dict:
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        command = nvcc_command(nvcc, Path(tmp))
        out = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=str(CHECKOUT))
        if out.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{out.stderr[-4000:]}")
        ptx = "\n".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
    info = parse_ptxas(out.stdout + out.stderr)
    entries = ptx_entries(ptx)
    names = _demangle(list(info))
    records = []
    for mangled, resources in info.items():
        readable = names[mangled]
        match = _CUDA_NAME.search(readable)
        if not match:
            continue
        kernel = match.group(1)
        params = [p.strip() for p in match.group(2).split(",")]
        dtype = CUDA_DTYPES.get(params[0], params[0])
        threads, regime, used = cuda_launch(kernel, params, dtype)
        vec = int(params[-1]) if kernel != "scale_kernel" else 1
        records.append(
            dict(
                backend="cuda",
                kernel=kernel,
                variant=f"{kernel}<{', '.join(params)}>",
                mangled=mangled,
                dtype=dtype,
                preset="any",
                regime=regime,
                vec=vec,
                aligned=vec > 1,
                launcher_path=used,
                threads_per_block=threads,
                dynamic_shared=0,
                loads=ptx_loads(entries.get(mangled, "")),
                **resources,
            )
        )
    records.sort(key=lambda r: (r["kernel"], list(CUDA_DTYPES.values()).index(r["dtype"]), r["variant"]))
    return {"nvcc": _tool_version(nvcc), "command": " ".join(command[:-4]) + f" {CUDA_SOURCE}", "records": records}


def cuda_key() -> str:
    import torch

    nvcc = nvcc_path()
    return _digest(
        [CACHE_VERSION, _tool_version(nvcc), torch.__version__, nvcc and " ".join(nvcc_command(nvcc, Path("_")))]
        + [p.read_bytes() for p in _cuda_sources()]
    )


def cuda_report(refresh: bool = False) -> Dict:
    document = _cached("cuda", cuda_key(), _compute_cuda, refresh)
    document["records"] = [_finish(r) for r in document["records"]]
    return document


# ---- the checks and the tables ----------------------------------------------------------------
# The occupancy floor of the bandwidth-bound kernels: 16 warps per SM, 4 per scheduler. Little's
# law: H200's 4.8 TB/s times about 0.6 us of HBM latency is about 2.9 MB in flight, 22 KB per SM of
# 132; at 512 threads per SM that is about 43 B per thread, three 16-byte loads, which is what the
# kernels issue ahead (CUDA: 16 logits per thread at once; Triton: the whole tile, 8 to 64 elements
# per thread). Below it, latency is no longer hidden whatever the loads; 50% would flag nearly every
# kernel that keeps its row in registers, which is their design (1 read + 1 write).
OCCUPANCY_FLOOR_PERCENT = 25.0


def bandwidth_bound(record: Dict) -> bool:
    return record["kernel"] in BANDWIDTH_BOUND


def vector_loads_meant(record: Dict) -> bool:
    """Where the code means 16-byte loads: the CUDA instantiations with VEC > 1 (explicit packs); the
    Triton tile loads (forward, backward, scale) when the rows are aligned (contiguous columns, the
    JIT's divisibility hints): Triton vectorises them itself."""
    if record["backend"] == "cuda":
        return record.get("vec", 1) > 1
    return record["aligned"] and record["kernel"] in (
        "policy_loss_fwd_kernel",
        "policy_loss_bwd_kernel",
        "scale_grad_kernel",
    )


def findings(records: Sequence[Dict], floor: float = OCCUPANCY_FLOOR_PERCENT) -> List[Dict]:
    """What the checks flag: spills or local memory, missing vector loads, occupancy below the floor
    (bandwidth-bound kernels); fp64 is listed but marked `reported_only`."""
    found = []
    for r in records:
        if r["backend"] == "cuda" and not r.get("launcher_path", True):
            continue
        problems = {}
        if r["spill_stores"] or r["spill_loads"]:
            problems["spills"] = f"spills {r['spill_stores']}/{r['spill_loads']} B"
        if r["stack_frame"]:
            problems["local"] = f"local memory {r['stack_frame']} B"
        if vector_loads_meant(r) and not (r["loads"]["v4"] or r["loads"]["v2"]):
            problems["vector"] = "no vector loads"
        if bandwidth_bound(r) and r["occupancy_percent"] < floor:
            problems["occupancy"] = f"occupancy {r['occupancy_percent']}% < {floor:g}% ({r['limiter']})"
        if problems:
            found.append(
                dict(
                    backend=r["backend"],
                    kernel=r["kernel"],
                    preset=r["preset"],
                    regime=r["regime"],
                    variant=r["variant"],
                    dtype=r["dtype"],
                    kinds=sorted(problems),
                    problems=list(problems.values()),
                    reported_only=r["dtype"] not in LOW_PRECISION,
                )
            )
    return found


_HEADERS = (
    "backend",
    "kernel variant",
    "dtype",
    "regs",
    "spills st/ld B",
    "local B",
    "smem B",
    "v4/v2 loads",
    "blocks/SM",
    "warps/SM",
    "occupancy %",
    "limit",
)


def _row(r: Dict) -> List[object]:
    return [
        r["backend"],
        r["variant"],
        r["dtype"],
        r["registers"],
        f"{r['spill_stores']}/{r['spill_loads']}",
        r["stack_frame"],
        r["shared_bytes"],
        f"{r['loads']['v4']}/{r['loads']['v2']}",
        r["blocks_per_sm"],
        r["warps_per_sm"],
        r["occupancy_percent"],
        r["limiter"],
    ]


def markdown(document: Dict) -> str:
    records = document["records"]
    found = document["findings"]
    lines = [
        f"# Kernel resources for {SM90.name} (compiler only, no GPU)",
        "",
        f"Command: `{document['command']}`. Triton {document['triton']['triton']}, its ptxas "
        f"({document['triton']['ptxas']}, {document['triton']['ptxas_flags']}); CUDA: "
        f"{document['cuda'].get('nvcc', 'not built')}. Occupancy: {SM90.max_warps_per_sm} warps, "
        f"{SM90.registers_per_sm} registers, {SM90.shared_per_sm // 1024} KiB shared memory per SM; floor for "
        f"the bandwidth-bound kernels {OCCUPANCY_FLOOR_PERCENT:g}%.",
        "",
        f"## Findings ({len(found)})",
        "",
    ]
    lines += [
        f"- {f['backend']} {f['variant']} {f['dtype']}: {'; '.join(f['problems'])}"
        + (" (fp64: reported, not failed)" if f["reported_only"] else "")
        for f in found
    ] or ["- none"]
    for backend in ("triton", "cuda"):
        rows = [_row(r) for r in records if r["backend"] == backend and r.get("launcher_path", True)]
        lines += ["", f"## {backend}", "", utils.markdown_table(_HEADERS, rows)]
    unused = [r for r in records if not r.get("launcher_path", True)]
    if unused:
        lines += [
            "",
            "Instantiated but never launched (the vector width of another dtype): "
            + ", ".join(f"{r['variant']}" for r in unused)
            + ".",
        ]
    return "\n".join(lines)


def build(refresh: bool = False, with_cuda: bool = True) -> Dict:
    triton = triton_report(refresh)
    cuda: Dict = {"records": []}
    if with_cuda:
        try:
            cuda = cuda_report(refresh)
        except (RuntimeError, ImportError) as error:
            cuda = {"records": [], "error": str(error)[-1000:]}
    if "command" in cuda:  # paths relative to the checkout
        cuda["command"] = cuda["command"].replace(str(CHECKOUT) + "/", "")
    records = triton["records"] + cuda["records"]
    return {
        "triton": {k: v for k, v in triton.items() if k != "records"},
        "cuda": {k: v for k, v in cuda.items() if k != "records"},
        "limits": asdict(SM90),
        "occupancy_floor_percent": OCCUPANCY_FLOOR_PERCENT,
        "records": records,
        "findings": findings(records),
    }


def run_cli(parser, args, argv: Sequence[str], device) -> int:
    """--suite resources: FILE.json and FILE.md; 1 when a low-precision variant has a finding."""
    from . import machine, output

    info = machine.describe(device)
    stem = "sm90-resources"
    json_path = output.output_path(args.out, stem)
    start = time.monotonic()
    document = {
        "suite": "resources",
        "argv": list(argv),
        "command": " ".join(["aepg-bench", *argv]),
        "machine": info,
        **build(),
    }
    document["wall_seconds"] = round(time.monotonic() - start, 1)
    text = markdown(document)
    print("\n" + text + "\n")
    output.write_json_and_markdown(document, json_path, text)
    return int(any(not f["reported_only"] for f in document["findings"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Compile the Triton variants for sm_90 and write their resources.")
    parser.add_argument("--triton-json", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    utils.write_json(args.triton_json, _compute_triton(args.jobs), "triton")
    return 0


if __name__ == "__main__":
    sys.exit(main())
