"""`aepg-train` / `python -m aepg_kernels.train`: the paper's class-incremental protocol from a preset
or YAML file plus `section.key=value` overrides.

    aepg-train --config demo_digits                        # one run (the embedded demo)
    aepg-train --config imagenet_r_10task_lora data.root=/data/imagenet-r model.checkpoint=vit.safetensors
    aepg-train compare --config demo_digits --losses ce,aepg --seeds 0,1,2    # the paper's Table 2 layout
    aepg-train sweep --config demo_digits --grid loss.name=ce,aepg --grid data.label_noise=0,0.2 \
        --seeds 0,1,2 --baseline loss.name=ce                   # a grid x seeds, paired statistics
    aepg-train --config demo_digits --print-config         # the resolved config, nothing run

Multi-process data parallel: `torchrun --nproc_per_node N -m aepg_kernels.train --config ...`.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import aepg_kernels

from .config import ConfigError, config_to_yaml, list_presets, load_config


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a preset name or a YAML file (presets: --list-presets)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-3 loss.name=ce")


def _parsers():
    run = argparse.ArgumentParser(
        prog="aepg-train",
        description=__doc__.splitlines()[0],
        epilog="compare mode: aepg-train compare --help; sweep mode: aepg-train sweep --help",
    )
    _common(run)
    run.add_argument("--list-presets", action="store_true", help="print the shipped presets and exit")
    compare = argparse.ArgumentParser(
        prog="aepg-train compare", description="several losses x several seeds, a mean +- std table"
    )
    _common(compare)
    # Comma lists, so that the overrides may follow them on the command line.
    compare.add_argument(
        "--losses",
        type=aepg_kernels.utils.comma_list_argument(str),
        default=["ce", "aepg"],
        help="loss.name values, comma-separated (default: ce,aepg)",
    )
    compare.add_argument(
        "--seeds",
        type=aepg_kernels.utils.comma_list_argument(int),
        default=[0, 1, 2],
        help="run.seed values, comma-separated (default: 0,1,2)",
    )
    sweep = argparse.ArgumentParser(
        prog="aepg-train sweep",
        description="the cartesian product of a grid x seeds, paired by seed; finished "
        "runs are read back, not run again",
    )
    _common(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="section.key=v1,v2,...",
        help="a key and its values, comma-separated; repeat for more keys (the product is run)",
    )
    sweep.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="section.key=value[,section.key=value]",
        help="one more configuration outside the product (e.g. loss.schedule=sigmoid beside a grid "
        "of fixed alphas); repeatable",
    )
    sweep.add_argument(
        "--seeds",
        type=aepg_kernels.utils.comma_list_argument(int),
        default=[0, 1, 2],
        help="run.seed values, comma-separated (default: 0,1,2)",
    )
    sweep.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="section.key=value",
        help="compare every configuration with the one having these grid values (and, if several "
        "do, its other grid values): paired differences over seeds; repeatable",
    )
    return run, compare, sweep


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_parser, compare_parser, sweep_parser = _parsers()
    mode = argv[0] if argv and argv[0] in ("compare", "sweep") else "run"
    parser = {"run": run_parser, "compare": compare_parser, "sweep": sweep_parser}[mode]
    # intermixed: the overrides may stand before, between or after the options
    args = parser.parse_intermixed_args(argv if mode == "run" else argv[1:])
    if getattr(args, "list_presets", False):
        print("\n".join(list_presets()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"aepg-train: config error: {e}", file=sys.stderr)
        return 2
    print(config_to_yaml(cfg), end="", flush=True)
    if args.print_config:
        return 0
    from . import distributed

    try:
        return {"run": lambda: _run(cfg), "compare": lambda: _compare(cfg, args), "sweep": lambda: _sweep(cfg, args)}[
            mode
        ]()
    finally:
        distributed.shutdown()


def _run(cfg) -> int:
    from .runner import run  # timm, matplotlib and the data only once something runs

    run(cfg)
    return 0


def _compare(cfg, args) -> int:
    from . import distributed
    from .compare import format_compare_table, run_compare, write_compare_outputs
    from .runner import run

    try:
        aggregated = run_compare(cfg, args.losses, args.seeds, run)
    except ConfigError as e:  # bad loss names or seeds: checked before the first run
        print(f"aepg-train compare: {e}", file=sys.stderr)
        return 2
    if distributed.is_main():
        print(format_compare_table(aggregated))
        paths = write_compare_outputs(cfg.run.output_dir, aggregated)
        print(f"outputs: {', '.join(str(p) for p in paths.values())}")
    return 0


def _sweep(cfg, args) -> int:
    from . import distributed
    from .compare import (
        format_compare_table,
        grid_values,
        parse_grid,
        run_sweep,
        sweep_configurations,
        write_sweep_outputs,
    )
    from .runner import run
    from .stats import compare_to_baseline, format_difference_table, pair_baselines, write_stats_outputs

    try:
        grid = parse_grid(args.grid)
        if not grid and not args.extra:
            raise ConfigError("sweep.grid: give at least one --grid key=v1,v2,... or --extra configuration")
        if args.baseline:  # checked before the first run too
            configurations = sweep_configurations(grid, args.extra)
            pair_baselines({name: grid_values(a) for name, a in configurations.items()}, args.baseline)
        swept = run_sweep(cfg, grid, args.seeds, run, extra=args.extra)
        if args.baseline:
            swept["comparisons"] = compare_to_baseline(swept, args.baseline)
    except ConfigError as e:  # a bad grid, seeds or a config of the grid: checked before the first run
        print(f"aepg-train sweep: {e}", file=sys.stderr)
        return 2
    if distributed.is_main():
        print(format_compare_table(swept))
        if args.baseline:
            print(format_difference_table(swept["comparisons"]))
        paths = {**write_sweep_outputs(cfg.run.output_dir, swept), **write_stats_outputs(cfg.run.output_dir, swept)}
        print(f"outputs: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
