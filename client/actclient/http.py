"""HTTP helpers shared by the client commands: the API key, server URLs and polite retries.

A cold, busy or restarting GPU server answers 429, 5xx (including a proxy's 520-524) and
timeouts routinely, so every client request goes through `request_with_retries`: exponential
backoff with full jitter, capped, or the server's `Retry-After` when it gives one. What cannot
get better by waiting is never retried: other 4xx (a wrong path, key or input), 501 (a server
that does not implement the method) and a URL the client cannot speak (`ftp://`). `probe`
checks up front, within seconds, that a URL is the server a command needs and that the key
works, so a wrong `--server` fails fast instead of after every record's retries. Only the
Authorization header carries the API key; nothing here prints or logs it.
"""

from __future__ import annotations

import asyncio
import html
import os
import random
import re
from typing import Any, Literal

import httpx

API_KEY_ENV = "VLLM_ACTIVATIONS_API_KEY"
MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx but 501, including proxies' 520-524
PROBE_TIMEOUT_S = 8.0  # each probe request; a wrong server fails within 10 s
ERROR_TEXT_CHARS = 200
# Errors about the URL itself: retrying cannot help.
_PERMANENT_ERRORS = (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError)


class RetriesExhausted(RuntimeError):
    """A request kept failing with retryable errors; the message says the last one."""


class ServerCheckFailed(RuntimeError):
    """The URL is not the server a command needs, or it refuses the key; the message says
    which and what to change."""


class ServerUnreachable(ServerCheckFailed):
    """Nothing answered at the URL (refused, timed out): it may be down rather than wrong."""


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
    """Statuses worth retrying: timeouts, rate limits and server errors but 501."""
    return status in RETRY_STATUS or (status >= 500 and status != 501)


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
    """`HTTP 413: <message>` on one line: the sidecar's or vLLM's JSON error message, else the
    body's text (an HTML page's title), cut short. A 401 says where the key comes from."""
    try:
        error = response.json()
        error = error["error"] if "error" in error else error["detail"]
        message = str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        message = _one_line(response.text)
    if response.status_code == 401:
        message += f" (give the server's key with --api-key or ${API_KEY_ENV})"
    return f"HTTP {response.status_code}: {message}"


def _one_line(text: str) -> str:
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title:
        text = title.group(1)
    elif "<" in text:
        text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(html.unescape(text).split())
    if len(text) > ERROR_TEXT_CHARS:
        text = text[: ERROR_TEXT_CHARS - 3] + "..."
    return text or "(empty body)"


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
        except _PERMANENT_ERRORS as e:
            raise RetriesExhausted(f"{url}: {type(e).__name__}: {e}") from None
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


async def probe(
    client: httpx.AsyncClient, base: str, needs: Literal["sidecar", "openai"]
) -> dict[str, Any]:
    """Check that `base` is a vllm-activations sidecar (`needs="sidecar"`) or any
    vLLM/OpenAI-compatible server (`"openai"`) and that the client's key works there.

    Each request gets PROBE_TIMEOUT_S and no retries. A server still starting (503) passes:
    the command's own requests wait for it. Raises ServerCheckFailed saying what is wrong.
    Returns the sidecar's /health body (empty for vLLM).
    """
    what = "a vllm-activations server (`vllm-activations serve`)"
    if needs == "openai":
        what = "a vLLM or vllm-activations server"

    async def get(path: str) -> httpx.Response:
        try:
            return await client.get(f"{base}{path}", timeout=PROBE_TIMEOUT_S)
        except _PERMANENT_ERRORS as e:
            raise ServerCheckFailed(f"{base}: {e} (give an http:// or https:// URL)") from None
        except httpx.HTTPError as e:
            problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise ServerUnreachable(f"cannot reach {base}: {problem}") from None

    health = await get("/health")
    body: dict[str, Any] = {}
    if needs == "sidecar":
        try:
            body = health.json()
        except ValueError:
            body = {}
        if not (isinstance(body, dict) and body.get("status") in ("ok", "starting")):
            raise ServerCheckFailed(
                f"{base} is not {what}: GET /health answered {describe(health)}; give the "
                "server's root URL, e.g. http://host:8000"
            )
    elif health.status_code not in (200, 503):
        raise ServerCheckFailed(
            f"{base} is not {what}: GET /health answered {describe(health)}; give the "
            "server's root URL, e.g. http://host:8000"
        )
    # A route behind the key: the sidecar's shard list needs no vLLM, vLLM's model list does.
    check = await get("/shards?limit=1" if needs == "sidecar" else "/v1/models")
    if check.status_code in (401, 403):
        raise ServerCheckFailed(f"{base} refuses the key: {describe(check)}")
    if check.status_code == 404:
        raise ServerCheckFailed(
            f"{base} is not {what}: GET {check.request.url.path} answered {describe(check)}"
        )
    return body
