"""The `actclient export-kd` command: a recorded run as a knowledge-distillation dataset.

Reads every `ok` record of RUN_DIR/manifest.jsonl (what `actclient record` wrote) and, from
its shard, only the token ids, the positions and the `teacher/` datasets (never the
activations), and writes one row per record to OUT/train.parquet. Rows are buffered at most
`batch_rows` at a time (or about 64 MiB of teacher values) and written as one parquet row group
each, so memory stays flat in the number of shards.

Why parquet: Hugging Face `datasets` loads it as it is (`load_dataset("parquet", ...)`, no
loading script), and so do pyarrow, pandas and polars, without h5py or this package. Columns:

    id               string               the record id
    input_ids        list<int32>          the recorded sequence: prompt (+ text) + generated
    response_start   int32                index in input_ids of the first response token
                                          (teacher-forced: where the text begins)
    positions        list<int32>          positions with teacher rows, ascending
    topk_ids         list<list<int32>>    [T][K] teacher's top-K next-token ids at each position
    topk_logprobs    list<list<float32>>  [T][K] their logprobs (vLLM's raw logprobs)
    next_logprob     list<float32>        [T] logprob of input_ids[positions[t] + 1]

Row t of the teacher columns is the distribution computed at positions[t], i.e. over the token
input_ids[positions[t] + 1] (the shard's alignment). pyarrow is an optional dependency
(`pip install 'vllm-activations[kd]'`), imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actclient.progress import Progress
from vllm_activations.contract.shard import ShardError, ShardReader

MANIFEST_NAME = "manifest.jsonl"
OUT_NAME = "train.parquet"
DEFAULT_BATCH_ROWS = 64
_BATCH_VALUES = 8 << 20  # buffered teacher values (8 bytes each) before a row group is written
METADATA_KEY = b"actclient_kd"


class ExportError(RuntimeError):
    """The run cannot be exported (no manifest, nothing to export, pyarrow missing)."""


@dataclass
class ExportSummary:
    rows: int = 0
    path: Path | None = None
    ks: set[int] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)


def _import_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError as exc:
        raise ExportError(
            "export-kd writes parquet with pyarrow: pip install 'vllm-activations[kd]' "
            "(or pip install pyarrow)"
        ) from exc
    return pa, pq


def schema(pa) -> Any:
    """The dataset's arrow schema (see the module doc)."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("response_start", pa.int32()),
            ("positions", pa.list_(pa.int32())),
            ("topk_ids", pa.list_(pa.list_(pa.int32()))),
            ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
            ("next_logprob", pa.list_(pa.float32())),
        ]
    )


def ok_entries(run_dir: Path) -> list[dict[str, Any]]:
    """The last manifest line of every record, those with status ok, in manifest order."""
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path} not found: give the --out folder of `actclient record`")
    last: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            last.pop(entry["id"], None)
            last[entry["id"]] = entry
    return [e for e in last.values() if e.get("status") == "ok" and e.get("shard")]


@dataclass
class _Row:
    id: str
    input_ids: np.ndarray
    response_start: int
    positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    next_logprob: np.ndarray


def read_row(run_dir: Path, entry: dict[str, Any]) -> _Row:
    """One record's row from its shard; ShardError when it has no teacher data."""
    path = run_dir / entry["shard"]
    with ShardReader(path) as reader:
        teacher = reader.teacher()
        if teacher is None:
            raise ShardError(f"{path}: no teacher data (recorded without --teacher-logprobs?)")
        input_ids = np.concatenate([reader.input_tokens, reader.output_tokens]).astype(np.int32)
        text_start = entry.get("text_start")
        start = int(text_start) if text_start is not None else len(reader.input_tokens)
        return _Row(
            id=entry["id"],
            input_ids=input_ids,
            response_start=start,
            positions=reader.positions.astype(np.int32),
            topk_ids=teacher.topk_ids,
            topk_logprobs=teacher.topk_logprobs,
            next_logprob=teacher.next_logprob,
        )


def _offsets(pa, lengths: Iterable[int]) -> Any:
    lengths = np.fromiter(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(lengths)
    return pa.array(offsets, pa.int32())


def _lists(pa, parts: list[np.ndarray], value_type) -> Any:
    """A list<value_type> array with one list per part (1-D numpy arrays)."""
    values = np.concatenate([p.ravel() for p in parts])
    return pa.ListArray.from_arrays(
        _offsets(pa, (len(p) for p in parts)), pa.array(values, type=value_type)
    )


def _nested(pa, parts: list[np.ndarray], value_type) -> Any:
    """A list<list<value_type>> array with one [T][K] list per part ([T, K] numpy arrays)."""
    values = pa.array(np.concatenate([p.ravel() for p in parts]), type=value_type)
    rows = np.repeat([p.shape[1] for p in parts], [p.shape[0] for p in parts])
    inner = pa.ListArray.from_arrays(_offsets(pa, rows), values)
    return pa.ListArray.from_arrays(_offsets(pa, (len(p) for p in parts)), inner)


def _batch(pa, rows: list[_Row]) -> Any:
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.id for r in rows], pa.string()),
            _lists(pa, [r.input_ids for r in rows], pa.int32()),
            pa.array([r.response_start for r in rows], pa.int32()),
            _lists(pa, [r.positions for r in rows], pa.int32()),
            _nested(pa, [r.topk_ids for r in rows], pa.int32()),
            _nested(pa, [r.topk_logprobs for r in rows], pa.float32()),
            _lists(pa, [r.next_logprob for r in rows], pa.float32()),
        ],
        schema=schema(pa),
    )


def export_kd(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool | None = None,
) -> ExportSummary:
    """Write OUT/train.parquet from RUN_DIR (atomically: a temporary name, then renamed).

    Records whose shard is missing or has no teacher data are reported on stderr and left
    out; ExportError when no record can be exported (nothing is written then).
    """
    if batch_rows < 1:
        raise ExportError(f"--batch-rows must be at least 1, got {batch_rows}")
    pa, pq = _import_pyarrow()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    entries = ok_entries(run_dir)
    if not entries:
        raise ExportError(f"{run_dir / MANIFEST_NAME} lists no recorded (ok) record")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / OUT_NAME
    tmp = out_dir / f".{OUT_NAME}.partial"
    summary = ExportSummary(path=final)
    meta: dict[str, Any] = {"source": str(run_dir.resolve()), "k": []}
    writer = pq.ParquetWriter(tmp, schema(pa))
    pending: list[_Row] = []
    values = 0

    def flush() -> None:
        nonlocal values
        if pending:
            writer.write_batch(_batch(pa, pending), row_group_size=len(pending))
            pending.clear()
            values = 0

    try:
        with Progress(len(entries), desc="export-kd", unit="rec", enabled=progress) as bar:
            for entry in entries:
                try:
                    row = read_row(run_dir, entry)
                except (ShardError, OSError) as exc:
                    summary.skipped.append(f"{entry['id']}: {exc}")
                    bar.write(f"export-kd: skipped {entry['id']}: {exc}")
                else:
                    pending.append(row)
                    values += row.topk_ids.size
                    summary.rows += 1
                    summary.ks.add(int(row.topk_ids.shape[1]))
                    if len(pending) >= batch_rows or values >= _BATCH_VALUES:
                        flush()
                bar.update(1, rows=summary.rows, skipped=len(summary.skipped))
            flush()
        if not summary.rows:
            raise ExportError(f"no record of {run_dir} has teacher data; nothing written")
        meta["k"] = sorted(summary.ks)
        writer.add_key_value_metadata({METADATA_KEY.decode(): json.dumps(meta)})
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if writer.is_open:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return summary


def _run_cli(args: argparse.Namespace) -> int:
    try:
        summary = export_kd(
            args.run_dir,
            args.out,
            batch_rows=args.batch_rows,
            progress=False if args.no_progress else None,
        )
    except ExportError as exc:
        print(f"export-kd: {exc}", file=sys.stderr)
        return 2
    ks = ",".join(str(k) for k in sorted(summary.ks))
    print(
        f"export-kd: {summary.rows} rows (K={ks}) in {summary.path}; "
        f"{len(summary.skipped)} skipped",
        file=sys.stderr,
    )
    return 1 if summary.skipped else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `export-kd` to the top-level `actclient` parser."""
    p = subparsers.add_parser(
        "export-kd",
        help="export a recorded run's token ids and teacher logprobs as parquet for distillation",
        description="Write OUT/train.parquet, one row per recorded record: its token ids, the "
        "first response token's index and the teacher's top-K next-token ids and logprobs "
        "at every captured position (load it with datasets.load_dataset('parquet', ...)). "
        "Exit status: 0 all exported, 1 some records skipped, 2 nothing exportable.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `actclient record`")
    p.add_argument("-o", "--out", required=True, help="output folder (train.parquet goes there)")
    p.add_argument(
        "--batch-rows",
        type=int,
        default=DEFAULT_BATCH_ROWS,
        help=f"records per parquet row group, the most held in memory (default: "
        f"{DEFAULT_BATCH_ROWS})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a TTY")
    p.set_defaults(func=_run_cli)
