"""Sidecar configuration: where vLLM and the shards are, API keys, and the request limits.

Pure Python (no FastAPI), so the launcher can resolve keys and refuse an unsafe bind before it
spends minutes starting vLLM. Every limit carries the command-line flag that raises it, so a
rejected request can tell the user exactly what to change.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_activations.contract.spec import DEFAULT_MAX_LOGPROBS

API_KEY_ENV = "VLLM_ACTIVATIONS_API_KEY"

# Idle keep-alive connections. vLLM's API server (uvicorn) closes one after
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE seconds (default 5), and httpx reuses one for 5 s by default: a
# request sent on a connection the server is closing at that moment fails (`ReadError`, which
# the sidecar answered as 502 "vLLM is unreachable" in a benchmark run), so the sidecar keeps
# its connections to vLLM half as long. The sidecar's own server keeps idle connections 65 s,
# well past any client's default (httpx 5 s), for the same race on its clients' side.
VLLM_KEEP_ALIVE_ENV = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"
SIDECAR_KEEP_ALIVE_S = 65


def vllm_keepalive_expiry(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds the sidecar reuses an idle connection to vLLM: half vLLM's keep-alive."""
    try:
        server_s = float(environ.get(VLLM_KEEP_ALIVE_ENV, "5"))
    except ValueError:
        server_s = 5.0
    return max(server_s, 0.0) / 2


# Limit name -> the `vllm-activations serve` flag that sets it.
LIMIT_FLAGS: dict[str, str] = {
    "max_prompt_tokens": "--max-prompt-tokens",
    "max_tokens": "--max-tokens-limit",
    "max_capture_bytes": "--max-capture-bytes",
    "min_free_disk_bytes": "--min-free-disk-bytes",
    "max_concurrent_captures": "--max-concurrent-captures",
}


@dataclass(frozen=True)
class Limits:
    """Per-request and per-server limits, checked before a capture request is accepted."""

    max_prompt_tokens: int = 32768
    max_tokens: int = 4096
    max_capture_bytes: int = 16 * 2**30
    min_free_disk_bytes: int = 2**30
    max_concurrent_captures: int = 16

    def __post_init__(self) -> None:
        for name in LIMIT_FLAGS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{LIMIT_FLAGS[name]} must be a non-negative integer")
        if self.max_concurrent_captures < 1:
            raise ValueError(f"{LIMIT_FLAGS['max_concurrent_captures']} must be at least 1")


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` needs.

    num_layers / hidden_size: the served model's dimensions, used to validate capture layers
    and to estimate capture bytes before anything runs. api_keys empty means no auth (the
    launcher allows that only on loopback or with --insecure-no-auth). model_name None means
    "ask vLLM's /v1/models". max_logprobs: vLLM's --max-logprobs (-1: no limit), the largest
    capture.teacher_logprobs a request may ask. device_slots: per capture-spec field of
    `contract.spec.SLOT_FLAGS`, the engine's slot count (the sidecar admits no more such
    captures at once, answering 429 instead of a generation the connector would refuse at its
    end); a field not named is not bounded here. tokenizer / tokenizer_revision: the model
    (a folder or hub id) whose tokenizer the sidecar may use itself once it gives vLLM's ids
    (`sidecar/tokenizer.py`); None: always ask vLLM's /tokenize.
    """

    vllm_url: str
    shard_dir: Path
    num_layers: int
    hidden_size: int
    api_keys: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    model_name: str | None = None
    shard_timeout_s: float = 300.0
    request_timeout_s: float = 3600.0
    max_finished_jobs: int = 10000
    retry_after_s: int = 2
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    device_slots: dict[str, int] = field(default_factory=dict)
    tokenizer: str | None = None
    tokenizer_revision: str | None = None


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    """Constant-time check of a presented key against every configured key (no early exit)."""
    candidate = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    return matched


def load_api_keys(
    flag_keys: Iterable[str] = (),
    key_file: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[str, ...]:
    """Keys from --api-key (repeatable), $VLLM_ACTIVATIONS_API_KEY (comma-separated) and a
    file (one per line, '#' comments), de-duplicated in order. Several keys allow rotation."""
    env = os.environ if env is None else env
    keys: list[str] = list(flag_keys)
    keys += env.get(API_KEY_ENV, "").split(",")
    if key_file is not None:
        for line in Path(key_file).read_text().splitlines():
            if not line.strip().startswith("#"):
                keys.append(line)
    out: list[str] = []
    for key in (k.strip() for k in keys):
        if key and key not in out:
            if any(c.isspace() for c in key):
                raise ValueError("an API key must not contain whitespace")
            out.append(key)
    return tuple(out)


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: Sequence[str], insecure_no_auth: bool) -> None:
    """Refuse to expose the API without a key unless the user explicitly opted out."""
    if api_keys or insecure_no_auth or is_loopback_host(host):
        return
    raise ValueError(
        f"refusing to listen on {host} without an API key: pass --api-key, --api-key-file or "
        f"set ${API_KEY_ENV} (or --insecure-no-auth to serve without authentication)"
    )
