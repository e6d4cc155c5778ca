"""The capture pipeline behind POST /generate_with_activations: prepare, then execute.

`prepare` does everything that can reject a request before any work or file exists: it
tokenizes (with the sidecar's own copy of the model's tokenizer once it has given vLLM's ids
for every probe, `sidecar/tokenizer.py`, else through vLLM's /tokenize: the same tokenizer
and chat template the engine uses, and exact token ids for teacher forcing), validates the
capture spec against the model, and checks the token and capture-byte limits. `execute`
sends the token ids to /v1/completions with the spec in `kv_transfer_params`, waits for the
connector's shard, then reads its tokens and positions and hashes it in a worker thread.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vllm_activations.announce import Announcements
from vllm_activations.contract.shard import ShardError, ShardReader, staged_shard_path
from vllm_activations.contract.spec import (
    SLOTS_BUSY,
    CaptureSpec,
    CaptureSpecError,
    check_teacher_logprobs,
)
from vllm_activations.openai_capture import (
    CaptureFailed,
    capture_params,
    completion_body,
    ended_on_stop_string,
    wait_for_shard_async,
)
from vllm_activations.sidecar.errors import ApiError, logger
from vllm_activations.sidecar.jobs import DiskBudget, DiskFull
from vllm_activations.sidecar.schemas import GenerateRequest, GenerateResponse, ShardInfo, Timings
from vllm_activations.sidecar.settings import LIMIT_FLAGS, Settings
from vllm_activations.sidecar.store import ShardStore
from vllm_activations.sidecar.tokenizer import PROBES, LocalTokenizer, disagreements, local_shape
from vllm_activations.teacher import TeacherDataError, finish_teacher_shard, teacher_request_fields

# HDF5 superblock, attributes, chunk indexes and the token arrays of a long request.
SHARD_OVERHEAD_BYTES = 1 << 20
# Prompts longer than this (characters) are tokenized in a worker thread, off the event loop.
INLINE_TOKENIZE_CHARS = 20_000


@dataclass
class PreparedCapture:
    """A request that passed every check; nothing has run and nothing is on disk yet."""

    capture_id: str
    request: GenerateRequest
    spec: CaptureSpec
    prompt_ids: list[int]
    text_start: int | None
    max_tokens: int
    estimated_bytes: int
    tokenize_s: float


def check_inputs(req: GenerateRequest) -> None:
    """Exactly one of prompt / messages (400 naming the field; the schema says it as oneOf,
    and pydantic has already refused empty `messages` and `text`)."""
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give exactly one of `prompt` or `messages`", "prompt")


def limit_message(what: str, value: int, limit_name: str, limit: int) -> str:
    return (
        f"{what} is {value}; the server's limit is {limit} "
        f"(raise it with `vllm-activations serve {LIMIT_FLAGS[limit_name]}`)"
    )


def vllm_error(response: httpx.Response) -> ApiError:
    """vLLM's error answer as ours: client errors keep their status, others become 502."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    status = response.status_code if 400 <= response.status_code < 500 else 502
    return ApiError(status, f"vLLM: {message}")


def unreachable(exc: httpx.HTTPError) -> ApiError:
    """A failed call to vLLM as a 502 that names what failed (httpx's timeouts have no text)."""
    return ApiError(502, f"vLLM is unreachable: {type(exc).__name__}: {exc}".rstrip(": "))


def shard_disk_bytes(spec: CaptureSpec, activation_bytes: int, settings: Settings) -> int:
    """Disk bytes to promise a shard: its activations, plus the HDF5 metadata and token
    arrays, plus channel statistics (three float64 vectors per layer of the MLP and attention
    widths, bounded by 8 x hidden: Qwen3-32B's are 5 x and 1.6 x)."""
    layers = len(spec.resolve_layers(settings.num_layers))
    stats = layers * 3 * 8 * 8 * settings.hidden_size if spec.channel_stats else 0
    return activation_bytes + stats + SHARD_OVERHEAD_BYTES


def capture_failure(exc: CaptureFailed, shard_dir: Path, retry_after_s: int) -> ApiError:
    """The connector's failure as an answer: a full disk is 507 naming the directory, busy
    device slots (a request that reached vLLM past the sidecar's own count) 429."""
    message = str(exc)
    if "Errno 28" in message or "No space left" in message:
        return ApiError(
            507,
            f"the shard directory {shard_dir} ran out of space while writing the shard "
            f"(nothing partial was kept; free space and retry): {message}",
        )
    refused = re.match(r"capture\.(\w+): ", message)
    if refused and SLOTS_BUSY in message:  # busy, not bad input
        headers = {"Retry-After": str(retry_after_s)}
        return ApiError(429, message, f"capture.{refused.group(1)}", headers)
    if refused:  # the connector refused the spec (kv_transfer_params.capture_error): bad input
        return ApiError(400, message, f"capture.{refused.group(1)}")
    return ApiError(500, f"capture failed: {message}")


def stop_string_params(completion: dict[str, Any], capture_id: str, store: ShardStore) -> dict:
    """The connector's params for a completion that ended on a stop string (answered without
    any: `ended_on_stop_string`), else `completion`'s own."""
    if not ended_on_stop_string(completion):
        return completion.get("kv_transfer_params") or {}
    return {
        "capture_id": capture_id,
        "shard_path": str(store.path_for(capture_id)),
        "error_path": str(store.error_path_for(capture_id)),
    }


class CaptureRunner:
    def __init__(self, settings: Settings, client: httpx.AsyncClient, store: ShardStore) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.disk = DiskBudget(store.root, settings.limits.min_free_disk_bytes)
        self._model_name = settings.model_name
        # The writer's "shard in place" datagrams (announce.py); None: poll the disk.
        self.announcements: Announcements | None = None
        # Who tokenizes: "checking" (the local tokenizer is being compared with vLLM's until
        # vLLM is up), "local" or "vllm" (`enable_local_tokenizer`).
        self.tokenizer = "checking" if settings.tokenizer else "vllm"
        self.local_tokenizer: LocalTokenizer | None = None
        self._max_model_len: int | None = None

    async def model_name(self) -> str:
        if self._model_name is None:
            try:
                r = await self.client.get(f"{self.settings.vllm_url}/v1/models")
                r.raise_for_status()
                self._model_name = r.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                raise ApiError(503, f"vLLM is not ready: {exc}") from exc
        return self._model_name

    async def max_model_len(self) -> int:
        """The served model's context length, from vLLM's /v1/models."""
        try:
            r = await self.client.get(f"{self.settings.vllm_url}/v1/models")
            r.raise_for_status()
            return int(r.json()["data"][0]["max_model_len"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(503, f"vLLM is not ready: {exc}") from exc

    async def tokenize(self, payload: dict[str, Any], field: str) -> tuple[list[int], int]:
        """Token ids and the model's context length from vLLM's /tokenize (errors name
        `field`)."""
        return await self._tokenize(payload, field)

    async def enable_local_tokenizer(self, poll_s: float = 1.0) -> str:
        """Once vLLM answers /health: load the model's tokenizer here and use it from then on
        if it gives vLLM's ids for every probe (`sidecar/tokenizer.py`); else keep asking
        vLLM. Returns who tokenizes ("local" or "vllm")."""
        name = self.settings.tokenizer
        if name is None:
            return self.tokenizer
        while True:
            try:
                r = await self.client.get(f"{self.settings.vllm_url}/health", timeout=5.0)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(poll_s)
        try:
            local = await asyncio.to_thread(
                LocalTokenizer.load, name, self.settings.tokenizer_revision
            )
            answers: list[list[int] | None] = []
            for probe in PROBES:
                try:
                    answers.append((await self._vllm_tokenize(dict(probe), "probe"))[0])
                except ApiError:
                    answers.append(None)
            max_model_len = await self.max_model_len()
            problems = disagreements(local, answers)
        except Exception as exc:  # any failure: vLLM keeps tokenizing
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:
            logger.warning(
                "tokenizing through vLLM's /tokenize: the local tokenizer of %s does not agree "
                "with vLLM's (%s)",
                name,
                "; ".join(problems),
            )
            self.tokenizer = "vllm"
            return self.tokenizer
        self._max_model_len, self.local_tokenizer = max_model_len, local
        self.tokenizer = "local"
        return self.tokenizer

    async def _tokenize(self, payload: dict[str, Any], field: str) -> tuple[list[int], int]:
        """Token ids and the context length: the local tokenizer's when it is in use and
        covers this shape of request, else vLLM's (and vLLM's errors)."""
        local = self.local_tokenizer
        if local is not None and self._max_model_len is not None and local_shape(payload):
            size = len(str(payload.get("prompt", payload.get("messages"))))
            try:
                if size > INLINE_TOKENIZE_CHARS:
                    ids = await asyncio.to_thread(local.encode, payload)
                else:
                    ids = local.encode(payload)
                return ids, self._max_model_len
            except Exception:  # vLLM answers, in its own words
                pass
        return await self._vllm_tokenize(payload, field)

    async def _vllm_tokenize(self, payload: dict[str, Any], field: str) -> tuple[list[int], int]:
        payload = {"model": await self.model_name(), **payload}
        try:
            r = await self.client.post(f"{self.settings.vllm_url}/tokenize", json=payload)
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc
        if r.status_code != 200:
            error = vllm_error(r)
            error.field = field
            raise error
        data = r.json()
        return list(data["tokens"]), int(data["max_model_len"])

    def parse(self, req: GenerateRequest) -> CaptureSpec:
        """The checks that need no round trip to vLLM (so the caller can refuse a busy server
        before tokenizing); raises ApiError (400/413) with nothing left behind."""
        settings = self.settings
        check_inputs(req)
        limit = settings.limits.max_tokens
        if req.text is not None and "max_tokens" in req.model_fields_set and req.max_tokens > limit:
            # Ignored when teacher-forcing, but a value over the limit breaks the schema's rule.
            raise ApiError(
                413,
                limit_message("max_tokens", req.max_tokens, "max_tokens", limit),
                "max_tokens",
            )
        try:
            check_teacher_logprobs(req.capture.teacher_logprobs, settings.max_logprobs)
            spec = CaptureSpec.from_dict(req.capture.model_dump(exclude_none=True))
            spec.resolve_layers(settings.num_layers)
        except CaptureSpecError as exc:
            raise ApiError(400, str(exc), f"capture.{exc.field}") from exc
        return spec

    async def prepare(self, req: GenerateRequest, spec: CaptureSpec) -> PreparedCapture:
        """Tokenize and check the limits of a request `parse` accepted; raises ApiError
        (400/413/...) with nothing left behind."""
        start = time.perf_counter()
        if req.messages is not None:
            messages = [m.model_dump() for m in req.messages]
            ids, max_model_len = await self._tokenize(
                {"messages": messages, "add_generation_prompt": True}, "messages"
            )
            prompt_field = "messages"
        else:
            ids, max_model_len = await self._tokenize(
                {"prompt": req.prompt, "add_special_tokens": True}, "prompt"
            )
            prompt_field = "prompt"
        text_start = None
        if req.text is not None:
            # Tokenized apart from the prompt so `text_start` is an exact token boundary.
            text_ids, _ = await self._tokenize(
                {"prompt": req.text, "add_special_tokens": False}, "text"
            )
            text_start = len(ids)
            ids = ids + text_ids
            prompt_field = "text"
        tokenize_s = time.perf_counter() - start
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", prompt_field)
        max_tokens = 1 if req.text is not None else req.max_tokens
        estimate = self.check_limits(
            spec,
            len(ids),
            max_tokens,
            max_model_len,
            prompt_field,
            "max_tokens" if req.text is None else prompt_field,
        )
        return PreparedCapture(
            capture_id=uuid.uuid4().hex,
            request=req,
            spec=spec,
            prompt_ids=ids,
            text_start=text_start,
            max_tokens=max_tokens,
            estimated_bytes=estimate,
            tokenize_s=tokenize_s,
        )

    def check_limits(
        self,
        spec: CaptureSpec,
        prompt_tokens: int,
        max_tokens: int,
        max_model_len: int,
        prompt_field: str,
        tokens_field: str,
    ) -> int:
        """The token, context and capture-byte limits (413/400 naming the field); returns the
        estimated activation bytes."""
        settings, limits = self.settings, self.settings.limits
        if prompt_tokens > limits.max_prompt_tokens:
            raise ApiError(
                413,
                limit_message(
                    "the prompt length in tokens",
                    prompt_tokens,
                    "max_prompt_tokens",
                    limits.max_prompt_tokens,
                ),
                prompt_field,
            )
        if max_tokens > limits.max_tokens:
            raise ApiError(
                413,
                limit_message("max_tokens", max_tokens, "max_tokens", limits.max_tokens),
                tokens_field,
            )
        if prompt_tokens + max_tokens > max_model_len:
            raise ApiError(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {max_model_len} tokens",
                tokens_field,
            )
        estimate = spec.estimate_bytes(
            prompt_tokens, max_tokens, settings.num_layers, settings.hidden_size
        )
        if estimate > limits.max_capture_bytes:
            raise ApiError(
                413,
                limit_message(
                    "the estimated capture size in bytes (tokens x layers x sites x hidden x "
                    "dtype bytes, plus tokens x (8 K + 4) with teacher_logprobs K)",
                    estimate,
                    "max_capture_bytes",
                    limits.max_capture_bytes,
                )
                + "; or capture fewer layers, sites or positions",
                "capture",
            )
        return estimate

    def reserve_disk(self, prepared: PreparedCapture) -> int:
        """Promise the shard's bytes on disk (507 if that would eat into the reserve); pass
        the returned count to `disk.release` once the capture has ended."""
        return self.reserve_disk_bytes(
            shard_disk_bytes(prepared.spec, prepared.estimated_bytes, self.settings)
        )

    def reserve_disk_bytes(self, nbytes: int) -> int:
        try:
            return self.disk.reserve_for(nbytes)
        except DiskFull as full:
            reserve = self.disk.reserve
            raise ApiError(
                507,
                f"the shard directory {self.store.root} has {full.free} bytes free, "
                f"{full.promised} of them promised to {full.in_flight} captures in flight; this "
                f"capture needs about {nbytes} and the server keeps {reserve} free (free "
                f"space, retry later, or lower the reserve with `vllm-activations serve "
                f"{LIMIT_FLAGS['min_free_disk_bytes']}`)",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None

    async def execute(self, prepared: PreparedCapture) -> GenerateResponse:
        """Run the capture and return the finished result (the shard is complete and hashed)."""
        req, t0 = prepared.request, time.perf_counter()
        if req.text is not None:
            sampling: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0}
        else:
            sampling = {
                "max_tokens": prepared.max_tokens,
                "temperature": req.temperature,
                "top_p": req.top_p,
                "seed": req.seed,
                "stop": req.stop,
                "ignore_eos": req.ignore_eos or None,
            }
        body = completion_body(
            model=await self.model_name(),
            prompt=prepared.prompt_ids,
            spec=prepared.spec,
            capture_id=prepared.capture_id,
            **sampling,
            **teacher_request_fields(prepared.spec),
        )
        try:
            r = await self.client.post(f"{self.settings.vllm_url}/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc
        if r.status_code != 200:
            raise vllm_error(r)
        completion = r.json()
        t1 = time.perf_counter()
        shard_id = prepared.capture_id
        try:
            params = capture_params(
                {"kv_transfer_params": stop_string_params(completion, shard_id, self.store)}
            )
            if prepared.spec.teacher_logprobs:
                await self.publish_teacher(params, completion, prepared.spec.teacher_logprobs)
            path = await wait_for_shard_async(
                params, self.settings.shard_timeout_s, announcements=self.announcements
            )
        except CaptureFailed as exc:
            raise capture_failure(exc, self.store.root, self.settings.retry_after_s) from exc
        t2 = time.perf_counter()
        sha256, meta = await asyncio.to_thread(self._hash_and_read, path)
        t3 = time.perf_counter()
        choice = completion["choices"][0]
        return GenerateResponse(
            id=shard_id,
            mode=req.mode,
            text=choice.get("text") or "",
            input_tokens=meta["input_tokens"],
            output_tokens=meta["output_tokens"],
            text_start=prepared.text_start,
            finish_reason=choice.get("finish_reason"),
            shard=ShardInfo(
                id=shard_id,
                url=f"/shards/{shard_id}",
                bytes=meta["bytes"],
                sha256=sha256,
                layers=meta["layers"],
                positions=meta["positions"],
                sites=list(prepared.spec.sites),
                dtype=prepared.spec.dtype,
                teacher_logprobs=prepared.spec.teacher_logprobs,
            ),
            timings=Timings(
                tokenize_s=prepared.tokenize_s,
                generate_s=t1 - t0,
                shard_wait_s=t2 - t1,
                sha256_s=t3 - t2,
                total_s=prepared.tokenize_s + t3 - t0,
            ),
        )

    async def publish_teacher(
        self, params: dict[str, Any], completion: dict[str, Any], k: int
    ) -> None:
        """Wait for the connector's staged shard, add the teacher data of `completion` (the
        request must have asked for `teacher_request_fields`) and publish it under its final
        name. Raises CaptureFailed; a failure removes the staged file."""
        staged = staged_shard_path(params["shard_path"])
        await wait_for_shard_async(
            {**params, "shard_path": str(staged)},
            self.settings.shard_timeout_s,
            announcements=self.announcements,
        )
        try:
            await asyncio.to_thread(finish_teacher_shard, params["shard_path"], completion, k)
        except (TeacherDataError, ShardError, OSError) as exc:
            staged.unlink(missing_ok=True)
            raise CaptureFailed(f"teacher data: {exc}") from exc

    async def _wait_for_shard(self, params: dict[str, Any]) -> Path:
        return await wait_for_shard_async(
            params, self.settings.shard_timeout_s, announcements=self.announcements
        )

    async def wait_and_describe(self, params: dict[str, Any]) -> dict[str, Any]:
        """Wait for the shard the connector named in `params`; its public description."""
        try:
            path = await wait_for_shard_async(
                params, self.settings.shard_timeout_s, announcements=self.announcements
            )
        except CaptureFailed as exc:
            raise capture_failure(exc, self.store.root, self.settings.retry_after_s) from exc
        sha256 = await asyncio.to_thread(self.store.sha256, path)
        shard_id = str(params["capture_id"])
        return {
            "shard_id": shard_id,
            "shard_url": f"/shards/{shard_id}",
            "bytes": path.stat().st_size,
            "sha256": sha256,
        }

    def _hash_and_read(self, path: Path) -> tuple[str, dict[str, Any]]:
        sha256 = self.store.sha256(path)
        with ShardReader(path) as reader:
            meta = {
                name: reader.dataset(name).tolist()
                for name in ("input_tokens", "output_tokens", "positions", "layers")
            }
        meta["bytes"] = path.stat().st_size
        return sha256, meta
