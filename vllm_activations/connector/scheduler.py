"""Scheduler side (engine core): validates capture specs, hands out device slots, and ships
each step's scheduled token ranges of capture requests, with the KV blocks those tokens are
written to, to the workers."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_activations.connector.protocol import (
    CAPTURE_ID_KEY,
    CAPTURE_KEY,
    CaptureStepMetadata,
    FinishedCapture,
    NewCapture,
    error_path,
    shard_path,
)
from vllm_activations.contract.spec import (
    CaptureSpec,
    CaptureSpecError,
    busy_slots_message,
    no_slots_message,
    validate_capture_id,
)

# A finished capture's id stays taken until its shard or error file appears (the worker writes
# it after the request has left the scheduler), at most this long.
UNPUBLISHED_TTL_S = 600.0


@dataclass
class _SchedulerRequest:
    capture_id: str
    spec: CaptureSpec
    layers: list[int]
    block_ids: list[int] = field(default_factory=list)
    announced: bool = False
    stats_slot: int | None = None
    summary_slot: int | None = None
    last_slot: int | None = None


class _SlotPool:
    """Device slots of one kind (channel statistics, summaries) handed to running requests."""

    def __init__(self, kind: str, count: int) -> None:
        self.kind, self.count = kind, count
        self._free = list(range(count))[::-1]

    def take(self) -> int:
        if not self.count:
            raise CaptureSpecError(self.kind, no_slots_message(self.kind))
        if not self._free:
            raise CaptureSpecError(self.kind, busy_slots_message(self.kind, self.count))
        return self._free.pop()

    def try_take(self) -> int | None:
        """A free slot, or None (for slots that only make a request cheaper)."""
        return self._free.pop() if self._free else None

    def free(self, slot: int | None) -> None:
        if slot is not None:
            self._free.append(slot)


class CaptureScheduler:
    """The connector's scheduler role: one per engine core."""

    def __init__(self, vllm_config, shard_dir: Path, num_layers: int, block_size: int) -> None:
        from vllm_activations.capture import channel_stats_slots, last_token_slots, summary_slots

        self.shard_dir = shard_dir
        self.num_layers = num_layers
        self.block_size = block_size
        self._requests: dict[str, _SchedulerRequest] = {}
        self._errors: dict[str, str] = {}
        self._finished: dict[str, FinishedCapture] = {}
        self._unpublished: dict[str, float] = {}  # capture id -> when its request finished
        self._stat_pool = _SlotPool("channel_stats", channel_stats_slots(vllm_config))
        self._summary_pool = _SlotPool("summary", summary_slots(vllm_config))
        self._last_pool = _SlotPool("last_token", last_token_slots(vllm_config))

    def on_new_request(self, request) -> None:
        """Validate the capture spec and turn off prefix-cache reads for capture requests."""
        params = request.kv_transfer_params or {}
        if CAPTURE_KEY not in params:
            return
        try:
            spec = CaptureSpec.from_dict(params[CAPTURE_KEY])
            layers = spec.resolve_layers(self.num_layers)
            capture_id = validate_capture_id(
                params.get(CAPTURE_ID_KEY) or _sanitize(request.request_id)
            )
            if self._taken(capture_id):
                raise CaptureSpecError("capture_id", f"{capture_id!r} is already in use")
            if not (spec.tensors or spec.summary or spec.channel_stats or spec.teacher_logprobs):
                raise CaptureSpecError(
                    "tensors",
                    "false keeps nothing; also ask for summary, channel_stats or teacher_logprobs",
                )
            summary_slot = self._summary_pool.take() if spec.summary else None
            try:
                stats_slot = self._stat_pool.take() if spec.channel_stats else None
            except CaptureSpecError:
                self._summary_pool.free(summary_slot)
                raise
        except CaptureSpecError as exc:
            self._errors[request.request_id] = str(exc)
            return
        if spec.skips_prefix_cache:
            request.skip_reading_prefix_cache = True
        # Last-token rows on the device when a slot is free, else through the host as before.
        last = self._last_pool.try_take() if spec.tensors and spec.positions == "last" else None
        self._requests[request.request_id] = _SchedulerRequest(
            capture_id, spec, layers, stats_slot=stats_slot, summary_slot=summary_slot,
            last_slot=last,
        )  # fmt: skip

    def _taken(self, capture_id: str) -> bool:
        """A shard of that id exists, or a running or finished-but-unwritten capture has it
        (a second capture would replace the first one's shard)."""
        now = time.monotonic()
        for done, since in list(self._unpublished.items()):
            if (
                now - since > UNPUBLISHED_TTL_S
                or shard_path(self.shard_dir, done).exists()
                or error_path(self.shard_dir, done).exists()
            ):
                del self._unpublished[done]
        return (
            shard_path(self.shard_dir, capture_id).exists()
            or capture_id in self._unpublished
            or any(r.capture_id == capture_id for r in self._requests.values())
        )

    def build_connector_meta(self, scheduler_output) -> CaptureStepMetadata:
        meta = CaptureStepMetadata(finished=self._finished)
        self._finished = {}
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new_req in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new_req.req_id)
            if state is None:
                continue
            meta.scheduled[new_req.req_id] = (
                new_req.num_computed_tokens,
                num_scheduled.get(new_req.req_id, 0),
            )
            state.block_ids = list(new_req.block_ids[0])
            if not state.announced:
                state.announced = True
                meta.new[new_req.req_id] = NewCapture(
                    capture_id=state.capture_id,
                    spec=state.spec.to_dict(),
                    layers=state.layers,
                    prompt_token_ids=list(new_req.prompt_token_ids or []),
                    sampling_params=_sampling_attrs(new_req.sampling_params),
                    stats_slot=state.stats_slot,
                    summary_slot=state.summary_slot,
                    last_slot=state.last_slot,
                )
            meta.block_tables[new_req.req_id] = self._written_blocks(state, meta, new_req.req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            meta.scheduled[req_id] = (cached.num_computed_tokens[i], num_scheduled.get(req_id, 0))
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
                meta.resumed.add(req_id)
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            meta.block_tables[req_id] = self._written_blocks(state, meta, req_id)
        return meta

    def _written_blocks(self, state: _SchedulerRequest, meta: CaptureStepMetadata, req_id: str):
        """The KV blocks this step's tokens of `req_id` are written to: its block table from
        index start // block_size, covering positions start .. start + count - 1. Only these
        hold rows of this step (a decode step ships one block per request, not its table)."""
        start, count = meta.scheduled[req_id]
        if count <= 0:
            return []
        first, last = start // self.block_size, (start + count - 1) // self.block_size
        return state.block_ids[first : last + 1]

    def request_finished(self, request):
        """Tell the client where its shard will be; the worker writes it next step."""
        req_id = request.request_id
        if req_id in self._errors:
            return False, {"capture_error": self._errors.pop(req_id)}
        state = self._requests.pop(req_id, None)
        if state is None:
            return False, None
        # The worker reads the slots out at the next step's bind, before anything new runs.
        self._stat_pool.free(state.stats_slot)
        self._summary_pool.free(state.summary_slot)
        self._last_pool.free(state.last_slot)
        reason = request.get_finished_reason()
        self._unpublished[state.capture_id] = time.monotonic()
        self._finished[req_id] = FinishedCapture(
            output_token_ids=list(request.output_token_ids),
            finish_reason=str(reason) if reason is not None else None,
        )
        return False, {
            CAPTURE_ID_KEY: state.capture_id,
            "shard_path": str(shard_path(self.shard_dir, state.capture_id)),
            "error_path": str(error_path(self.shard_dir, state.capture_id)),
            "capture": state.spec.to_dict(),
        }


def _sanitize(request_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", request_id)[:128].lstrip("._-") or "capture"


def _sampling_attrs(params) -> dict[str, Any]:
    if params is None:
        return {}
    keys = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "min_tokens")
    return {k: getattr(params, k, None) for k in keys}
