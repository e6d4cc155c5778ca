"""Start and stop a real `vllm-activations serve` process (vLLM CPU build) for tests.

One server per model per test session: vLLM takes 20-60 s to start and compile on a CPU.
The launcher runs vLLM on an internal loopback port (`vllm_url`) behind the sidecar (`url`),
which requires the server's own random API key (`api_key`, sent as `headers`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CaptureServer:
    """A `vllm-activations serve` child process on loopback, with its own shard directory."""

    def __init__(
        self,
        model: Path,
        workdir: Path,
        *,
        dtype: str = "bfloat16",
        max_num_batched_tokens: int = 128,
        max_model_len: int = 2048,
        extra: list[str] | None = None,
    ) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.vllm_port = free_port()
        self.vllm_url = f"http://127.0.0.1:{self.vllm_port}"
        self.api_key = secrets.token_urlsafe(24)
        self.headers = {"Authorization": f"Bearer {self.api_key}"}
        self.shard_dir = workdir / "shards"
        self.log_path = workdir / "server.log"
        self.dtype = dtype
        self.max_num_batched_tokens = max_num_batched_tokens
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "vllm_activations.cli",
            "serve",
            str(model),
            "--port",
            str(self.port),
            "--vllm-port",
            str(self.vllm_port),
            "--shard-dir",
            str(self.shard_dir),
            "--max-num-batched-tokens",
            str(max_num_batched_tokens),
            "--dtype",
            dtype,
            "--max-model-len",
            str(max_model_len),
            "--gpu-memory-utilization",
            "0.15",
            "--served-model-name",
            "model",
            *(extra or []),
        ]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_ACTIVATIONS_API_KEY"] = self.api_key
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> CaptureServer:
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
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()
