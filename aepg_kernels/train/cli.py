"""`aepg-train` / `python -m aepg_kernels.train`: the paper's class-incremental protocol from a preset
or YAML file plus `section.key=value` overrides.

    aepg-train --config demo_digits                        # one run (the embedded demo)
    aepg-train --config imagenet_r_10task_lora data.root=/data/imagenet-r model.checkpoint=vit.safetensors
    aepg-train compare --config demo_digits --losses ce,aepg --seeds 0,1,2    # the paper's Table 2 layout
    aepg-train --config demo_digits --print-config         # the resolved config, nothing run

Multi-process data parallel: `torchrun --nproc_per_node N -m aepg_kernels.train --config ...`.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ConfigError, config_to_yaml, list_presets, load_config


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a preset name or a YAML file (presets: --list-presets)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-3 loss.name=ce")


def _parsers():
    run = argparse.ArgumentParser(prog="aepg-train", description=__doc__.splitlines()[0],
                                  epilog="compare mode: aepg-train compare --help")
    _common(run)
    run.add_argument("--list-presets", action="store_true", help="print the shipped presets and exit")
    compare = argparse.ArgumentParser(prog="aepg-train compare",
                                      description="several losses x several seeds, a mean +- std table")
    _common(compare)
    # Comma lists, so that the overrides may follow them on the command line.
    compare.add_argument("--losses", type=_comma_list(str), default=["ce", "aepg"],
                         help="loss.name values, comma-separated (default: ce,aepg)")
    compare.add_argument("--seeds", type=_comma_list(int), default=[0, 1, 2],
                         help="run.seed values, comma-separated (default: 0,1,2)")
    return run, compare


def _comma_list(kind):
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, got {text!r}") from None
    return parse


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    compare_mode = bool(argv) and argv[0] == "compare"
    run_parser, compare_parser = _parsers()
    args = (compare_parser if compare_mode else run_parser).parse_args(argv[1:] if compare_mode else argv)
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
        return _compare(cfg, args) if compare_mode else _run(cfg)
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


if __name__ == "__main__":
    sys.exit(main())
