"""The `actclient` command line: one subcommand per stage of the pipeline.

Each stage module exposes `register(subparsers)`, which adds its commands and sets
`args.func(args) -> int`; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from actclient import __version__

# Stage modules, in pipeline order.
COMMAND_MODULES = (
    "actclient.phase1.cli",
    "actclient.record",
    "actclient.analysis.cli",
    "actclient.prune",
    "actclient.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actclient",
        description="Phase 1 dataset, activation recording and pruning analysis for "
        "vllm-activations.",
    )
    parser.add_argument("--version", action="version", version=f"actclient {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
