"""The `actclient phase1` command: `build` writes the prompt records, `generate` answers them.

`register(subparsers)` adds the command to the top-level parser; each subcommand sets `func`,
which returns the exit code: 0 all ok, 1 some records failed, 2 bad input or configuration.
The API key is read from --api-key or VLLM_ACTIVATIONS_API_KEY and is never printed.
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

from actclient.phase1.dataset import LANGUAGE_MODES, build_dataset, write_jsonl
from actclient.phase1.generate import (
    DEFAULT_TIMEOUT_S,
    GenerateError,
    generate,
    print_summary,
)
from actclient.phase1.prompts import STYLES

API_KEY_ENV = "VLLM_ACTIVATIONS_API_KEY"


def _styles(value: str) -> list[str]:
    styles = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in styles if s not in STYLES]
    if not styles or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(STYLES)}; got {value!r}"
        )
    return styles


def _build(args: argparse.Namespace) -> int:
    try:
        records = build_dataset(args.places, styles=args.styles, languages=args.language)
    except (OSError, ValueError) as e:
        print(f"phase1 build: {e}", file=sys.stderr)
        return 2
    write_jsonl(records, args.out)
    print(f"phase1 build: wrote {len(records)} records to {args.out}", file=sys.stderr)
    return 0


def _generate(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        summary = generate(
            args.records,
            args.out,
            args.server,
            api_key=api_key,
            model=args.model,
            concurrency=args.concurrency,
            timeout=args.timeout,
            progress=False if args.no_progress else None,
        )
    except (GenerateError, ValueError) as e:
        print(f"phase1 generate: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:  # the server could not be reached or refused /v1/models
        print(f"phase1 generate: cannot use server {args.server}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phase1 generate: interrupted; rerun to resume into {args.out}", file=sys.stderr)
        return 130
    print_summary(summary, args.out)  # each failure was already reported as it happened
    return 1 if summary.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `phase1 build` and `phase1 generate` to the top-level `actclient` parser."""
    phase1 = subparsers.add_parser(
        "phase1",
        help="build tour-stop prompt records and generate their responses",
        description="Phase 1: tour-stop prompts for real places, named by Plus Code.",
    )
    sub = phase1.add_subparsers(dest="phase1_command", required=True, metavar="SUBCOMMAND")

    build = sub.add_parser(
        "build",
        help="write prompt records (JSONL) for the shipped places",
        description="Write one record per place and style as JSONL (atomically).",
    )
    build.add_argument("-o", "--out", required=True, help="output JSONL path")
    build.add_argument(
        "--styles",
        type=_styles,
        default=["stimulate"],
        help=f"comma-separated styles from {', '.join(STYLES)} (default: stimulate)",
    )
    build.add_argument(
        "--language",
        choices=LANGUAGE_MODES,
        default="local",
        help="tour language: each place's local language, or English for all (default: local)",
    )
    build.add_argument("--places", default=None, help="places JSON (default: the shipped one)")
    build.set_defaults(func=_build)

    gen = sub.add_parser(
        "generate",
        help="fill in responses through the server's /v1/chat/completions (resumable)",
        description="Answer each record through the server; finished records are appended to "
        "--out at once, and a rerun skips ids already answered there.",
    )
    gen.add_argument("records", metavar="RECORDS", help="records JSONL (or a samples folder)")
    gen.add_argument("--server", required=True, help="server URL, e.g. http://localhost:8000")
    gen.add_argument("-o", "--out", required=True, help="output JSONL, appended to")
    gen.add_argument(
        "--api-key", default=None, help=f"bearer key (default: ${API_KEY_ENV}); never printed"
    )
    gen.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    gen.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    gen.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for one answer (default: {DEFAULT_TIMEOUT_S:g})",
    )
    gen.add_argument("--no-progress", action="store_true", help="no progress bar, even on a TTY")
    gen.set_defaults(func=_generate)
