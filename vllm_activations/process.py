"""A `vllm-activations serve` (or stock vLLM) child process on loopback.

Used by `make demo`, the benchmarks and the integration tests: one definition of how a
server is started (its own process group, random API key, log file), waited for and
stopped, so a crash can be simulated by killing the group.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 600.0


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server child process group on loopback with its own shard directory and API key.

    `plain=True` starts stock vLLM (no capture architecture, no connector, no sidecar): the
    benchmark baseline. Otherwise `vllm-activations serve MODEL` with `serve_args` appended.
    `env` adds environment variables for the child.
    """

    def __init__(
        self,
        model: Path,
        workdir: Path,
        serve_args: Sequence[str] = (),
        *,
        plain: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = secrets.token_urlsafe(24)
        self.headers = {"Authorization": f"Bearer {self.api_key}"}
        self.shard_dir = workdir / "shards"
        self.log_path = workdir / "server.log"
        workdir.mkdir(parents=True, exist_ok=True)
        if plain:
            cmd = [
                sys.executable,
                "-m",
                "vllm.entrypoints.launchers.api_server.entry",
                "--model",
                str(model),
                "--port",
                str(self.port),
                *serve_args,
            ]
        else:
            cmd = [
                sys.executable,
                "-m",
                "vllm_activations.cli",
                "serve",
                str(model),
                "--port",
                str(self.port),
                "--shard-dir",
                str(self.shard_dir),
                *serve_args,
            ]
        child_env = dict(os.environ, **(env or {}), VLLM_ACTIVATIONS_API_KEY=self.api_key)
        child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> ServerProcess:
        """Block until GET /health answers 200; raise with the log tail if the server dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        """SIGTERM the process group; SIGKILL it if it has not exited after 60 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()
