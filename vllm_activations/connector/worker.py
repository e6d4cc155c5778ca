"""Worker side (every TP rank; rank 0 writes): points device slots at requests before each
forward, attributes the capture buffer's rows to requests after it, and copies out only the
rows and columns they keep."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from vllm_activations.connector.protocol import CaptureStepMetadata, FinishedCapture
from vllm_activations.connector.row_store import RowStore, to_host
from vllm_activations.connector.writer import ShardWriterThread, WorkerRequest, model_attrs
from vllm_activations.contract.spec import SITES, CaptureSpec


@dataclass
class _SummarySlot:
    """A running request's summary slot (on the writing rank)."""

    slot: int
    sites: list[int]
    boundaries: list[int]
    num_prompt: int


@dataclass
class _LastSlot:
    """A `positions: "last"` request's device rows: entries 2 * slot + parity of
    `CaptureState.last_rows`, holding the positions in `positions` (-1: none yet)."""

    slot: int
    positions: np.ndarray = field(default_factory=lambda: np.full(2, -1, dtype=np.int64))


@dataclass
class _StatSlot:
    """A running request's statistics slot, on every TP rank."""

    slot: int
    layers: list[int]
    num_prompt: int
    # One past the last position forwarded so far (from the scheduled token ranges).
    forwarded_end: int = 0


class CaptureWorker:
    """The connector's worker role: one per worker process."""

    def __init__(
        self, vllm_config, kv_cache_config, shard_dir: Path, block_size: int, num_layers: int
    ) -> None:
        from vllm_activations.capture import capture_state, writes_shards

        self.shard_dir = shard_dir
        self.block_size = block_size
        self.num_layers = num_layers
        self.is_writer = writes_shards()
        self._active: dict[str, WorkerRequest] = {}
        self._writer = ShardWriterThread(vllm_config, model_attrs(vllm_config))
        self._capture = capture_state()
        self._stats = self._capture.channel_stats
        self._stat_slots: dict[str, _StatSlot] = {}
        self._summary = self._capture.summary
        self._summary_slots: dict[str, _SummarySlot] = {}
        self._last_slots: dict[str, _LastSlot] = {}
        # Unpadded batch size of this step, when the runner says (Model Runner V2).
        self._num_tokens: int | None = None
        if self._stats is not None:
            self._stats.bind_blocks(kv_cache_config.num_blocks, self.block_size)
        if self._summary is not None:
            self._summary.bound = True
            self._writer.special_ids = list(self._summary.special_ids)

    def bind(self, connector_metadata: CaptureStepMetadata | None) -> None:
        """Before the forward: whether this step captures at all, and the statistics slots."""
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
        summary.active = any(r in self._summary_slots for r in meta.block_tables)

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

    def start_load_kv(self, num_tokens: int | None) -> None:
        """Model Runner V2 passes the unpadded batch size: rows past it are padding."""
        self._num_tokens = int(num_tokens) if num_tokens is not None else None

    def wait_for_save(self, meta: CaptureStepMetadata) -> None:
        """After the forward (inside a forward context on V1, outside on V2): add this step's
        summary rows, copy its capture rows out, then hand finished requests to the writer."""
        ring = self._capture.last_rows
        for req_id, new in meta.new.items():
            self._active[req_id] = WorkerRequest(new=new, spec=CaptureSpec.from_dict(new.spec))
            if ring is not None and new.last_slot is not None and 2 * new.last_slot < len(ring):
                self._last_slots[req_id] = _LastSlot(new.last_slot)
        for req_id, fin in meta.finished.items():  # before this step's rows reuse the slots
            self._read_last_row(req_id, fin)
        if any(count > 0 and r in self._active for r, (_, count) in meta.scheduled.items()):
            owned = self._owned_rows(meta)
            self._accumulate_summaries(owned)
            self._keep_last_rows(owned)
            self._collect_rows(owned)
        for req_id, fin in meta.finished.items():
            state = self._active.pop(req_id, None)
            if state is not None:
                self._writer.submit(self.shard_dir, state, fin)

    def _owned_rows(self, meta: CaptureStepMetadata) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(positions, buffer rows) of each capture request's rows this step (`owned_rows`),
        from the positions and KV slots the forward recorded (an idle step's `wait_for_save`
        follows no forward and schedules nothing). Raw rows and summary rows are both these."""
        capture = self._capture
        slots = capture.row_slots.cpu().numpy()
        positions = capture.row_positions.cpu().numpy()
        if self._num_tokens is not None:
            slots, positions = slots[: self._num_tokens], positions[: self._num_tokens]
        scheduled = {
            r: span for r, span in meta.scheduled.items() if span[1] > 0 and r in self._active
        }
        return owned_rows(slots, positions, scheduled, meta.block_tables, self.block_size)

    def _accumulate_summaries(self, owned: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """The summary arithmetic, after the forward and outside any CUDA graph: eager, on the
        summary requests' own rows only (each request's rows together, as the GPU path's
        per-slot partial sums want)."""
        picks = [
            (self._summary_slots[r].slot, *owned[r]) for r in owned if r in self._summary_slots
        ]
        if not picks:
            return
        device = self._capture.buffer.device
        pos = torch.as_tensor(np.concatenate([p for _, p, _ in picks]), device=device)
        rows = torch.as_tensor(np.concatenate([r for _, _, r in picks]), device=device)
        owner = torch.as_tensor(
            np.concatenate([np.full(len(p), slot, dtype=np.int64) for slot, p, _ in picks]),
            device=device,
        )
        self._summary.accumulate(self._capture.buffer, rows, pos, owner)

    def _keep_last_rows(self, owned: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Last-token requests with device rows: their two newest rows of this step into
        their entries (2 * slot + position % 2), one device copy for all; nothing leaves the
        device until the request ends."""
        targets, sources = [], []
        for req_id, entry in self._last_slots.items():
            if req_id not in owned:
                continue
            pos, rows = owned[req_id]
            pos, rows = pos[-2:], rows[-2:]
            entry.positions[pos % 2] = pos
            targets.append(2 * entry.slot + pos % 2)
            sources.append(rows)
        if not targets:
            return
        ring, buffer = self._capture.last_rows, self._capture.buffer
        target = torch.as_tensor(np.concatenate(targets), device=ring.device)
        source = torch.as_tensor(np.concatenate(sources), device=buffer.device)
        ring.index_copy_(0, target, buffer.index_select(0, source))

    def _read_last_row(self, req_id: str, fin: FinishedCapture) -> None:
        """A finished last-token request's row, from its device entry to its row store (the
        writer reports it missing if the entry does not hold the request's last position)."""
        entry = self._last_slots.pop(req_id, None)
        state = self._active.get(req_id)
        if entry is None or state is None:
            return
        (last,) = state.spec.expected_positions(
            len(state.new.prompt_token_ids), len(fin.output_token_ids)
        )
        if entry.positions[last % 2] != last:
            return
        store = self._row_store(state)
        columns = store.columns()
        ring = self._capture.last_rows
        row = ring[2 * entry.slot + last % 2].index_select(
            0, torch.as_tensor(columns, device=ring.device)
        )
        column_of = _column_index(columns, ring.shape[1])
        store.add(np.array([last]), to_host(row[None], state.spec.dtype), column_of)

    def _row_store(self, state: WorkerRequest) -> RowStore:
        if state.store is None:
            state.store = RowStore(
                state.spec,
                state.new.layers,
                self.num_layers,
                self._capture.buffer.shape[2],
                len(state.new.prompt_token_ids),
                state.new.sampling_params.get("max_tokens"),
            )
        return state.store

    def _row_owners(
        self, owned: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[WorkerRequest, np.ndarray, np.ndarray]]:
        """(request, positions, buffer rows) of every tensor capture's kept rows this step,
        positions ascending: its keep rule applied to its owned rows."""
        selected = []
        for req_id, (pos, rows) in owned.items():
            state = self._active[req_id]
            if not state.spec.tensors or req_id in self._last_slots:
                continue
            if state.spec.positions == "last":  # the end is not known yet: the two newest
                pos, rows = pos[-2:], rows[-2:]
            else:
                keep = state.spec.keeps_position(pos, len(state.new.prompt_token_ids))
                pos, rows = pos[keep], rows[keep]
            if len(rows):
                selected.append((state, pos, rows))
        return selected

    def _collect_rows(self, owned: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        selected = self._row_owners(owned)
        if not selected:
            return
        buffer = self._capture.buffer
        for state, _, _ in selected:
            self._row_store(state)
        # Only the columns (layer x site) some selected request keeps leave the device.
        columns = np.unique(np.concatenate([s.store.columns() for s, _, _ in selected]))
        column_of = _column_index(columns, buffer.shape[1])
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
                    host[dtype] = to_host(staged, dtype)
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

    def shutdown(self) -> None:
        self._writer.close()


def _column_index(columns: np.ndarray, width: int) -> np.ndarray:
    """Per capture-buffer column (2 * layer + site, `width` of them) its index among the
    gathered `columns`, -1 where not gathered (RowStore.add's `column_of`)."""
    column_of = np.full(width, -1, dtype=np.int64)
    column_of[columns] = np.arange(len(columns))
    return column_of


def owned_rows(
    slots: np.ndarray,
    positions: np.ndarray,
    scheduled: dict[str, tuple[int, int]],
    blocks: dict[str, list[int]],
    block_size: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(positions ascending, buffer rows) of each request's rows in a step's batch, whose rows
    have KV slot `slots` [N] (negative: padding) and position `positions` [N]. A row is a
    request's when the position is among those it computes this step (`scheduled[r]` = first
    position, count) and its KV slot is that position's own: block `blocks[r][position //
    block_size - start // block_size]` (the blocks shipped for the range), offset `position %
    block_size`. Rows of a padded batch that repeat an earlier row's position and slot
    (stale), padding and other requests' rows join none.

    One pass over the rows, no loop over requests: the shipped blocks are sorted once, each
    row's block is looked up in them (a block in two requests' lists, which a step never
    writes for both, is looked up for each), and the matches are checked and grouped."""
    if not scheduled:
        return {}
    rows = np.flatnonzero(slots >= 0)
    if not len(rows):
        return {}
    reqs = list(scheduled)
    spans = np.array([scheduled[r] for r in reqs], dtype=np.int64).reshape(-1, 2)
    lists = [blocks.get(r, ()) for r in reqs]
    sizes = np.fromiter(map(len, lists), dtype=np.int64, count=len(reqs))
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(sizes.sum()))
    owner = np.repeat(np.arange(len(reqs)), sizes)  # the request of each shipped block
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    # the block-table index each shipped block stands at
    index = np.arange(len(flat)) - first + np.repeat(spans[:, 0] // block_size, sizes)
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    row_slot, row_pos = slots[rows].astype(np.int64), positions[rows].astype(np.int64)
    row_block = row_slot // block_size
    lo = np.searchsorted(ordered, row_block, side="left")
    hits = np.searchsorted(ordered, row_block, side="right") - lo  # usually 0 or 1
    candidate = np.repeat(np.arange(len(rows)), hits)  # (row, shipped block) pairs
    at = order[np.repeat(lo - (np.cumsum(hits) - hits), hits) + np.arange(len(candidate))]
    pos, req = row_pos[candidate], owner[at]
    start, count = spans[req, 0], spans[req, 1]
    mine = (
        (pos >= start)
        & (pos < start + count)
        & (index[at] == pos // block_size)
        & (row_slot[candidate] % block_size == pos % block_size)
    )
    candidate, pos, req = candidate[mine], pos[mine], req[mine]
    grouped = np.lexsort((pos, req))  # by request, then position; ties keep row order
    candidate, pos, req = candidate[grouped], pos[grouped], req[grouped]
    cuts = np.flatnonzero(np.diff(req)) + 1
    return {
        reqs[int(r[0])]: (p, rows[c])
        for r, p, c in zip(
            np.split(req, cuts), np.split(pos, cuts), np.split(candidate, cuts), strict=True
        )
        if len(r)
    }


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
