"""Capture admission and background jobs, in memory on the sidecar's event loop.

`CaptureSlots` bounds concurrent captures, and those that need one of the engine's device
slots (summaries, channel statistics) to its slot count (a full server answers 429 at once
rather than queueing work the client may abandon, or that the connector would refuse).
`DiskBudget` admits a capture only if the free space left after every admitted, not yet
written shard and this one still keeps the reserve: checking free space alone would admit
each of N concurrent requests against space the others are about to fill. `JobRegistry`
keeps `wait: false` requests: a job is created only after a request passed every check and
got a slot, so a rejected request leaves no job behind. Finished jobs beyond `max_finished`
are forgotten oldest first (their shards stay on disk).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CaptureSlots:
    """Non-blocking counters of running captures, overall and per kind of device slot
    (single event loop: no lock needed). `kinds`: slot kind -> how many exist."""

    def __init__(self, limit: int, kinds: Mapping[str, int] | None = None) -> None:
        self.limit = limit
        self.in_use = 0
        self.kinds = dict(kinds or {})
        self.kind_in_use = dict.fromkeys(self.kinds, 0)

    def try_acquire(self, needs: Iterable[str] = ()) -> str | None:
        """Take a capture slot and one slot of each bounded kind in `needs`: None if taken,
        else what is full ("captures", or the kind)."""
        if self.in_use >= self.limit:
            return "captures"
        bounded = [kind for kind in needs if kind in self.kinds]
        for kind in bounded:
            if self.kind_in_use[kind] >= self.kinds[kind]:
                return kind
        self.in_use += 1
        for kind in bounded:
            self.kind_in_use[kind] += 1
        return None

    def release(self, needs: Iterable[str] = ()) -> None:
        self.in_use -= 1
        for kind in needs:
            if kind in self.kinds:
                self.kind_in_use[kind] -= 1


class DiskFull(Exception):
    """Admitting a capture would eat into the free-disk reserve."""

    def __init__(self, free: int, promised: int, in_flight: int) -> None:
        super().__init__(f"{free} bytes free, {promised} promised to {in_flight} captures")
        self.free = free
        self.promised = promised
        self.in_flight = in_flight


class DiskBudget:
    """Bytes promised to admitted captures whose shards are not yet written (one event loop,
    and no await between the check and the reservation: no lock needed)."""

    def __init__(self, root: Path, reserve: int) -> None:
        self.root = root
        self.reserve = reserve
        self.promised = 0
        self.in_flight = 0

    def reserve_for(self, nbytes: int) -> int:
        """Promise `nbytes` to one capture, or raise DiskFull; returns `nbytes` for `release`."""
        free = shutil.disk_usage(self.root).free
        if free - self.promised - nbytes < self.reserve:
            raise DiskFull(free, self.promised, self.in_flight)
        self.promised += nbytes
        self.in_flight += 1
        return nbytes

    def release(self, nbytes: int) -> None:
        """The capture's shard is written (its bytes now show as used) or it failed."""
        self.promised -= nbytes
        self.in_flight -= 1


@dataclass
class Job:
    id: str
    created: float = field(default_factory=time.time)
    status: str = "running"
    finished: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    task: asyncio.Task | None = None


class JobRegistry:
    def __init__(self, max_finished: int) -> None:
        self.max_finished = max_finished
        self._jobs: dict[str, Job] = {}

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def running_ids(self) -> set[str]:
        return {j.id for j in self._jobs.values() if j.status == "running"}

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def start(
        self,
        job_id: str,
        work: Callable[[], Awaitable[Any]],
        on_error: Callable[[BaseException], dict[str, Any]],
    ) -> Job:
        """Run `work()` as a task; its result or `on_error(exc)` is kept on the job."""
        job = Job(job_id)
        self._jobs[job_id] = job

        async def run() -> None:
            try:
                job.result = await work()
                job.status = "succeeded"
            except Exception as exc:  # reported to the client through GET /jobs/{id}
                job.error = on_error(exc)
                job.status = "failed"
            finally:
                job.finished = time.time()
                self._evict()

        job.task = asyncio.create_task(run(), name=f"capture-job-{job_id}")
        return job

    def _evict(self) -> None:
        finished = [j for j in self._jobs.values() if j.status != "running"]
        for job in sorted(finished, key=lambda j: j.finished or 0)[
            : max(0, len(finished) - self.max_finished)
        ]:
            del self._jobs[job.id]

    async def cancel_all(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
