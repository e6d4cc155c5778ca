"""Session fixtures: the embedded models and one real capture server per model.

Servers start lazily, once per test session, and all servers a session needs start in
parallel (a CPU vLLM engine takes 20-60 s to start and compile).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server import CaptureServer  # noqa: E402

# name -> (model builder key, server dtype). The float32 server gives the tight tolerance
# check; the bfloat16 ones are what users run.
SERVER_CONFIGS = {
    "tiny-qwen3-tied": ("tiny-qwen3-tied", "float32"),
    "tiny-qwen3-untied": ("tiny-qwen3-untied", "bfloat16"),
    "smollm2": ("smollm2", "bfloat16"),
}


@pytest.fixture(scope="session")
def embedded_models() -> dict[str, Path]:
    from vllm_activations import embedded

    return embedded.build_all()


class ServerPool:
    """Starts every configured server at first use and stops them at session end."""

    def __init__(self, models: dict[str, Path], root: Path) -> None:
        self._models = models
        self._root = root
        self._servers: dict[str, CaptureServer] = {}

    def get(self, name: str) -> CaptureServer:
        if not self._servers:
            for key, (model_key, dtype) in SERVER_CONFIGS.items():
                self._servers[key] = CaptureServer(
                    self._models[model_key], self._root / key, dtype=dtype
                )
        server = self._servers[name]
        return server.wait_ready()

    def stop(self) -> None:
        for server in self._servers.values():
            server.stop()


@pytest.fixture(scope="session")
def servers(embedded_models, tmp_path_factory):
    pool = ServerPool(embedded_models, tmp_path_factory.mktemp("servers"))
    yield pool
    pool.stop()
