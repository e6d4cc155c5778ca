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
    "actclient.export_kd",
    "actclient.analysis.cli",
    "actclient.analysis.crosscheck",
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
    """Run one command; its exit status. Bad input that a command did not report itself (a
    missing or unreadable file, a directory where a file belongs, malformed JSON) is one line
    on stderr and exit status 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"actclient {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        print(f"actclient {args.command}: {_reason(exc)}", file=sys.stderr)
        return 2


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        # A rename names its destination second: that is the path the user gave.
        where = exc.filename2 if exc.filename2 is not None else exc.filename
        return f"{where}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
