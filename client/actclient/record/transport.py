"""HTTP to the sidecars: submit a capture job and poll it, stream its shard with Range resume
and verify size and sha256, delete it; and the pool that sends each record to the least busy
server."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from actclient.http import (
    MAX_ATTEMPTS,
    RetriesExhausted,
    api_base,
    backoff,
    describe,
    error_field,
    is_retryable,
    request_with_retries,
)
from actclient.record.errors import FatalError, RecordError, ShardGone
from vllm_activations.contract.files import file_sha256

REQUEST_TIMEOUT_S = 60.0  # one HTTP request; every request is short thanks to the job flow

POLL_START_S = 0.2

POLL_MAX_S = 2.0


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


async def submit_and_wait(
    client: httpx.AsyncClient, server: Server, body: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Submit one capture job and poll it to the end; the finished result body."""
    url = server.url("/generate_with_activations")
    response = await request_with_retries(client, "POST", url, json=body)
    if response.status_code == 200:  # a server that ignored `wait: false`
        return response.json()
    if response.status_code != 202:
        check_fatal(response)
        raise RecordError(describe(response))
    accepted = response.json()
    job_url = server.url(accepted.get("job_url") or f"/jobs/{accepted['id']}")
    deadline = time.monotonic() + timeout
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
                f"job {accepted['id']} still running after {timeout:g} s (raise --timeout)"
            )


def check_fatal(response: httpx.Response) -> None:
    """Raise FatalError for answers every other record would get too."""
    status, fld = response.status_code, error_field(response) or ""
    if status in (401, 403) or (status in (400, 422) and fld.startswith("capture")):
        raise FatalError(f"{response.request.url}: {describe(response)}")
    if status in (404, 405):
        raise FatalError(
            f"{response.request.url}: {describe(response)} (is this a vllm-activations "
            "server? give its root URL)"
        )


async def download(
    client: httpx.AsyncClient, server: Server, result: dict[str, Any], part: Path
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
                problem = await _fetch(client, url, part, offset, headers, expected_sha)
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
        if resumed and not response.headers.get("content-range", "").startswith(f"bytes {offset}-"):
            part.unlink(missing_ok=True)
            return "the server sent another range than asked for; starting over"
        with open(part, "ab" if resumed else "wb") as f:
            async for chunk in response.aiter_bytes():  # as received: a drop loses nothing
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    return ""


async def delete_remote(client: httpx.AsyncClient, server: Server, result: dict[str, Any]) -> str:
    """Delete a downloaded shard on its server; '' when done (or already gone), else why not."""
    shard = result["shard"]
    url = server.url(shard.get("url") or f"/shards/{shard['id']}")
    try:
        response = await request_with_retries(client, "DELETE", url)
    except RetriesExhausted as e:
        response = None
        problem = str(e)
    else:
        problem = "" if response.status_code in (204, 404) else describe(response)
    return f"could not delete {url}: {problem}" if problem else ""
