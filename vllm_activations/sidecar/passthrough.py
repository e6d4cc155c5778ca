"""Captures that arrive on the `/v1/*` passthrough: the same admission as the sidecar's own route.

A completion carrying `kv_transfer_params.capture` is checked like POST
/generate_with_activations before vLLM sees it (spec, prompt and max_tokens limits, the
capture-byte estimate, the disk budget, a concurrency slot), sent with a capture id the sidecar
chose (or the client's, validated), and answered only once the shard is written, with the
shard's id, URL, size and sha256 in `kv_transfer_params` instead of the server's file paths.
One prompt, one choice and no streaming per capture request: one request, one shard.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from vllm_activations.contract.spec import CaptureSpec, CaptureSpecError
from vllm_activations.sidecar.errors import ApiError
from vllm_activations.sidecar.generate import CaptureRunner
from vllm_activations.sidecar.store import validate_shard_id

CAPTURE_PATHS = ("completions", "chat/completions")
PARAMS = "kv_transfer_params"
# vLLM's default max_tokens for /v1/completions (chat defaults to the rest of the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class OpenAICapture:
    """A passthrough capture that passed every check; `body` is what vLLM will get."""

    capture_id: str
    spec: CaptureSpec
    body: dict[str, Any]
    estimated_bytes: int


def capture_body(content: bytes) -> dict[str, Any] | None:
    """The JSON body if it asks for capture, else None (forwarded untouched). Parsed, not
    searched: an escaped key (`kv\\u005ftransfer_params`) reaches vLLM as the same key."""
    if not content:
        return None
    try:
        body = json.loads(content)
    except ValueError:
        return None
    params = body.get(PARAMS) if isinstance(body, dict) else None
    return body if isinstance(params, dict) and "capture" in params else None


def parse(
    runner: CaptureRunner, method: str, path: str, body: dict[str, Any]
) -> tuple[CaptureSpec, str]:
    """The spec and shard id of a passthrough capture, from the checks that need no round trip
    to vLLM (so a busy server is refused before tokenizing); ApiError (400/409) leaves
    nothing."""
    field = f"{PARAMS}.capture"
    if method != "POST" or path not in CAPTURE_PATHS:
        raise ApiError(
            400,
            f"capture is accepted on POST /v1/completions and /v1/chat/completions only (or use "
            f"POST /generate_with_activations), not {method} /v1/{path}",
            field,
        )
    if body.get("stream"):
        raise ApiError(
            400,
            "a capture request is answered once its shard is written: send stream false, or "
            "use POST /generate_with_activations",
            "stream",
        )
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise ApiError(400, "must be 1 for a capture request (one request, one shard)", name)
    params = body[PARAMS]
    if not isinstance(params["capture"], dict):
        raise ApiError(400, "must be an object (the capture spec)", field)
    try:
        spec = CaptureSpec.from_dict(params["capture"])
        spec.resolve_layers(runner.settings.num_layers)
    except CaptureSpecError as exc:
        raise ApiError(400, str(exc), f"{field}.{exc.field}") from exc
    if spec.teacher_logprobs:
        raise ApiError(
            400,
            "teacher logprobs are recorded through POST /generate_with_activations only (the "
            "sidecar adds them to the shard from vLLM's answer)",
            f"{field}.teacher_logprobs",
        )
    capture_id = params.get("capture_id")
    if capture_id is None:
        capture_id = uuid.uuid4().hex
    elif not isinstance(capture_id, str):
        raise ApiError(400, "must be a string", f"{PARAMS}.capture_id")
    else:
        validate_shard_id(capture_id, f"{PARAMS}.capture_id")
        if runner.store.path_for(capture_id).exists():
            raise ApiError(409, f"a shard with id {capture_id!r} exists", f"{PARAMS}.capture_id")
    return spec, capture_id


async def admit(
    runner: CaptureRunner, path: str, body: dict[str, Any], spec: CaptureSpec, capture_id: str
) -> OpenAICapture:
    """Tokenize a capture `parse` accepted and check its limits; ApiError (400/413) leaves
    nothing."""
    if path == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids, max_model_len = await runner.tokenize(
                {"prompt": prompt, "add_special_tokens": True}, "prompt"
            )
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            ids, max_model_len = prompt, await runner.max_model_len()
        else:
            raise ApiError(
                400, "a capture request takes one prompt: a string or a list of token ids", "prompt"
            )
        prompt_field, default_max = "prompt", COMPLETIONS_DEFAULT_MAX_TOKENS
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "must be a non-empty list", "messages")
        ids, max_model_len = await runner.tokenize(
            {"messages": messages, "add_generation_prompt": True}, "messages"
        )
        prompt_field, default_max = "messages", None
    tokens_field = "max_tokens"
    max_tokens = body.get("max_tokens")
    if max_tokens is None and body.get("max_completion_tokens") is not None:
        tokens_field, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else max_model_len - len(ids)
    if type(max_tokens) is not int or max_tokens < 1:
        raise ApiError(400, "must be a positive integer", tokens_field)
    estimate = runner.check_limits(
        spec, len(ids), max_tokens, max_model_len, prompt_field, tokens_field
    )
    forwarded = {**body, PARAMS: {**body[PARAMS], "capture_id": capture_id}}
    return OpenAICapture(capture_id, spec, forwarded, estimate)


def public_params(params: dict[str, Any], shard: dict[str, Any]) -> dict[str, Any]:
    """The response's kv_transfer_params with ids and URLs in place of server paths."""
    kept = {k: v for k, v in params.items() if k not in ("shard_path", "error_path")}
    return {**kept, **shard}
