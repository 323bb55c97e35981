"""aepg-bench: how close to the hardware limit the fused loss runs, and how much faster it is than
what a user would write (the lean composite, eager and torch.compile), F.cross_entropy and
Liger-Kernel, on this machine; and what swapping nn.CrossEntropyLoss for ak.PolicyLoss costs per call.

    aepg-bench [--suite quick|cpu|gpu] [--out FILE.json] [filters...]
    aepg-bench --suite overhead [--threads T] [--repeats R] [--shapes NxC,...] [--modes fwd+bwd,fwd]
    aepg-bench --suite llm [--threads T] [--repeats R] [--shapes NxHxV,...] [--losses ce,dft,aepg]
    aepg-bench --suite llm-step [--threads T] [--repeats R] [--shapes BxSxHxV,...] [--implementations ...]
    aepg-bench --suite vocab-parallel [--repeats R] [--shapes NxC,NxHxV,...] [--losses ce,aepg]
    aepg-bench --suite resources [--out FILE.json]   (registers, spills, occupancy for sm_90; no GPU)
    aepg-bench trainer-step [--batch B] [--classes 100,21843] [--out FILE.json]
    aepg-bench perf-model [--measured GPU-SWEEP.json] [--out FILE.json]   (the static bound per sweep case)
    aepg-bench device-check --out DIR [--dry-run]   (a GPU session's checks, most important first)
    python -m aepg_kernels.bench ...

Baselines: lean-eager (the default: log_softmax, gather, exp and the loss's own terms, as a user
writes them), lean-compile (torch.compile of it), F.cross_entropy for CE, and the package's own
stability-first composite as an extra row, reference (package eager); the gate checks every row
against the float64 reference before timing.

Writes FILE.json (every number and the machine) and FILE.png (GB/s vs C per implementation); the
overhead suite writes FILE.json and FILE.md (its markdown table). FILE is --out, else
<machine>-<suite>-<date>.json in the working directory.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from aepg_kernels import utils

from . import (
    bandwidth,
    implementations,
    llm,
    llm_step,
    machine,
    measure,
    output,
    overhead,
    timing,
    trainer_step,
    vocab_parallel,
)
from .correctness import GATE_MAX_ELEMENTS, GATE_REFERENCE, TOLERANCE
from .sweeps import (
    DTYPES,
    LOSSES,
    MODES,
    OVERHEAD_MODES,
    SUITES,
    Case,
    check_names,
    grid,
    overhead_cases,
    parse_head_shapes,
    parse_shapes,
)


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aepg-bench",
        description=__doc__.splitlines()[0],
        epilog="Subcommands: 'aepg-bench trainer-step --help', "
        "'aepg-bench perf-model --help', 'aepg-bench device-check --help'.",
    )
    parser.add_argument(
        "--suite",
        choices=sorted([*SUITES, "llm-step", "vocab-parallel", "resources"]),
        default="quick",
        help="quick: the main job on this device; cpu: the CPU table; gpu: the full GPU sweep; "
        "overhead: us per call of nn.CrossEntropyLoss() vs ak.PolicyLoss() vs aEPG on the "
        "CPU, interleaved (1 thread unless --threads), plus host time on CUDA tensors when "
        "CUDA is available; llm: an LM head (fused linear + loss) vs eager, torch.compile "
        "and F.linear_cross_entropy, time and peak memory; llm-step: one training step of a "
        "LlamaForCausalLM, transformers' loss vs TRL's fused head vs patch_causal_lm; "
        "vocab-parallel: policy_loss(process_group=) on 2 gloo ranks vs the unsharded op, "
        "time and bytes communicated per call; resources: what the compiler says about "
        "every kernel for sm_90 (registers, spills, shared memory, vector loads, occupancy)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="overhead suite: its table is always on the CPU; cpu also skips the CUDA host time",
    )
    parser.add_argument(
        "--implementations",
        type=utils.comma_list,
        default=None,
        help=f"comma list among {','.join(implementations.ALL_NAMES)} ({implementations.BASELINE} "
        "always runs; default: all available but reference-compile)",
    )
    parser.add_argument("--losses", type=utils.comma_list, default=None, help=f"keep these losses ({','.join(LOSSES)})")
    parser.add_argument(
        "--modes",
        type=utils.comma_list,
        default=None,
        help=f"keep these modes ({','.join(MODES)}; overhead suite: fwd+bwd, fwd = eval forward)",
    )
    parser.add_argument("--dtypes", type=utils.comma_list, default=None, help=f"keep these dtypes ({','.join(DTYPES)})")
    parser.add_argument(
        "--shapes",
        default=None,
        help="NxC list replacing the suite's shapes, e.g. 256x100,4096x1000 (with --losses, "
        "--modes, --dtypes or aepg, fwd+bwd, fp32)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="skip (and record) the cases that would start after this many seconds "
        "(default: the suite's budget, 420 s for gpu, none for quick and cpu)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (torch.set_num_threads; the overhead suite's default is 1)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"overhead suite: interleaved rounds per case (default: as many as fit in "
        f"~{overhead.CASE_SECONDS:g} s, {overhead.MIN_SAMPLES}-{overhead.MAX_SAMPLES}); "
        f"llm suite: interleaved rounds (default {llm.REPEATS})",
    )
    parser.add_argument("--no-graphs", action="store_true", help="GPU: skip the CUDA-graph timing of small shapes")
    parser.add_argument("--no-profile", action="store_true", help="GPU: skip counting kernel launches")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (the PNG goes beside it)")
    return parser


def trainer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aepg-bench trainer-step", description=trainer_step.__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"images per step (default {trainer_step.GPU_BATCH} on a GPU, {trainer_step.CPU_BATCH} on a CPU)",
    )
    parser.add_argument("--classes", type=utils.comma_list, default=["100", "21843"], help="head sizes, comma list")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median) after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm model name (random weights)")
    parser.add_argument("--image-size", type=int, default=trainer_step.IMAGE_SIZE)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file")
    return parser


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """--device as a torch.device; a usage error for cuda on a machine without one."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return utils.resolve_device(name)


def select_cases(parser: argparse.ArgumentParser, args) -> List[Case]:
    try:
        losses = check_names("losses", args.losses, LOSSES) if args.losses else None
        modes = check_names("modes", args.modes, MODES) if args.modes else None
        dtypes = check_names("dtypes", args.dtypes, DTYPES) if args.dtypes else None
        if args.shapes and SUITES[args.suite]().kind == "overhead":
            return overhead_cases(parse_shapes(args.shapes), modes or OVERHEAD_MODES, (dtypes or ["fp32"])[0])
        if args.shapes:
            return grid(losses or ["aepg"], modes or ["fwd+bwd"], dtypes or ["fp32"], parse_shapes(args.shapes))
    except ValueError as error:
        parser.error(str(error))
    cases = SUITES[args.suite]().cases
    return [
        case
        for case in cases
        if (losses is None or case.loss in losses)
        and (modes is None or case.mode in modes)
        and (dtypes is None or case.dtype in dtypes)
    ]


def check_implementations(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Exits with a usage error for an unknown name (a renamed one says its new names)."""
    renamed = [f"{name!r} is now {implementations.RENAMED[name]}" for name in names if name in implementations.RENAMED]
    if renamed:
        parser.error(f"--implementations: {'; '.join(renamed)}")
    try:
        check_names("implementations", names, implementations.ALL_NAMES)
    except ValueError as error:
        parser.error(str(error))


def run_bench(argv: Sequence[str]) -> int:
    parser = bench_parser()
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    if args.suite == "llm-step":
        return llm_step.run_cli(parser, args, argv, device)
    if args.suite == "vocab-parallel":
        return vocab_parallel.run_cli(parser, args, argv, device)
    if args.suite == "resources":
        from . import resources

        return resources.run_cli(parser, args, argv, device)
    if SUITES[args.suite]().kind == "overhead":
        return run_overhead(parser, args, argv, device)
    if SUITES[args.suite]().kind == "llm":
        return run_llm(parser, args, argv, device)
    if args.repeats is not None:
        parser.error("--repeats: for --suite overhead only")
    if args.implementations:
        check_implementations(parser, args.implementations)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be > 0")
    cases = select_cases(parser, args)
    if not cases:
        parser.error("no case left after the --losses/--modes/--dtypes filters")
    if args.list:
        print("\n".join(case.label for case in cases))
        return 0
    if args.suite == "gpu" and device.type != "cuda" and not args.shapes:
        parser.error("--suite gpu: the full GPU sweep needs a CUDA device (use --suite cpu or quick here)")

    impls = implementations.select(device, args.implementations)
    info = machine.describe(device)
    copy = announce(args.suite, cases, impls, device, info)
    suite = SUITES[args.suite]()
    budget = args.max_seconds if args.max_seconds is not None else suite.budget_seconds
    settings = measure.RunSettings(
        device,
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        budget_seconds=budget,
        graphs=not args.no_graphs,
        profile=not args.no_profile,
        compile_targets_only=suite.compile_targets_only and not args.shapes,
    )  # --shapes: the user's grid
    json_path = output.output_path(args.out, f"{output.device_tag(info)}-{args.suite}")
    document = new_document(args.suite, argv, info, copy, settings, impls)
    try:
        run_with_progress(cases, impls, settings, copy["gbps"], document, json_path)
        interrupted = False
    except KeyboardInterrupt:  # e.g. SIGINT from `timeout`: keep what was measured (the case in flight is lost)
        interrupted = True
        document["interrupted"] = "KeyboardInterrupt: the cases after the last record did not run"
        print(f"\ninterrupted: writing the {len(document['records'])} records measured so far", flush=True)
    records = document["records"]
    for line in output.summary_lines(records):
        print(line)
    document["complete"] = not interrupted
    print(f"wrote {output.write_json(json_path, document)}")
    png = output.write_plot(json_path.with_suffix(".png"), records, copy["gbps"], machine.title(info))
    print(f"wrote {png}" if png else "no plot (nothing timed, or matplotlib missing)")
    return output.INTERRUPTED if interrupted else exit_code(records, impls)


def exit_code(records: Sequence[dict], impls) -> int:
    """1 when one of our fused backends failed the gate or raised; a baseline that does (e.g. a
    Liger version with wrong reduction='none' gradients) is reported in the table, not a failure."""
    ours = {impl.name for impl in impls if impl.fused}
    return int(any(r["status"] in ("failed check", "error") and r["implementation"] in ours for r in records))


def announce(suite: str, cases, impls, device: torch.device, info: dict) -> dict:
    """Prints what runs where and measures the device copy bandwidth (returned)."""
    print(f"aepg-bench --suite {suite}: {len(cases)} cases on {machine.title(info)}")
    print(f"implementations: {', '.join(impl.name for impl in impls)}")
    for name, why in implementations.available(device).items():
        if why:
            print(f"  not run: {name} ({why})")
    copy = timing.copy_bandwidth(device)
    copy["gbps"] = bandwidth.gbps(bandwidth.copy_bytes(copy["buffer_bytes"]), copy["seconds"])
    print(f"device copy: {copy['gbps']:.1f} GB/s (read + write of {copy['buffer_bytes'] / 2**20:.0f} MiB)")
    if device.type != "cuda":
        print("peak memory: not measured on a CPU; kernel launches and CUDA graphs: GPU only")
    return copy


def new_document(suite: str, argv, info: dict, copy: dict, settings: measure.RunSettings, impls) -> dict:
    """The JSON document before any record: the run's machine, copy bandwidth and settings."""
    timing_method = (
        "triton.testing.do_bench median (L2 cleared before every call)"
        if settings.device.type == "cuda"
        else f"perf_counter median after up to {timing.CPU_WARMUP} warm-up calls"
    )
    gpu_only = (
        {
            "back_to_back": (
                f"N <= {measure.GRAPH_MAX_N} or N*C <= {measure.GRAPH_MAX_ELEMENTS}: CUDA events around "
                f"{timing.BACK_TO_BACK_CALLS} calls queued back to back, caches warm, per call "
                f"(back_to_back_us; graph_us: replays of a CUDA graph of the call, timed alike)"
            ),
            "host_sync": 'one call under torch.cuda.set_sync_debug_mode("error"); no graph capture when it syncs',
            "compile_targets_only": settings.compile_targets_only,
        }
        if settings.device.type == "cuda"
        else {}
    )
    return {
        "suite": suite,
        "argv": list(argv),
        "complete": False,
        "machine": info,
        "copy": copy,
        "settings": {
            "gate_max_elements": GATE_MAX_ELEMENTS,
            "tolerance": TOLERANCE,
            "gate_reference": GATE_REFERENCE,
            "speedups": {
                key: f"{name} seconds / this seconds" for key, name in implementations.SPEEDUP_BASELINES.items()
            },
            "flush_bytes": measure.FLUSH_BYTES,
            "max_rotations": measure.max_rotations(settings.device),
            "graph_max_n": measure.GRAPH_MAX_N,
            "graph_max_elements": measure.GRAPH_MAX_ELEMENTS,
            "max_seconds": settings.budget_seconds,
            "timing": timing_method,
            **gpu_only,
        },
        "implementations": [impl.name for impl in impls],
        "not_run": {name: why for name, why in implementations.available(settings.device).items() if why},
        "records": [],
    }


def run_with_progress(cases, impls, settings, copy_gbps, document: dict, json_path: Path) -> List[dict]:
    """The table rows as each case finishes, and the JSON rewritten after every case (a run cut
    short still leaves its numbers)."""
    with utils.progress_bar(len(cases), desc="cases", unit="case", leave=False) as bar:
        bar.write(output.header())  # rows print above the bar on a terminal, plainly into a log or pipe

        def case_done(rows):
            for row in rows:
                if row["status"] != output.NOT_APPLICABLE:
                    bar.write(output.format_row(row))
            document["records"] += rows
            output.write_json(json_path, document)

        return measure.run(cases, impls, settings, copy_gbps, case_done, bar)


def run_overhead(parser: argparse.ArgumentParser, args, argv: Sequence[str], device: torch.device) -> int:
    """--suite overhead: the interleaved CPU table (overhead.py), then the host time on CUDA tensors
    when CUDA is available and --device is not cpu; FILE.json rewritten after every case, FILE.md
    (the markdown tables) at the end. 1 when ak.PolicyLoss or aEPG fails the gate or raises."""
    for name in ("implementations", "losses"):
        if getattr(args, name):
            parser.error(f"--{name}: --suite overhead has fixed rows ({', '.join(r.name for r in overhead.ROWS)})")
    for name in ("threads", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be > 0")
    cases = select_cases(parser, args)
    if not cases:
        parser.error("no case left after the --modes/--dtypes filters")
    if args.list:
        print(
            "\n".join(
                f"{overhead.OVERHEAD_MODE_TITLES.get(case.mode, case.mode)} {case.dtype} {case.n}x{case.c}"
                for case in cases
            )
        )
        return 0
    torch.set_num_threads(args.threads or 1)
    info = machine.describe(torch.device("cpu"))
    cuda = device if device.type == "cuda" else None
    if cuda is not None:
        info["cuda_device"] = machine.gpu_info(cuda)
    print(f"aepg-bench --suite overhead: {len(cases)} cases on {machine.title(info)}")
    print("rows: " + "; ".join(row.description for row in overhead.ROWS))
    json_path = output.output_path(args.out, f"{output.device_tag(info)}-overhead")
    document = {
        "suite": "overhead",
        "argv": list(argv),
        "complete": False,
        "machine": info,
        "settings": {**overhead.settings(), "max_seconds": args.max_seconds, "repeats": args.repeats},
        "records": [],
        "cuda_host": None,
    }

    def case_done(record):
        print(overhead.progress_line(record), flush=True)
        document["records"].append(record)
        output.write_json(json_path, document)

    try:
        overhead.run(cases, args.repeats, args.max_seconds, case_done)
        document["cuda_host"] = measure_cuda_host(cuda, args.device)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
        document["interrupted"] = "KeyboardInterrupt: the cases after the last record did not run"
    return finish_overhead(document, json_path, interrupted)


def measure_cuda_host(cuda: Optional[torch.device], requested: str) -> dict:
    """The document's cuda_host entry: records, or why it was not measured."""
    if cuda is None:
        why = "--device cpu" if requested == "cpu" else "no CUDA device here"
        print(f"host time on CUDA tensors: not measured on GPU ({why})")
        return {"status": "not measured on GPU", "reason": why, "records": []}
    try:
        records = overhead.host_times(cuda)
    except Exception as error:  # noqa: BLE001  (the CPU table stays; the error is recorded)
        return {"status": "error", "reason": f"{type(error).__name__}: {str(error)[:300]}", "records": []}
    return {"status": "ok", "reason": "", "device": str(cuda), "records": records}


def finish_overhead(document: dict, json_path: Path, interrupted: bool) -> int:
    """Prints the markdown tables and the target verdicts, writes FILE.json and FILE.md; the exit code."""
    records = document["records"]
    document["targets"] = overhead.target_summary(records)
    tables = [overhead.markdown(records)]
    if document["cuda_host"] and document["cuda_host"]["records"]:
        host = overhead.host_markdown(document["cuda_host"]["records"])
        tables.append(f"Host time per call on CUDA tensors ({document['cuda_host']['device']}):\n\n{host}")
    text = "\n\n".join(tables)
    print("\n" + text + "\n")
    for line in overhead.summary_lines(document["targets"]):
        print(line)
    if interrupted:
        print(f"interrupted: writing the {len(records)} records measured so far", flush=True)
    document["complete"] = not interrupted
    output.write_json_and_markdown(document, json_path, text)
    if interrupted:
        return output.INTERRUPTED
    ours = {row.name for row in overhead.ROWS[1:]}
    return int(
        any(
            r["status"] == "error" or r["rows"].get(name, {}).get("status") == "failed check"
            for r in records
            for name in ours
        )
    )


def llm_selection(parser: argparse.ArgumentParser, args, device: torch.device):
    """(cases, implementations) of --suite llm after its filters; usage errors for bad names."""
    try:
        losses = check_names("losses", args.losses, llm.LOSS_NAMES) if args.losses else llm.LOSS_NAMES
        dtypes = check_names("dtypes", args.dtypes, ("fp32", "bf16", "fp16")) if args.dtypes else ("fp32", "bf16")
        names = check_names("implementations", args.implementations, llm.IMPL_NAMES) if args.implementations else None
        shapes = parse_head_shapes(args.shapes) if args.shapes else llm.SHAPES
    except ValueError as error:
        parser.error(str(error))
    if args.modes and args.modes != ["fwd+bwd"]:
        parser.error("--modes: --suite llm times fwd+bwd only")
    wanted = [impl for impl in llm.IMPLS if names is None or impl.name in names or impl.name == llm.EAGER]
    return llm.cases(shapes, dtypes, losses), wanted


def run_llm(parser: argparse.ArgumentParser, args, argv: Sequence[str], device: torch.device) -> int:
    """--suite llm: every case in order (llm.py), FILE.json rewritten after each, FILE.md (the two
    tables) at the end; 1 when ours fails its gate or raises. Eager always runs (the reference)."""
    for name in ("threads", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    cases, wanted = llm_selection(parser, args, device)
    if args.list:
        print("\n".join(case.label for case in cases))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    impls = [impl for impl in wanted if not llm.unavailable(impl, device)]
    info = machine.describe(device)
    repeats = args.repeats or llm.REPEATS
    print(f"aepg-bench --suite llm: {len(cases)} cases on {machine.title(info)}, {repeats} repeats (min reported)")
    not_run = {impl.name: llm.unavailable(impl, device) for impl in wanted if llm.unavailable(impl, device)}
    for name, why in not_run.items():
        print(f"  not run: {name} ({why})")
    json_path = output.output_path(args.out, f"{output.device_tag(info)}-llm")
    document = {
        "suite": "llm",
        "argv": list(argv),
        "command": " ".join(["aepg-bench", *argv]),
        "complete": False,
        "machine": info,
        "settings": llm.settings(device, repeats),
        "implementations": [i.name for i in impls],
        "not_run": not_run,
        "records": [],
    }

    def case_done(record):
        print(llm.progress_line(record), flush=True)
        document["records"].append(record)
        output.write_json(json_path, document)

    start = datetime.datetime.now()
    try:
        llm.run(cases, impls, device, repeats, args.max_seconds, case_done)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
        document["interrupted"] = "KeyboardInterrupt: the cases after the last record did not run"
    records = document["records"]
    llm.add_ratios(records)
    document["targets"] = llm.target_summary(records)
    document["wall_seconds"] = (datetime.datetime.now() - start).total_seconds()
    document["complete"] = not interrupted
    text = llm.markdown(records)
    print("\n" + text + "\n")
    for line in llm.summary_lines(document["targets"]):
        print(line)
    output.write_json_and_markdown(document, json_path, text)
    if interrupted:
        return output.INTERRUPTED
    return int(
        any(
            r.get("status") == "error" or r["impls"].get(llm.OURS, {}).get("status") in ("failed check", "error")
            for r in records
        )
    )


def run_trainer_step(argv: Sequence[str]) -> int:
    parser = trainer_parser()
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    try:
        classes = [int(c) for c in args.classes]
    except ValueError:
        parser.error(f"--classes: expected a comma list of integers, got {','.join(args.classes)!r}")
    for name in ("batch", "steps", "threads", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(c < 1 for c in classes):
        parser.error("--classes must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = args.batch or trainer_step.default_batch(device)
    info = machine.describe(device)
    print(f"aepg-bench trainer-step: {args.model} + LoRA blocks 0-4, batch {batch}, on {machine.title(info)}")
    if device.type != "cuda" and args.batch is None:
        print(f"  (CPU: batch {batch} instead of {trainer_step.GPU_BATCH}; pass --batch to change it)")
    path = output.output_path(args.out, f"{output.device_tag(info)}-trainer-step")
    document = {"benchmark": "trainer-step", "argv": list(argv), "complete": False, "machine": info, "records": []}

    def record_done(record):  # the JSON is rewritten after every measurement: a cut-short run keeps them
        print(trainer_step.format_record(record), flush=True)
        document["records"].append(record)
        output.write_json(path, document)

    try:
        trainer_step.run(
            device,
            batch,
            classes,
            steps=args.steps,
            warmup=args.warmup,
            model_name=args.model,
            image_size=args.image_size,
            report=record_done,
        )
    except KeyboardInterrupt:  # keep the measurements done (each was written as it finished)
        document["interrupted"] = "KeyboardInterrupt: the measurements after the last record did not run"
        print(f"\ninterrupted: wrote {output.write_json(path, document)}", flush=True)
        return output.INTERRUPTED
    records = document["records"]
    for record in records:
        if "speedup_vs_eager" in record:
            print(f"{record['classes']:>6} classes: fused step {record['speedup_vs_eager']:.3f}x the eager one")
    document["complete"] = True
    print(f"wrote {output.write_json(path, document)}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "trainer-step":
        return run_trainer_step(argv[1:])
    if argv and argv[0] in ("perf-model", "device-check"):
        from . import device_check, perf_model

        return {"perf-model": perf_model.main, "device-check": device_check.main}[argv[0]](argv[1:])
    return run_bench(argv)
