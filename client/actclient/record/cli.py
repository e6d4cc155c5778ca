"""`actclient record` on the command line: the flags, and the exit status."""

from __future__ import annotations

import argparse
import sys

from actclient.http import API_KEY_ENV, api_key_from
from actclient.record.errors import FatalError
from actclient.record.request import MODES, capture_spec_from_flags
from actclient.record.run import (
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT_S,
    RecordOptions,
    format_summary,
    record,
)
from vllm_activations.contract.spec import (
    DEFAULT_MAX_LOGPROBS,
    DTYPES,
    POSITION_MODES,
    SITES,
    CaptureSpecError,
)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        spec = capture_spec_from_flags(
            args.layers,
            args.sites,
            args.positions,
            args.dtype,
            args.channel_stats,
            args.teacher_logprobs,
            args.summary_only,
        )
    except CaptureSpecError as e:
        print(f"record: {e}", file=sys.stderr)
        return 2
    if args.max_tokens is not None and args.max_tokens < 1:
        print(f"record: --max-tokens must be at least 1, got {args.max_tokens}", file=sys.stderr)
        return 2
    options = RecordOptions(
        mode=args.mode,
        spec=spec,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        delete_remote=args.delete_remote,
        progress=False if args.no_progress else None,
    )
    try:
        summary = record(args.datasets, args.server, args.out, options, api_key_from(args.api_key))
    except (FatalError, ValueError) as e:
        print(f"record: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"record: interrupted; rerun to resume into {args.out}", file=sys.stderr)
        return 130
    print(format_summary(summary, args.out), file=sys.stderr)
    return 1 if summary.failed or summary.ingest_errors else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `record` to the top-level `actclient` parser."""
    p = subparsers.add_parser(
        "record",
        help="record activations for Phase 1 records through /generate_with_activations",
        description="Drive every record through the server's /generate_with_activations and "
        "download one verified HDF5 shard per record into OUT/shards, with a manifest at "
        "OUT/manifest.jsonl. Rerunning skips records already recorded. Exit status: 0 all "
        "recorded, 1 some records failed or had dataset problems, 2 bad options or a run "
        "that cannot proceed (e.g. wrong API key).",
    )
    p.add_argument(
        "datasets",
        nargs="+",
        metavar="DATASET",
        help="Phase 1 JSONL files and/or folders of <plus code>_<language>.txt samples",
    )
    p.add_argument(
        "--server",
        action="append",
        required=True,
        help="server URL, e.g. http://localhost:8000; repeat to fan out across servers",
    )
    p.add_argument("-o", "--out", required=True, help="output folder (shards/ and manifest.jsonl)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="generate",
        help="generate: generate and capture; teacher-forced: capture over the prompt plus "
        "the Phase 1 response (default: generate)",
    )
    capture = p.add_argument_group("capture spec")
    capture.add_argument(
        "--layers", default=None, help="'all' (default) or comma-separated indices, e.g. 0,4,-1"
    )
    capture.add_argument(
        "--sites", default=None, help=f"'all' (default) or comma-separated from {', '.join(SITES)}"
    )
    capture.add_argument(
        "--positions",
        default=None,
        help=f"one of {', '.join(POSITION_MODES)} (default: all)",
    )
    capture.add_argument(
        "--dtype", default=None, help=f"one of {', '.join(DTYPES)} (default: bfloat16)"
    )
    capture.add_argument(
        "--channel-stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also record per-neuron statistics of the down_proj and o_proj inputs, which "
        "`actclient plan` needs for the neuron-level plan (default: on)",
    )
    capture.add_argument(
        "--summary-only",
        action="store_true",
        help="keep the layer analysis' token sums, accumulated on the GPU, instead of raw "
        "layer outputs (`summary: true, tensors: false`): megabytes per record instead of "
        "gigabytes; `actclient analyze` reads them like raw shards",
    )
    capture.add_argument(
        "--teacher-logprobs",
        type=int,
        default=DEFAULT_MAX_LOGPROBS,
        metavar="K",
        help="also keep the teacher's top-K next-token ids and logprobs at every captured "
        "position, for `actclient export-kd` (default: %(default)s, vLLM's default "
        "--max-logprobs; at most the server's)",
    )
    capture.add_argument(
        "--no-teacher-logprobs",
        dest="teacher_logprobs",
        action="store_const",
        const=None,
        help="record no teacher logprobs",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"records in flight per server (default: {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--api-key", default=None, help=f"bearer key (default: ${API_KEY_ENV}); never printed"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="generate mode: tokens to generate per record (default: each record's max_tokens)",
    )
    p.add_argument("--temperature", type=float, default=None, help="generate mode: temperature")
    p.add_argument("--seed", type=int, default=None, help="generate mode: sampling seed")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for one record's capture job (default: {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--delete-remote",
        action="store_true",
        help="delete each shard on the server once its download is verified",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a TTY")
    p.set_defaults(func=_run_cli)
