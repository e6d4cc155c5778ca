"""Shard announcements: the writer says "this file is now in place" the moment a shard (or its
error file) is published, and the sidecar wakes the request waiting for it, instead of
finding it by polling.

The channel is a Linux abstract-namespace Unix datagram socket named after the shard
directory's real path, so the writer (in vLLM's worker) and the sidecar (another process of
the same container) meet without a file or a port. One datagram is one published file name.
Sending never blocks and never fails a shard: with no listener, or off Linux, the datagram is
dropped and the sidecar still finds the file by its slow fallback poll (`FALLBACK_POLL_S`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import sys
from pathlib import Path

logger = logging.getLogger("vllm_activations.announce")

# How often a waiter looks at the disk anyway: a lost datagram costs at most this much.
FALLBACK_POLL_S = 0.5
SUPPORTED = sys.platform.startswith("linux")


def channel_name(shard_dir: str | os.PathLike[str]) -> bytes:
    """The abstract socket address of a shard directory (same directory, same name)."""
    digest = hashlib.sha256(os.path.realpath(shard_dir).encode()).hexdigest()[:32]
    return b"\0vllm-activations/" + digest.encode()


def announce(path: str | os.PathLike[str]) -> None:
    """Say that `path` (a shard or error file) is now in place; best effort, never raises."""
    if not SUPPORTED:
        return
    path = Path(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(path.name.encode(), channel_name(path.parent))
    except OSError:  # nobody listening, or the listener's queue is full: it will poll
        pass


class Announcements:
    """The sidecar's listener: `wait(paths, timeout)` returns when one of `paths` was
    announced (or the timeout passed); the caller then checks the disk."""

    def __init__(self, shard_dir: str | os.PathLike[str]) -> None:
        self.shard_dir = Path(shard_dir)
        self._sock: socket.socket | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def start(self) -> bool:
        """Bind the channel on the running loop; False (polling only) when it cannot."""
        if not SUPPORTED:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(channel_name(self.shard_dir))
        except OSError as exc:  # another sidecar on the same directory holds it
            sock.close()
            logger.warning("shard announcements off for %s (%s): polling", self.shard_dir, exc)
            return False
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read)
        return True

    def close(self) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except RuntimeError:  # no running loop any more
                pass
            self._sock.close()
            self._sock = None

    def _read(self) -> None:
        while self._sock is not None:
            try:
                name = self._sock.recv(4096).decode(errors="replace")
            except OSError:  # BlockingIOError: nothing more to read
                return
            for event in self._waiters.get(name, ()):
                event.set()

    async def wait(self, paths: list[Path], timeout: float) -> None:
        event = asyncio.Event()
        names = [p.name for p in paths]
        for name in names:
            self._waiters.setdefault(name, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            for name in names:
                waiting = self._waiters.get(name)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[name]
