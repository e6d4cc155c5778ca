"""`make demo`: record, analyze and plan on a few shipped tour-stop prompts, embedded model.

Builds SmolLM2-135M-Instruct (cached), starts `vllm-activations serve` on loopback, sends the
first prompts of the shipped Phase 1 dataset through the chat API with capture on, and prints
where the shards are and what they hold; then `actclient analyze` and `actclient plan` turn
them into a report and a layer/neuron pruning plan.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vllm_activations.openai_capture import capture_params, wait_for_shard
from vllm_activations.shard import ShardReader
from vllm_activations.spec import CaptureSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`vllm-activations serve` (or stock vLLM) as a child process group on loopback."""

    def __init__(
        self, model: Path, shard_dir: Path, log_path: Path, extra: list[str], plain: bool = False
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = secrets.token_urlsafe(24)
        env = dict(os.environ, VLLM_ACTIVATIONS_API_KEY=self.api_key)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if plain:  # stock vLLM: no capture architecture, no connector (benchmark baseline)
            cmd = [
                sys.executable,
                "-m",
                "vllm.entrypoints.launchers.api_server.entry",
                "--model",
                str(model),
                "--port",
                str(self.port),
                *extra,
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
                str(shard_dir),
                *extra,
            ]
        self._log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-4000:]
                raise SystemExit(f"server exited ({self.proc.returncode}); log tail:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"server not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_activations.demo")
    parser.add_argument("--out", default="demo-out", help="output directory")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from actclient.phase1.dataset import build_dataset
    from vllm_activations import embedded

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print("building the embedded model (cached after the first run) ...", flush=True)
    model = embedded.smollm2()
    server = ServerProcess(
        model,
        out / "shards",
        out / "server.log",
        [
            "--max-model-len",
            "4096",
            "--gpu-memory-utilization",
            "0.15",
            "--served-model-name",
            "smollm2",
        ],
    )
    try:
        print(
            f"starting vllm-activations serve {model.name} (log: {server.log_path}) ...", flush=True
        )
        server.wait_ready()
        records = build_dataset()[: args.prompts]
        for record in records:
            body = {
                "model": "smollm2",
                "messages": record.messages(),
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "kv_transfer_params": {"capture": CaptureSpec().to_dict()},
            }
            r = httpx.post(
                f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=600
            )
            r.raise_for_status()
            path = wait_for_shard(capture_params(r.json()))
            with ShardReader(path) as shard:
                size = path.stat().st_size / 2**20
                print(
                    f"{record.id:40s} {len(shard.input_tokens):4d} prompt + "
                    f"{len(shard.output_tokens):3d} generated tokens, {len(shard.layers)} "
                    f"layers x {len(shard.sites)} sites, {size:6.1f} MiB  {path}"
                )
    finally:
        server.stop()
    print(f"\nshards: {out / 'shards'}")
    from actclient.cli import main as actclient

    analysis = out / "analysis"
    if actclient(["analyze", str(out / "shards"), "--out", str(analysis), "--model", str(model)]):
        return 1
    drop = max(1, len(shard.layers) // 5)
    plan = out / "plan.json"
    if actclient(
        ["plan", str(analysis), "--drop", str(drop), "--model", str(model), "--out", str(plan)]
    ):
        return 1
    print(f"\nreport: {analysis / 'report.md'}\nplan:   {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
