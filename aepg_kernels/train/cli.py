"""`aepg-train` / `python -m aepg_kernels.train`: resolve a preset or YAML file plus overrides.

Training from the command line is not wired yet (issue 4); for now the command prints the resolved
config (always) and lists the presets.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ConfigError, config_to_yaml, list_presets, load_config


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aepg-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a preset name or a YAML file (presets: --list-presets)")
    parser.add_argument("--list-presets", action="store_true", help="print the shipped presets and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-3 loss.name=ce")
    args = parser.parse_args(argv)
    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"aepg-train: config error: {e}", file=sys.stderr)
        return 2
    print(config_to_yaml(cfg), end="")
    print("# training from the command line is not implemented yet (issue 4)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
