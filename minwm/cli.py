"""The `minwm` command. Each area registers its own sub-commands; nothing below this file parses argv."""

from __future__ import annotations

import argparse
import importlib
import sys

from minwm.errors import MinwmError

# Modules that define `register(subparsers)`; each adds its sub-commands with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "minwm.cameras.cli",
    "minwm.data.cli",
    "minwm.codecs.cli",
    "minwm.world_cli",
    "minwm.bench.cli",
    "minwm.serve.cli",
    "minwm.stages.cli",
    "minwm.quickstart",
    "minwm.eval.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minwm", description=__doc__)
    parser.add_argument("--version", action="version", version=importlib.import_module("minwm").__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except MinwmError as e:
        print(f"minwm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minwm: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
