"""Fill in Phase 1 responses through the server's OpenAI route, resumably.

Each finished record is appended to the output JSONL at once (flush + fsync), so a crash or
Ctrl-C loses at most the requests in flight; a rerun skips every id already in the output with
a response. Requests run `concurrency` at a time (the server batches them) and retry 429, 5xx
and timeouts with exponential backoff, jitter and `Retry-After`, because a cold or busy GPU
server answers those routinely. The API key goes only into the Authorization header.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from actclient.http import (
    MAX_ATTEMPTS,
    ServerCheckFailed,
    api_base,
    describe,
    probe,
    request_with_retries,
)
from actclient.jsonl import JsonlAppender
from actclient.phase1.dataset import Phase1Record
from actclient.phase1.ingest import load_records
from actclient.progress import Progress

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class GenerateSummary:
    """What a generate run did; `errors` holds one line per failed record."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class GenerateError(RuntimeError):
    """The run cannot start: bad input records, or the server gave no model."""


def finished_ids(out_path: str | os.PathLike[str]) -> set[str]:
    """Ids in an output JSONL that already have a response (a torn last line is ignored)."""
    path = Path(out_path)
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("response"), str) and obj.get("id"):
            done.add(obj["id"])
    return done


async def _pick_model(client: httpx.AsyncClient, base: str) -> str:
    response = await client.get(f"{base}/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise GenerateError(f"{base}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


async def _complete(client: httpx.AsyncClient, base: str, model: str, record: Phase1Record) -> str:
    """The response text for one record; raises after MAX_ATTEMPTS retryable failures."""
    body = {"model": model, "messages": record.messages(), "max_tokens": record.max_tokens}
    url = f"{base}/v1/chat/completions"
    response = await request_with_retries(client, "POST", url, attempts=MAX_ATTEMPTS, json=body)
    if response.status_code != 200:
        raise RuntimeError(describe(response))
    return str(response.json()["choices"][0]["message"]["content"])


async def _run(
    todo: list[Phase1Record],
    out_path: Path,
    base: str,
    api_key: str | None,
    model: str | None,
    concurrency: int,
    timeout: float,
    summary: GenerateSummary,
    progress: bool | None = None,
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency)
    # `read` bounds the wait for the whole (non-streamed) answer, so it must cover a long one.
    timeouts = httpx.Timeout(connect=10.0, read=timeout, write=60.0, pool=None)
    transport = httpx.AsyncHTTPTransport(retries=2, limits=limits)  # connect errors only
    async with httpx.AsyncClient(headers=headers, timeout=timeouts, transport=transport) as client:
        try:
            await probe(client, base, "openai")
        except ServerCheckFailed as e:
            raise GenerateError(str(e)) from None
        model = model or await _pick_model(client, base)
        appender = JsonlAppender(out_path)
        semaphore = asyncio.Semaphore(concurrency)
        with Progress(len(todo), desc="phase1 generate", unit="rec", enabled=progress) as bar:

            async def one(record: Phase1Record) -> None:
                async with semaphore:
                    try:
                        text = await _complete(client, base, model, record)
                    except Exception as e:  # one record's failure must not stop the run
                        summary.failed += 1
                        summary.errors.append(f"{record.id}: {e}")
                        bar.write(f"failed {record.id}: {e}")
                    else:
                        record.response = text
                        appender.write_line(record.to_json())
                        summary.done += 1
                    bar.update(1, done=summary.done, failed=summary.failed)

            try:
                await asyncio.gather(*(one(r) for r in todo))
            finally:
                appender.close()


def generate(
    records_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    server_url: str,
    api_key: str | None = None,
    model: str | None = None,
    concurrency: int = 4,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool | None = None,
) -> GenerateSummary:
    """Generate a response for every record in `records_path` not yet answered in `out_path`.

    `records_path` is anything `load_records` reads. Raises GenerateError when it has errors.
    The model defaults to the first one `GET {server_url}/v1/models` lists.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    loaded = load_records(records_path)
    if loaded.errors:
        raise GenerateError(
            f"{len(loaded.errors)} problem(s) in the records:\n" + "\n".join(loaded.errors)
        )
    out = Path(out_path)
    already = finished_ids(out)
    todo = [r for r in loaded.records if r.id not in already]
    summary = GenerateSummary(skipped=len(loaded.records) - len(todo))
    if todo:
        asyncio.run(
            _run(
                todo,
                out,
                api_base(server_url),
                api_key,
                model,
                concurrency,
                timeout,
                summary,
                progress,
            )
        )
    return summary


def print_summary(summary: GenerateSummary, out_path: str | os.PathLike[str]) -> None:
    """One line for the user on stderr."""
    print(
        f"phase1 generate: {summary.done} done, {summary.skipped} skipped (already in "
        f"{out_path}), {summary.failed} failed",
        file=sys.stderr,
    )
