"""Request side of capture: a KV connector that attributes buffer rows to requests and writes
one HDF5 shard per capture request.

Why a KV connector: it is vLLM's public per-step extension point on both sides of the process
boundary, called in every runner and CUDA-graph mode, with no monkey-patching.
- Scheduler side (engine core): `on_new_request` reads the capture spec from the request's
  `kv_transfer_params["capture"]`, validates it, and, when the spec needs prompt positions,
  turns off prefix-cache READS for that request (cached blocks are never recomputed, so their
  activations would be missing; the request still populates the cache for others). Specs for
  `generated` or `last` positions keep their cache hits: vLLM recomputes the last prompt
  token and every generated one. `build_connector_meta` ships, each step, the
  block table of every scheduled capture request and the requests that finished.
  `request_finished` returns the shard path to the client as `kv_transfer_params`.
- Worker side (TP rank 0 only; the residual stream is replicated across TP ranks):
  `wait_for_save` runs after each forward. It needs no forward context (Model Runner V2 calls
  it after the context has closed, and in FULL CUDA-graph mode there never is one): the
  capture op itself records each batch row's absolute position and KV slot (capture.py). A
  row belongs to the scheduled capture request whose block table holds the row's block at
  index `position // block_size` AND whose tokens scheduled this step (computed-token offset
  .. + scheduled count, shipped by the scheduler) include the position: a block two requests
  share (a prefix-cache hit) is computed by one of them only, so ownership is unique by
  construction, under any batch order, chunked prefill and preemption (rows are keyed by
  position, so a recomputed row replaces the old one). Rows at or past a finished request's
  last forwarded position P+G-2 (async scheduling forwards one more token after an EOS) are
  dropped. Finished requests are handed to a writer thread that checks every expected
  position is present and writes the shard atomically, or writes `<capture_id>.error.json`
  saying what is missing.
- Channel statistics (`channel_stats: true`): the scheduler gives the request one of the
  model's statistics slots (capture.py), or rejects it when all are taken. Every TP rank, in
  `bind_connector_metadata` (before the forward), points the KV blocks of scheduled requests
  at their slots, zeroes the slot of a request recomputed after preemption, and reads out
  (all-gathering the TP shards of the channels) and frees the slots of finished requests; a
  token forwarded past the request's end is taken out of the sums first.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from vllm_activations.spec import SITES, CaptureSpec, CaptureSpecError

logger = logging.getLogger("vllm_activations.connector")

CAPTURE_KEY = "capture"
CAPTURE_ID_KEY = "capture_id"
CAPTURE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_SHARD_DIR = "shards"
_TORCH_STORAGE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_NUMPY_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
# Generated columns a row store starts with when the request gives no max_tokens / at most.
_INITIAL_GENERATED = 256
_MAX_INITIAL_GENERATED = 1024


def shard_path(shard_dir: str | os.PathLike[str], capture_id: str) -> Path:
    return Path(shard_dir) / f"{capture_id}.h5"


def error_path(shard_dir: str | os.PathLike[str], capture_id: str) -> Path:
    return Path(shard_dir) / f"{capture_id}.error.json"


def validate_capture_id(capture_id: object) -> str:
    """A capture id is a file name stem: letters, digits, '.', '_', '-', at most 128 chars."""
    if not isinstance(capture_id, str) or not CAPTURE_ID_RE.fullmatch(capture_id):
        raise CaptureSpecError(
            "capture_id",
            f"{capture_id!r} is not allowed; use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit",
        )
    return capture_id


@dataclass
class NewCapture:
    """Sent once per request, the first step it is scheduled."""

    capture_id: str
    spec: dict[str, Any]
    layers: list[int]
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any]
    stats_slot: int | None = None
    summary_slot: int | None = None


@dataclass
class FinishedCapture:
    """Sent the step after a capture request finished."""

    output_token_ids: list[int]
    finish_reason: str | None


@dataclass
class CaptureStepMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step.

    block_tables and scheduled cover the capture requests scheduled this step: scheduled[r] is
    (first position computed this step, number of tokens scheduled), i.e. the request's
    num_computed_tokens and num_scheduled_tokens.
    """

    new: dict[str, NewCapture] = field(default_factory=dict)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    scheduled: dict[str, tuple[int, int]] = field(default_factory=dict)
    finished: dict[str, FinishedCapture] = field(default_factory=dict)
    resumed: set[str] = field(default_factory=set)


@dataclass
class _SchedulerRequest:
    capture_id: str
    spec: CaptureSpec
    layers: list[int]
    block_ids: list[int] = field(default_factory=list)
    announced: bool = False
    stats_slot: int | None = None
    summary_slot: int | None = None


class _RowStore:
    """One request's captured rows, already in shard layout: per site an [L, columns, H] array
    in the storage representation, column = (position - base) // step (base = the prompt
    length for `generated`, step = K for `every:K`). Rows land in place each step, so
    finishing a request needs no concatenation or transpose; capacity doubles when a
    generation outgrows it. A recomputed position (preemption) overwrites its column.
    `last` keeps the two most recent positions (column = position % 2): the request's end is
    known only after async scheduling may have forwarded one token past it.
    """

    def __init__(
        self, spec: CaptureSpec, layers: list[int], num_layers: int, hidden: int,
        num_prompt: int, max_tokens: int | None,
    ) -> None:  # fmt: skip
        self.last = spec.positions == "last"
        self.base = num_prompt if spec.positions == "generated" else 0
        self.step = spec.every or 1
        self.last_positions = np.full(2, -1, dtype=np.int64)
        self.layers = np.asarray(layers, dtype=np.int64)
        self.all_layers = layers == list(range(num_layers))
        planned = min(max_tokens or _INITIAL_GENERATED, _MAX_INITIAL_GENERATED)
        cap = 2 if self.last else max(1, len(spec.expected_positions(num_prompt, planned)))
        dtype = _NUMPY_STORAGE[spec.dtype]
        self.sites = {site: np.empty((len(layers), cap, hidden), dtype) for site in spec.sites}
        self.filled = np.zeros(cap, dtype=bool)

    def columns(self) -> np.ndarray:
        """The capture-buffer columns (2 * layer + site) this request keeps."""
        offsets = [SITES.index(site) for site in self.sites]
        return np.sort((2 * self.layers[:, None] + np.asarray(offsets)[None, :]).ravel())

    def add(self, positions: np.ndarray, rows: np.ndarray, column_of: np.ndarray) -> None:
        """rows: [k, C, H] gathered rows (storage dtype) of `positions`; column_of maps a
        capture-buffer column (2 * layer + site) to its index among the C gathered ones."""
        if self.last:
            positions, rows = positions[-2:], rows[-2:]
            cols = positions % 2
            self.last_positions[cols] = positions
        else:
            cols = (positions - self.base) // self.step
        if cols.max() >= len(self.filled):
            self._grow(int(cols.max()) + 1)
        contiguous = cols[-1] - cols[0] == len(cols) - 1 and bool((np.diff(cols) == 1).all())
        target = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
        full = rows.shape[1] == len(column_of)
        for site, store in self.sites.items():
            offset = SITES.index(site)
            if self.all_layers and full:
                src = rows[:, offset::2, :]
            else:
                src = rows[:, column_of[2 * self.layers + offset], :]
            store[:, target, :] = src.transpose(1, 0, 2)
        self.filled[target] = True

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * len(self.filled))
        for site, old in self.sites.items():
            new = np.empty((old.shape[0], cap, old.shape[2]), old.dtype)
            new[:, : old.shape[1]] = old
            self.sites[site] = new
        filled = np.zeros(cap, dtype=bool)
        filled[: len(self.filled)] = self.filled
        self.filled = filled

    def missing(self, expected: list[int]) -> list[int]:
        """The expected positions that have no row."""
        if self.last:
            return [] if self.last_positions[expected[0] % 2] == expected[0] else expected
        cols = (np.asarray(expected, dtype=np.int64) - self.base) // self.step
        have = np.zeros(len(cols), dtype=bool)
        inside = cols < len(self.filled)
        have[inside] = self.filled[cols[inside]]
        return [p for p, ok in zip(expected, have, strict=True) if not ok]

    def layer_outputs(self, expected: list[int]) -> dict[str, np.ndarray]:
        """Per site the [L, len(expected), H] view of the expected positions' columns."""
        if self.last:
            col = expected[0] % 2
            return {site: store[:, col : col + 1] for site, store in self.sites.items()}
        return {site: store[:, : len(expected)] for site, store in self.sites.items()}


@dataclass
class _WorkerRequest:
    """Rows captured so far for one request."""

    new: NewCapture
    spec: CaptureSpec
    store: _RowStore | None = None
    channel_stats: dict[str, np.ndarray] | None = None
    summary: dict[str, dict[str, np.ndarray]] | None = None
    # Set when the rows or statistics cannot be trusted; the writer reports it.
    error: str | None = None


class _SlotPool:
    """Device slots of one kind (channel statistics, summaries) handed to running requests."""

    def __init__(self, field_name: str, flag: str, count: int) -> None:
        self.field_name, self.flag, self.count = field_name, flag, count
        self._free = list(range(count))[::-1]

    def take(self) -> int:
        if not self.count:
            raise CaptureSpecError(
                self.field_name,
                f"this server keeps no {self.field_name} slots (started with {self.flag} 0)",
            )
        if not self._free:
            raise CaptureSpecError(
                self.field_name,
                f"all {self.count} {self.field_name} slots are in use by running requests "
                f"(the server's {self.flag}); retry when one finishes",
            )
        return self._free.pop()

    def free(self, slot: int | None) -> None:
        if slot is not None:
            self._free.append(slot)


@dataclass
class _SummarySlot:
    """A running request's summary slot (on the writing rank)."""

    slot: int
    sites: list[int]
    boundaries: list[int]
    num_prompt: int


@dataclass
class _StatSlot:
    """A running request's statistics slot, on every TP rank."""

    slot: int
    layers: list[int]
    num_prompt: int
    # One past the last position forwarded so far (from the scheduled token ranges).
    forwarded_end: int = 0


class ActivationCaptureConnector(KVConnectorBase_V1):
    """Maps captured residual-stream rows to requests and writes one shard per request."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.shard_dir = Path(extra.get("shard_dir", DEFAULT_SHARD_DIR)).resolve()
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) != 1:
            raise ValueError(
                f"vllm-activations supports models with one KV cache group, got {len(groups)}"
            )
        self.block_size = groups[0].kv_cache_spec.block_size
        hf_config = vllm_config.model_config.hf_config
        self.num_layers = hf_config.num_hidden_layers
        self.model_attrs = _model_attrs(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            from vllm_activations.capture import channel_stats_slots, summary_slots

            self._requests: dict[str, _SchedulerRequest] = {}
            self._errors: dict[str, str] = {}
            self._finished: dict[str, FinishedCapture] = {}
            self._stat_pool = _SlotPool(
                "channel_stats", "--channel-stats-slots", channel_stats_slots(vllm_config)
            )
            self._summary_pool = _SlotPool("summary", "--summary-slots", summary_slots(vllm_config))
            self._resumed: set[str] = set()
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from vllm_activations.capture import capture_state

            self.is_writer = get_tensor_model_parallel_rank() == 0
            self._active: dict[str, _WorkerRequest] = {}
            self._writer = _ShardWriterThread(vllm_config, self.model_attrs)
            self._capture = capture_state()
            self._stats = self._capture.channel_stats
            self._stat_slots: dict[str, _StatSlot] = {}
            self._summary = self._capture.summary
            self._summary_slots: dict[str, _SummarySlot] = {}
            # Unpadded batch size of this step, when the runner says (Model Runner V2).
            self._num_tokens: int | None = None
            if self._stats is not None:
                self._stats.bind_blocks(kv_cache_config.num_blocks, self.block_size)
            if self._summary is not None:
                self._summary.bind_blocks(kv_cache_config.num_blocks, self.block_size)
                self._writer.special_ids = list(self._summary.special_ids)

    # ---------------------------------------------------------------- scheduler side

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
            if shard_path(self.shard_dir, capture_id).exists() or any(
                r.capture_id == capture_id for r in self._requests.values()
            ):
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
        self._requests[request.request_id] = _SchedulerRequest(
            capture_id, spec, layers, stats_slot=stats_slot, summary_slot=summary_slot
        )

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

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
                )
            meta.block_tables[new_req.req_id] = state.block_ids
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
            meta.block_tables[req_id] = list(state.block_ids)
        return meta

    def request_finished(self, request, block_ids: list[int]):
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
        reason = request.get_finished_reason()
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

    # ---------------------------------------------------------------- worker side

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before the forward: whether this step captures at all, and the statistics slots."""
        super().bind_connector_metadata(connector_metadata)
        self._num_tokens = None
        if not isinstance(connector_metadata, CaptureStepMetadata):
            return
        self._capture.want_layers(self._layers_this_step(connector_metadata))
        if self._stats is not None:
            self._update_channel_stats(connector_metadata)
        if self._summary is not None and self.is_writer:
            self._update_summaries(connector_metadata)

    def _layers_this_step(self, meta: CaptureStepMetadata) -> set[int]:
        """Layers some request scheduled this step captures (none on ranks that do not write)."""
        if not self.is_writer:
            return set()
        layers: set[int] = set()
        for req_id in meta.block_tables:
            new = meta.new.get(req_id)
            state = self._active.get(req_id)
            new = new if new is not None else (state.new if state is not None else None)
            if new is None:
                continue
            if new.summary_slot is not None:  # a summary reads every site of every layer
                return set(range(self.num_layers))
            layers.update(new.layers)
        return layers

    def _update_summaries(self, meta: CaptureStepMetadata) -> None:
        """Before the forward, on the writing rank: finished summaries out, new and resumed
        slots started, then the block -> slot table of this step's scheduled requests."""
        from vllm_activations.summary import read_slot, select_sites

        summary = self._summary
        for req_id, fin in meta.finished.items():
            entry = self._summary_slots.pop(req_id, None)
            if entry is None:
                continue
            last = entry.num_prompt + max(len(fin.output_token_ids), 1) - 2
            result = read_slot(summary, entry.slot, last)
            state = self._active.get(req_id)
            if state is not None:
                state.summary = select_sites(result, entry.sites, entry.boundaries)
        for req_id, new in meta.new.items():
            if new.summary_slot is None:
                continue
            spec = CaptureSpec.from_dict(new.spec)
            sites = [0] + [
                1 + 2 * layer + SITES.index(site) for layer in new.layers for site in spec.sites
            ]
            boundaries = [0] + (
                [layer + 1 for layer in new.layers] if "post_mlp" in spec.sites else []
            )
            entry = _SummarySlot(new.summary_slot, sites, boundaries, len(new.prompt_token_ids))
            self._summary_slots[req_id] = entry
            summary.start_slot(entry.slot, spec.positions, spec.every, entry.num_prompt)
        for req_id in meta.resumed:
            entry = self._summary_slots.get(req_id)
            if entry is not None:  # recomputed from its first token
                spec = self._active[req_id].spec
                summary.start_slot(entry.slot, spec.positions, spec.every, entry.num_prompt)
        owned = [
            (self._summary_slots[r].slot, table)
            for r, table in meta.block_tables.items()
            if r in self._summary_slots
        ]
        _point_blocks(summary, owned)

    def _update_channel_stats(self, meta: CaptureStepMetadata) -> None:
        """Before the forward, on every TP rank: finished slots out, new and resumed slots
        zeroed, then the block -> slot table of this step's scheduled requests."""
        stats = self._stats
        for req_id, fin in meta.finished.items():
            entry = self._stat_slots.pop(req_id, None)
            if entry is None:
                continue
            result = self._finish_stat_slot(entry, fin)
            state = self._active.get(req_id) if self.is_writer else None
            if state is not None:
                if isinstance(result, str):
                    state.error = result
                else:
                    state.channel_stats = result
            stats.zero_slot(entry.slot)
        for req_id, new in meta.new.items():
            if new.stats_slot is not None:
                self._stat_slots[req_id] = _StatSlot(
                    new.stats_slot, new.layers, len(new.prompt_token_ids)
                )
                stats.zero_slot(new.stats_slot)
        for req_id in meta.resumed:
            if req_id in self._stat_slots:  # recomputed from its first token
                stats.zero_slot(self._stat_slots[req_id].slot)
        owned = []
        for req_id, table in meta.block_tables.items():
            entry = self._stat_slots.get(req_id)
            if entry is None:
                continue
            start, count = meta.scheduled.get(req_id, (0, 0))
            entry.forwarded_end = max(entry.forwarded_end, start + count)
            owned.append((entry.slot, table))
        _point_blocks(stats, owned)

    def _finish_stat_slot(
        self, entry: _StatSlot, fin: FinishedCapture
    ) -> dict[str, np.ndarray] | str:
        """A finished request's statistics over exactly its forwarded positions 0..P+G-2, or
        why they cannot be given."""
        forwarded = entry.num_prompt + max(len(fin.output_token_ids), 1) - 1
        extra = entry.forwarded_end - forwarded
        if extra == 1:  # async scheduling's step after an EOS: one decode token too many
            self._stats.remove_last_token(entry.slot)
        elif extra > 1:
            return (
                f"channel statistics: {extra} tokens were forwarded past the request's end "
                f"(position {forwarded - 1}); at most one can be taken out"
            )
        return self._read_stat_slot(entry.slot, entry.layers)

    def _read_stat_slot(self, slot: int, layers: list[int]) -> dict[str, np.ndarray]:
        """One request's statistics for its captured layers, all channels (TP-gathered)."""
        from vllm.distributed import get_tp_group

        stats = self._stats
        index = torch.as_tensor(layers, dtype=torch.long, device=stats.counts.device)
        tp = get_tp_group()
        count = int(stats.counts[slot])
        out: dict[str, np.ndarray] = {}
        for kind in stats.sums:
            for name, source in (
                ("sum", stats.sums[kind]),
                ("sum_sq", stats.sum_sqs[kind]),
                ("abs_sum", stats.abs_sums[kind]),
            ):
                part = source[:, slot].index_select(0, index)
                if tp.world_size > 1 and stats.sharded[kind]:
                    part = tp.all_gather(part.contiguous(), dim=-1)
                out[f"channel_stats/{kind}/{name}"] = part.cpu().numpy()
            out[f"channel_stats/{kind}/count"] = np.full(len(layers), count, dtype=np.int64)
        return out

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Model Runner V2 passes the unpadded batch size: rows past it are padding."""
        num_tokens = kwargs.get("num_tokens")
        self._num_tokens = int(num_tokens) if num_tokens is not None else None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        """After the forward (inside a forward context on V1, outside on V2): copy this step's
        capture rows out, then hand finished requests to the writer."""
        if not self.is_writer or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, CaptureStepMetadata)
        for req_id, new in meta.new.items():
            self._active[req_id] = _WorkerRequest(new=new, spec=CaptureSpec.from_dict(new.spec))
        if meta.scheduled:
            self._collect_rows(meta)
        for req_id, fin in meta.finished.items():
            state = self._active.pop(req_id, None)
            if state is not None:
                self._writer.submit(self.shard_dir, state, fin)

    def _row_owners(
        self, meta: CaptureStepMetadata
    ) -> list[tuple[_WorkerRequest, np.ndarray, np.ndarray]]:
        """(request, positions, buffer rows) of every capture request's kept rows this step,
        positions ascending, from the positions and KV slots the capture op recorded."""
        capture = self._capture
        slots = capture.row_slots.cpu().numpy()
        positions = capture.row_positions.cpu().numpy()
        if self._num_tokens is not None:
            slots, positions = slots[: self._num_tokens], positions[: self._num_tokens]
        rows = np.flatnonzero(slots >= 0)
        row_slot, row_pos = slots[rows], positions[rows]
        row_block, row_offset = row_slot // self.block_size, row_slot % self.block_size
        selected = []
        for req_id, (start, count) in meta.scheduled.items():
            state = self._active.get(req_id)
            if state is None or count <= 0 or not state.spec.tensors:
                continue
            table = np.asarray(meta.block_tables.get(req_id, ()), dtype=np.int64)
            inside = np.flatnonzero((row_pos >= start) & (row_pos < start + count))
            index = row_pos[inside] // self.block_size
            inside, index = inside[index < len(table)], index[index < len(table)]
            mine = inside[
                (table[index] == row_block[inside])
                & (row_offset[inside] == row_pos[inside] % self.block_size)
            ]
            pos = row_pos[mine]
            if state.spec.positions == "last":  # the end is not known yet: the two newest
                newest = np.argsort(pos, kind="stable")[-2:]
                mine, pos = mine[newest], pos[newest]
            else:
                keep = state.spec.keeps_position(pos, len(state.new.prompt_token_ids))
                mine, pos = mine[keep], pos[keep]
            if len(mine):
                order = np.argsort(pos, kind="stable")
                selected.append((state, pos[order], rows[mine[order]]))
        return selected

    def _collect_rows(self, meta: CaptureStepMetadata) -> None:
        selected = self._row_owners(meta)
        if not selected:
            return
        buffer = self._capture.buffer
        for state, _, _ in selected:
            if state.store is None:
                state.store = _RowStore(
                    state.spec,
                    state.new.layers,
                    self.num_layers,
                    buffer.shape[2],
                    len(state.new.prompt_token_ids),
                    state.new.sampling_params.get("max_tokens"),
                )
        # Only the columns (layer x site) some selected request keeps leave the device.
        columns = np.unique(np.concatenate([s.store.columns() for s, _, _ in selected]))
        column_of = np.full(buffer.shape[1], -1, dtype=np.int64)
        column_of[columns] = np.arange(len(columns))
        all_rows = np.concatenate([r for _, _, r in selected])
        bounds = np.cumsum([0] + [len(r) for _, _, r in selected])
        for stage_start, staged in self._staged_rows(all_rows, columns):
            stage_end = stage_start + len(staged)
            host: dict[str, np.ndarray] = {}
            for k, (state, pos, _) in enumerate(selected):
                lo, hi = max(bounds[k], stage_start), min(bounds[k + 1], stage_end)
                if lo >= hi:
                    continue
                dtype = state.spec.dtype
                if dtype not in host:
                    host[dtype] = _to_host(staged, dtype)
                part = host[dtype][lo - stage_start : hi - stage_start]
                state.store.add(pos[lo - bounds[k] : hi - bounds[k]], part, column_of)

    def _staged_rows(self, rows: np.ndarray, columns: np.ndarray):
        """Yield (offset, host tensor [k, len(columns), H]) for `rows` x `columns` of the
        capture buffer in bounded chunks: one gather into the device staging buffer and one
        pinned, non-blocking device-to-host copy per chunk (on CPU the gather lands in host
        staging directly). A chunk is valid until the next one is requested."""
        capture = self._capture
        buffer, host = capture.buffer, capture.host_staging
        device = capture.device_staging
        sites, hidden = buffer.shape[1], buffer.shape[2]
        width = len(columns)
        chunk = max(1, host.shape[0] * sites // width)
        flat = buffer.view(-1, hidden)  # row r, column c is flat row r * sites + c
        cols = torch.as_tensor(columns, device=buffer.device)
        for start in range(0, len(rows), chunk):
            index = torch.as_tensor(rows[start : start + chunk], device=buffer.device)
            k = index.shape[0]
            flat_index = (index[:, None] * sites + cols[None, :]).view(-1)
            target = device if device is not None else host
            out = target.view(-1)[: k * width * hidden].view(k * width, hidden)
            torch.index_select(flat, 0, flat_index, out=out)
            staged = host.view(-1)[: k * width * hidden].view(k, width, hidden)
            if device is not None:
                staged.copy_(out.view(k, width, hidden), non_blocking=True)
                torch.cuda.current_stream().synchronize()
            yield start, staged

    def get_finished(self, finished_req_ids: set[str]):
        return None, None

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self._writer.close()


def _point_blocks(state, owned: list[tuple[int, list[int]]]) -> None:  # noqa: ANN001
    """Point the KV blocks of this step's requests at their device slots (every other block
    at the trash slot) in a slot state's `block_owner`, and say whether any is active."""
    if not owned and not state.active:
        return
    owner = np.full(state.block_owner.shape[0], state.slots, dtype=np.int64)
    for slot, table in owned:
        owner[np.asarray(table, dtype=np.int64)] = slot
    state.block_owner.copy_(torch.from_numpy(owner))
    state.active = bool(owned)


def _to_host(rows: torch.Tensor, dtype: str) -> np.ndarray:
    """Rows in the storage representation of `dtype`, as a host numpy array."""
    stored = rows.to(_TORCH_STORAGE[dtype])
    if dtype == "bfloat16":
        return stored.view(torch.int16).cpu().numpy().view(np.uint16)
    return stored.cpu().numpy()


class _ShardWriterThread:
    """Assembles and writes shards off the engine's step loop, in submission order."""

    def __init__(self, vllm_config, model_attrs: dict[str, Any]) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._model_attrs = model_attrs
        self._tokenizer_name = vllm_config.model_config.tokenizer
        self._tokenizer_revision = vllm_config.model_config.tokenizer_revision
        self._trust_remote_code = vllm_config.model_config.trust_remote_code
        self._tokenizer = None
        # Special token ids the summary's `content` population left out (recorded per shard).
        self.special_ids: list[int] = []
        self._thread = threading.Thread(target=self._run, name="vllm-activations-writer")
        self._thread.daemon = True
        self._thread.start()

    def submit(self, shard_dir: Path, state: _WorkerRequest, fin: FinishedCapture) -> None:
        self._queue.put((shard_dir, state, fin))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            shard_dir, state, fin = item
            try:
                self._write(shard_dir, state, fin)
            except Exception as exc:  # noqa: BLE001 - reported to the client via the error file
                logger.exception("vllm-activations: shard %s failed", state.new.capture_id)
                _write_error(shard_dir, state.new.capture_id, f"shard write failed: {exc}")

    def _decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._tokenizer_name,
                revision=self._tokenizer_revision,
                trust_remote_code=self._trust_remote_code,
            )
        return self._tokenizer.decode(token_ids)

    def _write(self, shard_dir: Path, state: _WorkerRequest, fin: FinishedCapture) -> None:
        from vllm_activations.shard import staged_shard_path, write_shard

        new, spec = state.new, state.spec
        if state.error is not None:
            _write_error(shard_dir, new.capture_id, state.error)
            return
        expected = spec.expected_positions(len(new.prompt_token_ids), len(fin.output_token_ids))
        missing = state.store.missing(expected) if state.store is not None else expected
        if missing and spec.tensors:
            _write_error(
                shard_dir,
                new.capture_id,
                f"incomplete capture (finish_reason={fin.finish_reason}): "
                f"{len(missing)} of {len(expected)} positions missing, first {missing[:8]}",
            )
            return
        if spec.channel_stats and not state.channel_stats:
            _write_error(
                shard_dir,
                new.capture_id,
                "channel statistics were requested but none were recorded for this request",
            )
            return
        if spec.summary and state.summary is None:
            _write_error(shard_dir, new.capture_id, "a summary was requested but none was recorded")
            return
        if not spec.tensors:
            outputs: dict[str, np.ndarray] = {}
        elif state.store is not None:
            outputs = state.store.layer_outputs(expected)
        else:  # nothing to keep (e.g. `generated` of a request that generated one token)
            shape = (len(new.layers), 0, self._model_attrs["hidden_size"])
            outputs = {site: np.zeros(shape, _NUMPY_STORAGE[spec.dtype]) for site in spec.sites}
        extra = dict(state.channel_stats or {})
        extra_attrs: dict[str, dict[str, str]] = {}
        if state.summary is not None:
            from vllm_activations.shard import summary_datasets

            datasets, extra_attrs = summary_datasets(state.summary, spec.dtype)
            extra.update(datasets)
        attrs = dict(self._model_attrs)
        attrs.update(
            capture_id=new.capture_id,
            capture_spec=spec.to_dict(),
            sampling_params=new.sampling_params,
            finish_reason=fin.finish_reason or "",
            prompt=self._decode(new.prompt_token_ids),
            completion=self._decode(fin.output_token_ids),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        if state.summary is not None:
            from vllm_activations.summary import MASSIVE_RATIO, MASSIVE_THRESHOLD

            attrs["summary"] = {
                "special_ids": self.special_ids,
                "massive_threshold": MASSIVE_THRESHOLD,
                "massive_ratio": MASSIVE_RATIO,
                "has_embedding": True,
            }
        final = shard_path(shard_dir, new.capture_id)
        write_shard(
            # Teacher logprobs exist only in the API response: the sidecar adds them to the
            # staged (hidden) shard and renames it to `final` (shard.publish_with_teacher).
            staged_shard_path(final) if spec.teacher_logprobs else final,
            input_tokens=new.prompt_token_ids,
            output_tokens=fin.output_token_ids,
            positions=expected,
            layers=new.layers,
            layer_outputs=outputs,
            dtype=spec.dtype,
            attrs=attrs,
            extra=extra or None,
            extra_attrs=extra_attrs,
        )


def _write_error(shard_dir: Path, capture_id: str, message: str) -> None:
    path = error_path(shard_dir, capture_id)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"capture_id": capture_id, "error": message}))
    os.replace(tmp, path)


def _sanitize(request_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", request_id)[:128].lstrip("._-") or "capture"


def _sampling_attrs(params) -> dict[str, Any]:
    if params is None:
        return {}
    keys = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "min_tokens")
    return {k: getattr(params, k, None) for k in keys}


def _model_attrs(vllm_config) -> dict[str, Any]:
    import vllm

    from vllm_activations import __version__

    model_config = vllm_config.model_config
    hf = model_config.hf_config
    config = {
        key: getattr(hf, key, None)
        for key in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "tie_word_embeddings",
            "rms_norm_eps",
        )
    }
    original = getattr(hf, "architectures", None) or []
    return {
        "model": _served_name(model_config),
        "model_path": model_config.model,
        "model_revision": model_config.revision or "",
        "architectures": list(original),
        "model_config": config,
        "num_hidden_layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "model_dtype": str(model_config.dtype).replace("torch.", ""),
        "vllm_version": vllm.__version__,
        "engine": _engine_attrs(vllm_config),
        "package_version": __version__,
    }


def _engine_attrs(vllm_config) -> dict[str, Any]:
    """How the engine runs (the selftest checks the runner and graph mode it asked for)."""
    scheduler = vllm_config.scheduler_config
    mode = vllm_config.compilation_config.cudagraph_mode
    return {
        "model_runner": "v2" if vllm_config.use_v2_model_runner else "v1",
        "async_scheduling": bool(scheduler.async_scheduling),
        "cudagraph_mode": getattr(mode, "name", str(mode)),
        "enforce_eager": bool(vllm_config.model_config.enforce_eager),
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
    }


def _served_name(model_config) -> str:
    name = model_config.served_model_name or model_config.model
    return name[0] if isinstance(name, (list, tuple)) else str(name)
