"""HTTP helpers shared by the client commands: the API key, server URLs and polite retries.

A cold, busy or restarting GPU server answers 429, 5xx (including a proxy's 520-524) and
timeouts routinely, so every client request goes through `request_with_retries`: exponential
backoff with full jitter, capped, or the server's `Retry-After` when it gives one. Only the
Authorization header carries the API key; nothing here prints or logs it.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import httpx

API_KEY_ENV = "VLLM_ACTIVATIONS_API_KEY"
MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx, including proxies' 520-524


class RetriesExhausted(RuntimeError):
    """A request kept failing with retryable errors; the message says the last one."""


def api_key_from(flag_value: str | None) -> str | None:
    """The key from a flag, else from $VLLM_ACTIVATIONS_API_KEY, else None."""
    return flag_value or os.environ.get(API_KEY_ENV) or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def api_base(server_url: str) -> str:
    """`http://host:8000`, `.../` or `.../v1` all name the same server root."""
    base = server_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def is_retryable(status: int) -> bool:
    """Statuses worth retrying: rate limits, conflicts in flight and every server error."""
    return status in RETRY_STATUS or status >= 500


def retry_after(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds (the delta-seconds form), or None."""
    try:
        return max(float(response.headers["retry-after"]), 0.0)
    except (KeyError, ValueError):
        return None


def backoff(attempt: int, hint: float | None = None) -> float:
    """Seconds before retry `attempt` (1-based): the server's hint, or capped full jitter."""
    if hint is not None:
        return min(hint, BACKOFF_CAP_S)
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def describe(response: httpx.Response) -> str:
    """`HTTP 413: <message>` using the sidecar's JSON error when there is one."""
    try:
        error = response.json()["error"]
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    return f"HTTP {response.status_code}: {message}"


def error_field(response: httpx.Response) -> str | None:
    """The request field the sidecar blames for an error (e.g. `capture.layers`), if any."""
    try:
        value = response.json()["error"]["field"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


async def request_with_retries(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    attempts: int = MAX_ATTEMPTS,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request, retrying timeouts, transport errors and retryable statuses.

    Returns the first response that is not retryable (a 2xx, or a 4xx the caller must handle;
    its body is read). Raises RetriesExhausted after `attempts` retryable failures.
    """
    for attempt in range(1, attempts + 1):
        hint = None
        try:
            response = await client.request(method, url, **kwargs)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        else:
            if not is_retryable(response.status_code):
                return response
            problem = describe(response)
            hint = retry_after(response)
        if attempt == attempts:
            raise RetriesExhausted(f"{problem} (gave up after {attempts} attempts)")
        await asyncio.sleep(backoff(attempt, hint))
    raise AssertionError("unreachable")
