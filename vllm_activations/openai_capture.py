"""Capture through vLLM's OpenAI-compatible API: the request body and the wait for the shard.

The capture spec travels in the completion's `kv_transfer_params` (vLLM hands it to the KV
connector untouched); the response's `kv_transfer_params` names the shard. From vLLM's own
(loopback) port it names the files: the shard is written by the worker one engine step after
the response is produced, atomically, so waiting means waiting for the final file name (or
`<id>.error.json`) to appear. Through the sidecar's `/v1` the response comes once the shard is
written and names it by `shard_id` and `shard_url` (no server paths leave the server).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_activations.announce import FALLBACK_POLL_S, Announcements
from vllm_activations.contract.shard import SHARD_SUFFIX
from vllm_activations.contract.spec import CaptureSpec


class CaptureFailed(RuntimeError):
    """The engine rejected the capture spec or could not write the shard."""


@dataclass
class CaptureResult:
    response: dict[str, Any]
    capture_id: str
    shard_path: Path


def completion_body(
    *,
    model: str,
    prompt: str | list[int],
    spec: CaptureSpec,
    capture_id: str | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """A /v1/completions body that asks for capture (prompt as text or token ids)."""
    params: dict[str, Any] = {"capture": spec.to_dict()}
    if capture_id is not None:
        params["capture_id"] = capture_id
    body = {"model": model, "prompt": prompt, "kv_transfer_params": params}
    body.update({k: v for k, v in sampling.items() if v is not None})
    return body


def ended_on_stop_string(response: dict[str, Any]) -> bool:
    """Whether a completion without connector params ended on a stop string. vLLM's front
    end finds stop strings itself: it finishes the request there and aborts it in the engine,
    so that answer carries no `kv_transfer_params` (vllm/v1/engine/output_processor.py). The
    engine's scheduler still finishes the request through the connector, which writes the
    shard (of every token the engine computed, the stop string's included) under the
    request's capture id."""
    if response.get("kv_transfer_params"):
        return False
    choice = (response.get("choices") or [{}])[0]
    return choice.get("finish_reason") == "stop" and isinstance(choice.get("stop_reason"), str)


def shard_params(capture_id: str, shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The params the connector would have answered for `capture_id` in `shard_dir`."""
    root = Path(shard_dir)
    return {
        "capture_id": capture_id,
        "shard_path": str(root / f"{capture_id}{SHARD_SUFFIX}"),
        "error_path": str(root / f"{capture_id}.error.json"),
    }


def capture_params(
    response: dict[str, Any],
    capture_id: str | None = None,
    shard_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The connector's answer in a completion response; raises if it rejected the spec.

    A completion that ended on a stop string carries no answer (`ended_on_stop_string`):
    given the `capture_id` the request sent and the server's `shard_dir` (on its machine),
    the shard's paths are those; without them that is a clear error, not a missing shard."""
    params = response.get("kv_transfer_params") or {}
    if "capture_error" in params:
        raise CaptureFailed(params["capture_error"])
    if not params and ended_on_stop_string(response):
        if capture_id is None or shard_dir is None:
            raise CaptureFailed(
                "the completion ended on a stop string, and vLLM then returns no "
                "kv_transfer_params: send a capture_id and pass it with shard_dir (the "
                "server's --shard-dir) to capture_params, or capture through the sidecar's "
                "/v1, which answers with the shard"
            )
        return shard_params(capture_id, shard_dir)
    if "shard_path" not in params and "shard_id" not in params:
        raise CaptureFailed(
            "the server did not capture this request: is it running `vllm-activations serve` "
            "(capture architecture and connector configured)?"
        )
    return params


def _sidecar_shard(params: dict[str, Any], shard_dir: str | os.PathLike[str] | None) -> Path:
    """The local path of a shard the sidecar named by id (it is complete already)."""
    if shard_dir is None:
        raise CaptureFailed(
            f"the sidecar names shard {params['shard_id']!r} by id: download "
            f"{params['shard_url']}, or pass shard_dir (the server's --shard-dir) on its machine"
        )
    return Path(shard_dir) / f"{params['shard_id']}{SHARD_SUFFIX}"


def _check(params: dict[str, Any]) -> Path | None:
    shard = Path(params["shard_path"])
    if shard.exists():
        return shard
    error = Path(params["error_path"])
    if error.exists():
        raise CaptureFailed(json.loads(error.read_text())["error"])
    return None


def wait_for_shard(
    params: dict[str, Any],
    timeout: float = 120.0,
    shard_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Block until the shard named in `params` is complete (`shard_dir`: see _sidecar_shard)."""
    if "shard_path" not in params:
        return _sidecar_shard(params, shard_dir)
    deadline = time.monotonic() + timeout
    while (path := _check(params)) is None:
        if time.monotonic() > deadline:
            raise CaptureFailed(f"shard {params['shard_path']} not written after {timeout} s")
        time.sleep(0.02)
    return path


async def wait_for_shard_async(
    params: dict[str, Any],
    timeout: float = 120.0,
    shard_dir: str | os.PathLike[str] | None = None,
    announcements: Announcements | None = None,
) -> Path:
    """As wait_for_shard, on an event loop. With `announcements` (the sidecar, beside the
    writer) it wakes when the writer announces the shard or its error file, and looks at
    the disk only every FALLBACK_POLL_S otherwise."""
    if "shard_path" not in params:
        return _sidecar_shard(params, shard_dir)
    deadline = time.monotonic() + timeout
    watched = [Path(params["shard_path"]), Path(params["error_path"])]
    while (path := _check(params)) is None:
        left = deadline - time.monotonic()
        if left < 0:
            raise CaptureFailed(f"shard {params['shard_path']} not written after {timeout} s")
        if announcements is not None:
            await announcements.wait(watched, min(FALLBACK_POLL_S, left))
        else:
            await asyncio.sleep(0.02)
    return path
