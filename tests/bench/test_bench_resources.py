"""The compiler's view of every kernel for sm_90 (aepg_kernels/bench/resources.py), checked without a GPU.

Checks, on the variants the launchers use (fp64, for gradcheck, is reported, never failed):
- no spills and no local memory in fp32/bf16/fp16;
- 16-byte (or 8-byte) global loads where the code means them: the CUDA instantiations with VEC > 1
  (explicit packs) and the Triton tile loads on aligned rows;
- occupancy at least OCCUPANCY_FLOOR_PERCENT for the bandwidth-bound kernels.

Defects the checks found are listed in KNOWN (the kernels belong to other work): a new finding
fails, and so does a listed one that is gone, so that the list is kept true.

The Triton variants compile in a child process when the suite runs under TRITON_INTERPRET=1. Both
reports are cached in build/resources-cache keyed by the sources and compiler versions: the first
run compiles (about 2 minutes for Triton, 1 for the CUDA file, on 2 cores), later runs read JSON.
"""

import shutil

import pytest

from aepg_kernels.bench import resources as res

pytest.importorskip("triton.backends.nvidia")

LOW = ("fp32", "bf16", "fp16")


# ---- occupancy: hand-computed cases -----------------------------------------------------------


def test_occupancy_limited_by_threads():
    # 32 regs -> 1024 per warp; 16384 / 1024 = 16 warps per sub-partition, 64 per SM; 256 threads: 8 blocks
    occ = res.occupancy(32, 256, 0)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy_percent"]) == (8, 64, 100.0)
    assert occ["limiter"] == "threads"


def test_occupancy_limited_by_registers_per_sub_partition():
    # 40 regs -> 1280 per warp; 16384 // 1280 = 12 warps per sub-partition -> 48 per SM; 2 warps per
    # block -> 24 blocks (65536 // 1280 = 51 warps would say 25: the sub-partition rule matters)
    occ = res.occupancy(40, 64, 0)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy_percent"]) == (24, 48, 75.0)
    assert occ["limiter"] == "registers"


def test_occupancy_of_a_1024_thread_block_at_64_registers():
    # 64 regs -> 2048 per warp -> 8 warps per sub-partition, 32 per SM: one 32-warp block, 50%
    occ = res.occupancy(64, 1024, 128)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy_percent"]) == (1, 32, 50.0)


def test_occupancy_rounds_registers_up_to_the_allocation_unit():
    # 168 regs -> 5376 per warp (a multiple of 256); 16384 // 5376 = 3 -> 12 warps; 8 warps per block: 1
    occ = res.occupancy(168, 256, 0)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy_percent"]) == (1, 8, 12.5)
    # 33 regs -> 1056, rounded to 1280: the same as 40
    assert res.occupancy(33, 64, 0)["blocks_per_sm"] == 24


def test_occupancy_limited_by_shared_memory_and_blocks():
    # 100 KiB + 1 KiB reserved = 103424 B per block; 233472 // 103424 = 2 blocks of 4 warps
    occ = res.occupancy(32, 128, 100 * 1024)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["limiter"]) == (2, 8, "shared")
    occ = res.occupancy(16, 32, 0)  # 1 warp per block: the 32-block limit
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["limiter"]) == (32, 32, "blocks")


def test_occupancy_zero_when_a_block_cannot_fit():
    assert res.occupancy(256, 128, 0)["blocks_per_sm"] == 0  # over 255 registers per thread
    assert res.occupancy(32, 128, 228 * 1024)["blocks_per_sm"] == 0  # over 227 KiB per block
    assert res.occupancy(128, 1024, 0)["blocks_per_sm"] == 0  # 128 x 1024 registers > 65536
    with pytest.raises(ValueError):
        res.occupancy(32, 2048, 0)


# ---- parsing ----------------------------------------------------------------------------------
PTXAS = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    24 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size, 128 bytes smem
ptxas info    : Compile time = 8.6 ms
ptxas info    : Compiling entry function 'scale' for 'sm_90a'
ptxas info    : Function properties for scale
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 13 registers, used 0 barriers
"""


def test_parse_ptxas():
    info = res.parse_ptxas(PTXAS)
    assert info["_Z1kPf"] == dict(
        registers=64, spill_stores=24, spill_loads=32, stack_frame=24, cumulative_stack=24, static_shared=128
    )
    assert info["scale"]["registers"] == 13 and info["scale"]["static_shared"] == 0


def test_ptx_loads():
    ptx = (
        "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n ld.global.L1::evict_last.v2.f64 {%fd1, %fd2}, [%rd2];\n"
        "ld.global.nc.v4.u32 {%r5, %r6, %r7, %r8}, [%rd3];\n ld.global.b16 %rs1, [%rd4];\n"
        "@%p1 ld.global.f32 %f1, [%rd5];\n ld.param.u64 %rd6, [p];"
    )
    assert res.ptx_loads(ptx) == {"v4": 2, "v2": 1, "scalar": 2}


def test_ptx_entries():
    ptx = ".visible .entry a(\n .param .u64 p)\n{\n ld.global.v4.b32 x;\n}\n.visible .entry b(\n)\n{\n}\n"
    entries = res.ptx_entries(ptx)
    assert set(entries) == {"a", "b"} and "v4" in entries["a"] and "v4" not in entries["b"]


def test_triton_variants_follow_the_launcher():
    from aepg_kernels.backends.triton import launch

    variants = res.triton_variants()
    for v in variants:
        if v.kernel == "policy_loss_fwd_kernel":
            c = int(v.regime.split("=")[1])
            assert (v.constexprs["BLOCK_R"], v.constexprs["BLOCK_C"], v.num_warps) == launch._tiling(res.TRITON_ROWS, c)
    assert {v.dtype for v in variants} == set(res.TRITON_DTYPES)
    assert any(v.aligned for v in variants) and any(not v.aligned for v in variants)


# ---- the reports ------------------------------------------------------------------------------
# Findings of 2026-12-01 (benchmarks/results/sm90-resources-2026-12-01.md): (backend, kernel, preset,
# regime, dtype) -> kinds. "max" is the heaviest flag set (probability targets, weights, smoothing,
# entropy term, tensor alpha); "ce" is nn.CrossEntropyLoss's.
KNOWN = {}


def _known(backend, kernel, preset, regime, kinds, dtypes=LOW, vecs=(None,)):
    """vecs: the CUDA vector widths (0: the dtype's 16-byte width), None for Triton."""
    for dtype in dtypes:
        for vec in vecs:
            vec = (16 // {"fp32": 4, "fp64": 8}.get(dtype, 2)) if vec == 0 else vec
            KNOWN[(backend, kernel, preset, regime, dtype, vec)] = set(kinds)


TRITON, FWD, BWD, OCC = "triton", "policy_loss_fwd_kernel", "policy_loss_bwd_kernel", {"occupancy"}
# Triton: registers cap occupancy at 12.5-18.8% where the tile keeps several values per element
# live (every "max" forward, the small-C backward); the heaviest 16384-class tile spills.
_known(TRITON, FWD, "max", "C=16384", {"spills", "local", "occupancy"})
for _regime in ("C=10", "C=128", "C=1000", "C=4096", "C=32000"):
    _known(TRITON, FWD, "max", _regime, OCC)
_known(TRITON, BWD, "ce", "C=10", OCC)
_known(TRITON, BWD, "max", "C=10", OCC)
for _kernel, _preset in ((FWD, "ce"), (BWD, "ce"), (BWD, "max")):
    _known(TRITON, _kernel, _preset, "C=128", OCC, ("fp32",))

# CUDA: the 1024-thread forward (__launch_bounds__(1024): at most 64 registers) spills in every
# low-precision instantiation; so do fp32 512 threads without vectors and the 32-thread-group
# 16-byte bf16/fp16 forward (4 bytes).
CUDA, ON_CHIP, SPILLS = "cuda", "forward_on_chip_kernel", {"spills", "local"}
_known(CUDA, ON_CHIP, "any", "8192 < C <= 16384", SPILLS, vecs=(1, 0))
_known(CUDA, ON_CHIP, "any", "2048 < C <= 8192", SPILLS, ("fp32",), vecs=(1,))
_known(CUDA, ON_CHIP, "any", "128 < C <= 512", SPILLS, ("bf16", "fp16"), vecs=(0,))


def _kinds(record):
    return set(next((f["kinds"] for f in res.findings([record])), []))


def _key(record):
    return (record["backend"], record["kernel"], record["preset"], record["regime"], record["dtype"], record.get("vec"))


@pytest.fixture(scope="module")
def triton_records():
    return res.triton_report()["records"]


@pytest.fixture(scope="module")
def cuda_records():
    if res.nvcc_path() is None or shutil.which("c++filt") is None:
        pytest.skip("nvcc or c++filt not found")
    return res.cuda_report()["records"]


def _check(records):
    low = [r for r in records if r["dtype"] in LOW and r.get("launcher_path", True)]
    assert low
    unexpected = {f"{_key(r)}: {sorted(_kinds(r))}" for r in low if _kinds(r) != KNOWN.get(_key(r), set())}
    assert not unexpected, "findings differ from KNOWN (new defect, or a fixed one to delist):\n" + "\n".join(
        sorted(unexpected)
    )


def test_triton_findings_are_the_known_ones(triton_records):
    _check(triton_records)


def test_triton_aligned_tiles_load_vectors(triton_records):
    meant = [r for r in triton_records if res.vector_loads_meant(r)]
    assert len(meant) >= 20
    assert all(r["loads"]["v4"] + r["loads"]["v2"] > 0 for r in meant if r["dtype"] in LOW)


def test_triton_report_covers_every_variant(triton_records):
    assert len(triton_records) == len(res.triton_variants())
    assert all(r["registers"] > 0 and r["threads_per_block"] == 32 * r["num_warps"] for r in triton_records)


def test_cuda_findings_are_the_known_ones(cuda_records):
    _check(cuda_records)


def test_cuda_instantiations(cuda_records):
    kernels = {r["kernel"] for r in cuda_records}
    assert kernels == {"forward_on_chip_kernel", "forward_streamed_kernel", "backward_kernel", "scale_kernel"}
    assert {r["dtype"] for r in cuda_records} == {"fp32", "bf16", "fp16", "fp64"}
    for r in cuda_records:  # 16-byte packs load as .v4 (fp64: .v2), VEC = 1 as scalars
        if r["kernel"] != "scale_kernel":
            assert (r["loads"]["v4"] + r["loads"]["v2"] > 0) == (r["vec"] > 1), r["variant"]
