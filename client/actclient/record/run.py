"""The run: which records are still to do, each one captured, downloaded, verified and put in
place, in parallel over the servers, and the manifest line appended only after that."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from actclient.http import (
    MAX_ATTEMPTS,
    RetriesExhausted,
    ServerCheckFailed,
    ServerUnreachable,
    auth_headers,
    backoff,
    probe,
)
from actclient.jsonl import JsonlAppender
from actclient.phase1.dataset import Phase1Record
from actclient.phase1.ingest import load_records
from actclient.progress import Progress
from actclient.record.errors import FatalError, RecordError, ShardGone
from actclient.record.manifest import (
    SHARDS_DIRNAME,
    RunPaths,
    failed_entry,
    matches,
    now,
    read_job,
    read_manifest,
    shard_verifies,
    write_json,
)
from actclient.record.request import MODES, request_body
from actclient.record.transport import (
    REQUEST_TIMEOUT_S,
    Server,
    ServerPool,
    delete_remote,
    download,
    submit_and_wait,
)
from vllm_activations.contract.files import fsync_dir
from vllm_activations.contract.spec import CaptureSpec

DEFAULT_CONCURRENCY = 4

DEFAULT_TIMEOUT_S = 3600.0


@dataclass
class RecordOptions:
    mode: str = "generate"
    spec: CaptureSpec = field(default_factory=CaptureSpec)
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float = DEFAULT_TIMEOUT_S
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    delete_remote: bool = False
    progress: bool | None = None  # None: only on a terminal


@dataclass
class RecordSummary:
    ok: int = 0
    skipped: int = 0
    skipped_unanswered: int = 0  # teacher-forced records without a response
    failed: int = 0
    tokens: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0
    ingest_errors: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    fatal: str | None = None


class Recorder:
    """Records a list of Phase 1 records into one output folder."""

    def __init__(
        self,
        servers: Sequence[str],
        out_dir: str | os.PathLike[str],
        options: RecordOptions,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the HTTP transport (tests use an in-process fake server)."""
        if not servers:
            raise ValueError("give at least one --server")
        if options.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {options.concurrency}")
        if options.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {options.mode!r}")
        self.pool = ServerPool(servers)
        self.paths = RunPaths.of(Path(out_dir))
        self.options = options
        self._api_key = api_key
        self.summary = RecordSummary()
        self._fatal: FatalError | None = None
        self._bar: Progress | None = None
        self._transport = transport

    def plan(self, records: Sequence[Phase1Record]) -> list[Phase1Record]:
        """Records still to do; counts the ones already recorded as skipped (and removes
        their leftover job and part files, if a kill came after the manifest line).

        Raises FatalError when OUT holds records made with another mode or capture spec.
        """
        done = read_manifest(self.paths.manifest)
        spec, mode = self.options.spec.to_dict(), self.options.mode
        for entry in done.values():
            if entry.get("status") == "ok" and (
                entry.get("mode") != mode or entry.get("capture") != spec
            ):
                raise FatalError(
                    f"{self.paths.out} already holds records made with mode "
                    f"{entry.get('mode')!r} and capture {entry.get('capture')}; this run asks "
                    f"for mode {mode!r} and capture {spec}: use another --out"
                )
        todo = []
        for record in records:
            entry = done.get(record.id)
            if entry is not None and shard_verifies(self.paths.out, entry):
                self.summary.skipped += 1
                # Killed after its manifest line but before its job file went: tidy up.
                self.paths.job(record.id).unlink(missing_ok=True)
                self.paths.part(record.id).unlink(missing_ok=True)
            else:
                todo.append(record)
        return todo

    async def _capture_and_download(
        self, client: httpx.AsyncClient, record: Phase1Record, pending: dict[str, Any] | None
    ) -> tuple[Server, dict[str, Any]]:
        """Capture (unless `pending` holds a finished capture), download, verify and rename
        into place; retries a record whose capture or download failed retryably."""
        final, part, job_file = (
            self.paths.final(record.id),
            self.paths.part(record.id),
            self.paths.job(record.id),
        )
        body = request_body(
            record,
            self.options.mode,
            self.options.spec,
            self.options.max_tokens,
            self.options.temperature,
            self.options.seed,
        )
        attempt = 0
        while True:
            attempt += 1
            home = self.pool.get(pending["server"]) if pending is not None else None
            if home is None:
                # No capture to resume, or it is on a server this run does not use.
                pending = None
            server = home or self.pool.pick()
            server.in_flight += 1
            try:
                if pending is not None:
                    result = pending["result"]  # finished capture, download not yet verified
                else:
                    part.unlink(missing_ok=True)
                    result = await submit_and_wait(client, server, body, self.options.timeout)
                    pending = {"server": server.base, "result": result}
                    write_json(job_file, pending)
                await download(client, server, result, part)
                os.replace(part, final)
                fsync_dir(final.parent)
                server.failures = max(server.failures - 1, 0)
                return server, result
            except ShardGone:
                # The remembered capture is gone from its server: capture afresh.
                pending = None
                job_file.unlink(missing_ok=True)
                part.unlink(missing_ok=True)
                if attempt >= MAX_ATTEMPTS:
                    raise
            except (RecordError, RetriesExhausted) as e:
                # RetriesExhausted: that server kept failing; another may do (or it recovers).
                server.failures += 1
                retryable = isinstance(e, RetriesExhausted) or e.retryable
                if not retryable or attempt >= MAX_ATTEMPTS:
                    raise RecordError(str(e)) from None
                await asyncio.sleep(backoff(attempt))
            finally:
                server.in_flight -= 1

    async def _record_one(self, client: httpx.AsyncClient, record: Phase1Record) -> dict[str, Any]:
        """Capture, download and verify one record; its manifest entry (status ok)."""
        final, job_file = self.paths.final(record.id), self.paths.job(record.id)
        pending = read_job(job_file)
        if pending is not None and final.exists() and matches(final, pending["result"]):
            # Killed after the rename but before the manifest line: the shard is already here.
            result = pending["result"]
            server = self.pool.get(pending["server"]) or Server(pending["server"])
        else:
            server, result = await self._capture_and_download(client, record, pending)
        if self.options.delete_remote:
            problem = await delete_remote(client, server, result)
            if problem:
                self._log(f"warning: {problem}")
        shard = result["shard"]
        n_in, n_out = len(result.get("input_tokens") or []), len(result.get("output_tokens") or [])
        return {
            "id": record.id,
            "status": "ok",
            "shard": f"{SHARDS_DIRNAME}/{final.name}",
            "bytes": int(shard["bytes"]),
            "sha256": shard["sha256"],
            "tokens": n_in + n_out,
            "input_tokens": n_in,
            "output_tokens": n_out,
            "text_start": result.get("text_start"),
            "finish_reason": result.get("finish_reason"),
            "mode": self.options.mode,
            "capture": self.options.spec.to_dict(),
            "server": server.base,
            "remote_id": shard["id"],
            "error": None,
            "finished": now(),
        }

    def _log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr)

    async def run(self, todo: Sequence[Phase1Record]) -> RecordSummary:
        """Record `todo` (from `plan`), appending to the manifest as records finish. Nothing
        is created in OUT before the servers pass `_preflight`."""
        manifest: JsonlAppender | None = None
        limit = self.options.concurrency * len(self.pool.servers)
        semaphore = asyncio.Semaphore(limit)
        timeouts = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0, pool=None)
        transport = self._transport or httpx.AsyncHTTPTransport(
            retries=2, limits=httpx.Limits(max_connections=2 * limit)
        )
        start = time.monotonic()
        paths = self.paths
        created = [p for p in (paths.out, paths.shards, paths.manifest) if not p.exists()]
        try:
            async with httpx.AsyncClient(
                headers=auth_headers(self._api_key), timeout=timeouts, transport=transport
            ) as client:
                await self._preflight(client)
                self.paths.shards.mkdir(parents=True, exist_ok=True)
                manifest = JsonlAppender(self.paths.manifest)
                with Progress(
                    len(todo), desc="record", unit="rec", enabled=self.options.progress
                ) as bar:
                    self._bar = bar

                    async def one(record: Phase1Record) -> None:
                        async with semaphore:
                            if self._fatal is not None:
                                return
                            await self._one_and_log(client, record, manifest)
                            bar.update(
                                1,
                                ok=self.summary.ok,
                                failed=self.summary.failed,
                                MiB=f"{self.summary.bytes / 2**20:.1f}",
                            )

                    await asyncio.gather(*(one(r) for r in todo))
        finally:
            if manifest is not None:
                manifest.close()
            self._bar = None
            self.summary.elapsed_s = time.monotonic() - start
            if self._fatal is not None and not (self.summary.ok or self.summary.failed):
                _remove_if_empty(created)  # refused at once (a bad spec): leave OUT as it was
        if self._fatal is not None:
            self.summary.fatal = str(self._fatal)
        return self.summary

    async def _preflight(self, client: httpx.AsyncClient) -> None:
        """Check every server with `probe`: a wrong server or key stops the run (FatalError);
        one that cannot be reached is left out while another can be, else FatalError.

        A server that answers 503 while vLLM starts is kept: requests to it are retried.
        """
        reachable, problems = [], []
        for server in self.pool.servers:
            try:
                await probe(client, server.base, "sidecar")
            except ServerUnreachable as e:
                problems.append(str(e))
            except ServerCheckFailed as e:
                raise FatalError(str(e)) from None
            else:
                reachable.append(server)
        if not reachable:
            raise FatalError("; ".join(problems))
        for problem in problems:
            self._log(f"warning: leaving out a server: {problem}")
        self.pool.servers = reachable

    async def _one_and_log(
        self, client: httpx.AsyncClient, record: Phase1Record, manifest: JsonlAppender
    ) -> None:
        try:
            entry = await self._record_one(client, record)
        except FatalError as e:
            if self._fatal is None:
                self._fatal = e
            return
        except RecordError as e:
            self.summary.failed += 1
            self.summary.errors.append(f"{record.id}: {e}")
            self._log(f"failed {record.id}: {e}")
            manifest.append(
                failed_entry(record.id, self.options.mode, self.options.spec.to_dict(), str(e))
            )
            return
        manifest.append(entry)
        self.paths.job(record.id).unlink(missing_ok=True)
        self.summary.ok += 1
        self.summary.tokens += entry["tokens"]
        self.summary.bytes += entry["bytes"]


def _remove_if_empty(paths: Sequence[Path]) -> None:
    """Remove the files and folders in `paths` (this run created them) that are still empty,
    innermost first."""
    for path in reversed(paths):
        try:
            if path.is_dir():
                path.rmdir()  # only when empty
            elif path.is_file() and path.stat().st_size == 0:
                path.unlink()
        except OSError:
            pass


def record(
    datasets: Iterable[str | os.PathLike[str]],
    servers: Sequence[str],
    out_dir: str | os.PathLike[str],
    options: RecordOptions | None = None,
    api_key: str | None = None,
    log: TextIO | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RecordSummary:
    """Record every loadable record of `datasets` (Phase 1 JSONL files or sample folders).

    Ingest problems are printed (`file:line: message`) to `log` (default stderr) and counted;
    the good records are still recorded. Teacher-forced records without a response are counted
    as skipped in one line and leave the manifest unchanged. Raises ValueError for a missing
    dataset or one with no loadable record, FatalError for a run that cannot proceed; either
    way before anything is created in `out_dir`.
    """
    options = options or RecordOptions()
    log = log or sys.stderr
    start = time.monotonic()
    datasets = list(datasets)
    missing = [str(d) for d in datasets if not Path(d).exists()]
    if missing:
        raise ValueError(f"no such dataset file or folder: {', '.join(missing)}")
    loaded = load_records(datasets)
    recorder = Recorder(servers, out_dir, options, api_key, transport)
    recorder.summary.ingest_errors = list(loaded.errors)
    for error in loaded.errors:
        print(error, file=log)
    records = loaded.records
    if not records:
        raise ValueError(f"no loadable records in {', '.join(map(str, datasets))}")
    todo = recorder.plan(records)
    if options.mode == "teacher-forced":
        # Nothing to send for these; the manifest is left as it is, so a rerun is the same.
        unanswered = [r.id for r in todo if not r.response]
        if unanswered:
            recorder.summary.skipped_unanswered = len(unanswered)
            print(
                f"record: skipped {len(unanswered)} record(s) without a response to "
                f"teacher-force (first: {unanswered[0]}); run `actclient phase1 generate` "
                "first, or use --mode generate",
                file=log,
            )
        todo = [r for r in todo if r.response]
    if todo:
        asyncio.run(recorder.run(todo))
    recorder.summary.elapsed_s = time.monotonic() - start
    if recorder.summary.fatal:
        raise FatalError(recorder.summary.fatal)
    return recorder.summary


def format_summary(summary: RecordSummary, out_dir: str | os.PathLike[str]) -> str:
    mib = summary.bytes / 2**20
    unanswered = (
        f", {summary.skipped_unanswered} skipped (no response to teacher-force)"
        if summary.skipped_unanswered
        else ""
    )
    lines = [
        f"record: {summary.ok} ok, {summary.skipped} skipped (already in {out_dir}){unanswered}, "
        f"{summary.failed} failed; {summary.tokens} tokens, {summary.bytes} bytes "
        f"({mib:.1f} MiB) in {summary.elapsed_s:.1f} s"
    ]
    if summary.ingest_errors:
        lines.append(f"record: {len(summary.ingest_errors)} dataset problem(s), reported above")
    return "\n".join(lines)
