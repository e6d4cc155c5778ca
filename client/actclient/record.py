"""The `actclient record` command: drive Phase 1 records through /generate_with_activations.

For each record the client submits a capture with `wait: false` (the server answers 202 with a
job URL at once, so no request is ever held near a proxy's 100 s cut), polls `GET /jobs/{id}`
until the shard is ready, then streams `GET /shards/{id}` to `OUT/shards/.<name>.h5.part`,
resuming with `Range` after a dropped connection, checks the whole file against the
`X-Content-SHA256` header and the job's sha256, fsyncs and renames it to
`OUT/shards/<name>.h5`. Only then is one line appended (and fsynced) to `OUT/manifest.jsonl`.

Modes: `generate` sends the record's chat messages and generates `max_tokens` tokens;
`teacher-forced` sends the chat messages plus the Phase 1 response as `text`, so the capture
covers exactly the prompt followed by the response and nothing is generated.

Resuming: a rerun skips every record whose last manifest line is `ok` and whose shard file is
present with the recorded size and sha256. A record whose capture finished on the server but
whose download was interrupted (the client was killed) resumes that download from the same
server by `Range` (the job's result is kept in `OUT/shards/.<name>.h5.job.json`), so a kill
loses no finished capture. Requests are retried with backoff and jitter on 429 (honouring
`Retry-After`), 5xx and timeouts; several `--server` URLs share the work, each record going
to the least busy server. The API key is sent only in the Authorization header.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from actclient.http import (
    API_KEY_ENV,
    MAX_ATTEMPTS,
    RetriesExhausted,
    ServerCheckFailed,
    ServerUnreachable,
    api_base,
    api_key_from,
    auth_headers,
    backoff,
    describe,
    error_field,
    is_retryable,
    probe,
    request_with_retries,
)
from actclient.jsonl import JsonlAppender
from actclient.phase1.dataset import Phase1Record
from actclient.phase1.ingest import load_records
from actclient.progress import Progress
from vllm_activations.files import file_sha256, fsync_dir
from vllm_activations.shard import SHARD_SUFFIX
from vllm_activations.spec import (
    DEFAULT_MAX_LOGPROBS,
    DTYPES,
    POSITION_MODES,
    SITES,
    CaptureSpec,
    CaptureSpecError,
)

MODES = ("generate", "teacher-forced")
MANIFEST_NAME = "manifest.jsonl"
SHARDS_DIRNAME = "shards"
DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT_S = 3600.0
REQUEST_TIMEOUT_S = 60.0  # one HTTP request; every request is short thanks to the job flow
POLL_START_S = 0.2
POLL_MAX_S = 2.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,150}$")


class RecordError(RuntimeError):
    """One record failed; `retryable` says whether submitting it again may help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class FatalError(RuntimeError):
    """Every record would fail the same way (bad key, bad capture spec): stop the run."""


class ShardGone(RecordError):
    """The server no longer has the shard (deleted, or the server was replaced)."""


# ---------------------------------------------------------------------------------------------
# Capture spec from the command line


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def capture_spec_from_flags(
    layers: str | None = None,
    sites: str | None = None,
    positions: str | None = None,
    dtype: str | None = None,
    channel_stats: bool | None = None,
    teacher_logprobs: int | None = None,
    summary_only: bool = False,
) -> CaptureSpec:
    """A validated CaptureSpec from the flag strings; raises CaptureSpecError naming the field.

    layers: `all` or comma-separated indices (negative count from the end); sites: `all` or a
    comma-separated list; positions, dtype, channel_stats and teacher_logprobs as in the spec;
    summary_only: `summary: true, tensors: false` (the layer analysis' sums, no raw tensors).
    None leaves the
    spec's default.
    """
    kwargs: dict[str, Any] = {}
    if layers is not None and layers.strip().lower() != "all":
        parsed = []
        for item in _split(layers) or [layers]:
            try:
                parsed.append(int(item))
            except ValueError:
                raise CaptureSpecError(
                    "layers", f"{item!r} is not an integer layer index (use e.g. 0,4,8 or all)"
                ) from None
        kwargs["layers"] = parsed
    if sites is not None and sites.strip().lower() != "all":
        kwargs["sites"] = _split(sites)
    if positions is not None:
        kwargs["positions"] = positions.strip()
    if dtype is not None:
        kwargs["dtype"] = dtype.strip()
    if channel_stats is not None:
        kwargs["channel_stats"] = channel_stats
    if teacher_logprobs is not None:
        kwargs["teacher_logprobs"] = teacher_logprobs
    if summary_only:
        kwargs.update(summary=True, tensors=False)
    return CaptureSpec(**kwargs)


def request_body(
    record: Phase1Record,
    mode: str,
    spec: CaptureSpec,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The /generate_with_activations body for one record (always the async job flow)."""
    body: dict[str, Any] = {
        "messages": record.messages(),
        "capture": spec.to_dict(),
        "wait": False,
    }
    if mode == "teacher-forced":
        if not record.response:
            raise RecordError(
                "no response to teacher-force (run `actclient phase1 generate` first, or use "
                "--mode generate)"
            )
        body["text"] = record.response
    else:
        body["max_tokens"] = max_tokens or record.max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if seed is not None:
            body["seed"] = seed
    return body


# ---------------------------------------------------------------------------------------------
# Files: shard names, hashing, the manifest


def shard_name(record_id: str) -> str:
    """The shard file name for a record id: the id itself when it is a safe file name, else a
    sanitised id with a short hash (ids are unique, and so are these names)."""
    if _SAFE_NAME.match(record_id) and not record_id.endswith((".part", ".json")):
        return record_id + SHARD_SUFFIX
    clean = re.sub(r"[^A-Za-z0-9._+-]", "_", record_id).lstrip("._-")[:100] or "record"
    digest = hashlib.sha256(record_id.encode()).hexdigest()[:12]
    return f"{clean}-{digest}{SHARD_SUFFIX}"


def read_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The last manifest line of every record id (a torn last line is ignored)."""
    path = Path(path)
    entries: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return entries
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            entries[obj["id"]] = obj
    return entries


def shard_verifies(out_dir: Path, entry: dict[str, Any]) -> bool:
    """Whether an `ok` manifest entry's shard file exists with its recorded size and sha256."""
    shard = entry.get("shard")
    if entry.get("status") != "ok" or not isinstance(shard, str):
        return False
    path = out_dir / shard
    try:
        if path.stat().st_size != entry.get("bytes"):
            return False
    except OSError:
        return False
    return file_sha256(path) == entry.get("sha256")


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    """One sidecar URL and how busy it is (for least-busy fan-out)."""

    base: str
    in_flight: int = 0
    failures: int = 0

    def url(self, path: str) -> str:
        """A server-relative URL from a response (`/jobs/x`) as an absolute one."""
        if path.startswith(("http://", "https://")):
            return path
        return self.base + "/" + path.lstrip("/")


class ServerPool:
    """Picks the least busy server; ties go round-robin, recent failures count as load."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.servers = [Server(api_base(u)) for u in urls]
        self._turn = itertools.count()

    def get(self, base: str) -> Server | None:
        return next((s for s in self.servers if s.base == api_base(base)), None)

    def pick(self) -> Server:
        start = next(self._turn) % len(self.servers)
        order = self.servers[start:] + self.servers[:start]
        return min(order, key=lambda s: s.in_flight + 2 * s.failures)


# ---------------------------------------------------------------------------------------------
# The run


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


@dataclass
class _Paths:
    out: Path
    shards: Path
    manifest: Path

    @classmethod
    def of(cls, out_dir: Path) -> _Paths:
        return cls(out_dir, out_dir / SHARDS_DIRNAME, out_dir / MANIFEST_NAME)

    def final(self, record_id: str) -> Path:
        return self.shards / shard_name(record_id)

    def part(self, record_id: str) -> Path:
        return self.shards / f".{shard_name(record_id)}.part"

    def job(self, record_id: str) -> Path:
        return self.shards / f".{shard_name(record_id)}.job.json"


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
        self.paths = _Paths.of(Path(out_dir))
        self.options = options
        self._api_key = api_key
        self.summary = RecordSummary()
        self._fatal: FatalError | None = None
        self._bar: Progress | None = None
        self._transport = transport

    # -- planning ---------------------------------------------------------------------------

    def plan(self, records: Sequence[Phase1Record]) -> list[Phase1Record]:
        """Records still to do; counts the ones already recorded as skipped.

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
            else:
                todo.append(record)
        return todo

    # -- one record -------------------------------------------------------------------------

    async def _submit_and_wait(
        self, client: httpx.AsyncClient, server: Server, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Submit one capture job and poll it to the end; the finished result body."""
        url = server.url("/generate_with_activations")
        response = await request_with_retries(client, "POST", url, json=body)
        if response.status_code == 200:  # a server that ignored `wait: false`
            return response.json()
        if response.status_code != 202:
            self._check_fatal(response)
            raise RecordError(describe(response))
        accepted = response.json()
        job_url = server.url(accepted.get("job_url") or f"/jobs/{accepted['id']}")
        deadline = time.monotonic() + self.options.timeout
        delay = POLL_START_S
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX_S)
            response = await request_with_retries(client, "GET", job_url)
            if response.status_code == 404:
                raise RecordError(
                    f"job {accepted['id']} vanished from {server.base} (server restarted?)",
                    retryable=True,
                )
            if response.status_code != 200:
                raise RecordError(f"polling {job_url}: {describe(response)}")
            job = response.json()
            if job.get("status") == "succeeded" and job.get("result"):
                return job["result"]
            if job.get("status") == "failed":
                error = job.get("error") or {}
                status = int(error.get("status") or 500)
                message = f"HTTP {status}: {error.get('message', 'capture failed')}"
                raise RecordError(f"job {accepted['id']}: {message}", is_retryable(status))
            if time.monotonic() > deadline:
                raise RecordError(
                    f"job {accepted['id']} still running after {self.options.timeout:g} s "
                    "(raise --timeout)"
                )

    def _check_fatal(self, response: httpx.Response) -> None:
        """Raise FatalError for answers every other record would get too."""
        status, fld = response.status_code, error_field(response) or ""
        if status in (401, 403) or (status in (400, 422) and fld.startswith("capture")):
            raise FatalError(f"{response.request.url}: {describe(response)}")
        if status in (404, 405):
            raise FatalError(
                f"{response.request.url}: {describe(response)} (is this a vllm-activations "
                "server? give its root URL)"
            )

    async def _download(
        self, client: httpx.AsyncClient, server: Server, result: dict[str, Any], part: Path
    ) -> None:
        """Stream the shard into `part`, resuming by Range; verify size and sha256."""
        shard = result["shard"]
        url = server.url(shard.get("url") or f"/shards/{shard['id']}")
        expected_sha, expected_bytes = str(shard["sha256"]), int(shard["bytes"])
        problem = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if attempt > 1:
                await asyncio.sleep(backoff(attempt - 1))
            offset = part.stat().st_size if part.exists() else 0
            if offset > expected_bytes:
                part.unlink()
                offset = 0
            if offset < expected_bytes:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                try:
                    problem = await self._fetch(client, url, part, offset, headers, expected_sha)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    problem = f"download interrupted ({type(e).__name__}); resuming"
                    continue
                if problem:
                    continue
            sha = await asyncio.to_thread(file_sha256, part)
            if part.stat().st_size == expected_bytes and sha == expected_sha:
                return
            problem = f"sha256 mismatch (got {sha[:12]}..., expected {expected_sha[:12]}...)"
            part.unlink()
        raise RecordError(f"download of {url} failed: {problem}", retryable=True)

    async def _fetch(
        self,
        client: httpx.AsyncClient,
        url: str,
        part: Path,
        offset: int,
        headers: dict[str, str],
        expected_sha: str,
    ) -> str:
        """One GET; appends to `part`. Returns '' when the body was read, else the problem."""
        async with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status == 404:
                raise ShardGone(f"{url}: the server has no such shard", retryable=True)
            if status == 416:
                part.unlink(missing_ok=True)
                return "range not satisfiable; starting over"
            if status not in (200, 206):
                await response.aread()
                if is_retryable(status):
                    return describe(response)
                raise RecordError(f"downloading {url}: {describe(response)}")
            header_sha = response.headers.get("x-content-sha256")
            if header_sha and header_sha != expected_sha:
                raise RecordError(
                    f"{url}: X-Content-SHA256 {header_sha} differs from the job's {expected_sha}"
                )
            resumed = status == 206
            if resumed and not response.headers.get("content-range", "").startswith(
                f"bytes {offset}-"
            ):
                part.unlink(missing_ok=True)
                return "the server sent another range than asked for; starting over"
            with open(part, "ab" if resumed else "wb") as f:
                async for chunk in response.aiter_bytes():  # as received: a drop loses nothing
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        return ""

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
                    result = await self._submit_and_wait(client, server, body)
                    pending = {"server": server.base, "result": result}
                    _write_json(job_file, pending)
                await self._download(client, server, result, part)
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
        pending = _read_json(job_file)
        if pending is not None and final.exists() and _matches(final, pending["result"]):
            # Killed after the rename but before the manifest line: the shard is already here.
            result = pending["result"]
            server = self.pool.get(pending["server"]) or Server(pending["server"])
        else:
            server, result = await self._capture_and_download(client, record, pending)
        if self.options.delete_remote:
            await self._delete_remote(client, server, result)
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
            "finished": _now(),
        }

    async def _delete_remote(
        self, client: httpx.AsyncClient, server: Server, result: dict[str, Any]
    ) -> None:
        shard = result["shard"]
        url = server.url(shard.get("url") or f"/shards/{shard['id']}")
        try:
            response = await request_with_retries(client, "DELETE", url)
        except RetriesExhausted as e:
            response = None
            problem = str(e)
        else:
            problem = "" if response.status_code in (204, 404) else describe(response)
        if problem:
            self._log(f"warning: could not delete {url}: {problem}")

    # -- the whole run ----------------------------------------------------------------------

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
            manifest.append(_failed_entry(record.id, self.options, str(e)))
            return
        manifest.append(entry)
        self.paths.job(record.id).unlink(missing_ok=True)
        self.summary.ok += 1
        self.summary.tokens += entry["tokens"]
        self.summary.bytes += entry["bytes"]


def _failed_entry(record_id: str, options: RecordOptions, error: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "status": "failed",
        "shard": None,
        "bytes": 0,
        "sha256": None,
        "tokens": 0,
        "mode": options.mode,
        "capture": options.spec.to_dict(),
        "server": None,
        "error": error,
        "finished": _now(),
    }


def _matches(path: Path, result: dict[str, Any]) -> bool:
    """Whether a file has the size and sha256 a capture result gives for its shard."""
    shard = result["shard"]
    try:
        return path.stat().st_size == int(shard["bytes"]) and file_sha256(path) == shard["sha256"]
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("server"), str)):
        return None
    result = obj.get("result")
    if not (isinstance(result, dict) and isinstance(result.get("shard"), dict)):
        return None
    return obj


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# ---------------------------------------------------------------------------------------------
# Command line


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
