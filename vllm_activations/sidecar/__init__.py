"""HTTP sidecar: the one authenticated port a pod exposes in front of a loopback `vllm serve`.

Why a separate app rather than routes inside vLLM: vLLM's own `--api-key` guards only some path
prefixes, and its routes cannot serve resumable binary downloads; the sidecar does its own auth
on every route, enforces limits before any work starts, and serves shards from disk.
"""

from vllm_activations.sidecar.app import create_app
from vllm_activations.sidecar.settings import Limits, Settings

__all__ = ["Limits", "Settings", "create_app"]
