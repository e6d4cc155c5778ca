"""The real capture server as the tests start it (vLLM CPU build behind the sidecar).

One server per model per test session: vLLM takes 20-150 s to start and compile on a CPU.
The launcher runs vLLM on an internal loopback port (`vllm_url`) behind the sidecar (`url`),
which requires the server's own random API key (`api_key`, sent as `headers`).
"""

from __future__ import annotations

from pathlib import Path

from vllm_activations.process import ServerProcess
from vllm_activations.process import free_loopback_port as free_port

__all__ = ["CaptureServer", "free_port"]


class CaptureServer(ServerProcess):
    """`vllm-activations serve` with the small CPU settings the tests use."""

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
        self.dtype = dtype
        self.max_num_batched_tokens = max_num_batched_tokens
        self.vllm_port = free_port()
        self.vllm_url = f"http://127.0.0.1:{self.vllm_port}"
        super().__init__(
            model,
            workdir,
            [
                "--vllm-port", str(self.vllm_port),
                "--max-num-batched-tokens", str(max_num_batched_tokens),
                "--dtype", dtype,
                "--max-model-len", str(max_model_len),
                "--gpu-memory-utilization", "0.15",
                "--served-model-name", "model",
                *(extra or []),
            ],
        )  # fmt: skip
