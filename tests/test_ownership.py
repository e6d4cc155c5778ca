"""Row ownership (`owned_rows`), one vectorized pass, against the per-request reference it
replaced, on random batches: chunked prefills and decodes in any order, requests sharing
prefix blocks, padding, stale padded rows (an earlier position and KV slot of a request),
rows whose slot is another position's and rows of requests that do not capture. The
reference reads each request's whole block table; `owned_rows` gets only the blocks the
scheduler ships (those this step's positions are written to), as
`CaptureScheduler._written_blocks` cuts them."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_activations.connector.worker import owned_rows

BLOCK = 16


def reference(slots, positions, scheduled, tables, block_size):
    """The per-request loop of the worker before 2026-12-04, with whole block tables."""
    rows = np.flatnonzero(slots >= 0)
    row_slot, row_pos = slots[rows], positions[rows]
    row_block, row_offset = row_slot // block_size, row_slot % block_size
    owned = {}
    for req_id, (start, count) in scheduled.items():
        table = np.asarray(tables.get(req_id, ()), dtype=np.int64)
        inside = np.flatnonzero((row_pos >= start) & (row_pos < start + count))
        index = row_pos[inside] // block_size
        inside, index = inside[index < len(table)], index[index < len(table)]
        mine = inside[
            (table[index] == row_block[inside])
            & (row_offset[inside] == row_pos[inside] % block_size)
        ]
        if len(mine):
            order = np.argsort(row_pos[mine], kind="stable")
            owned[req_id] = (row_pos[mine[order]], rows[mine[order]])
    return owned


def shipped(scheduled, tables, block_size):
    out = {}
    for req_id, (start, count) in scheduled.items():
        first, last = start // block_size, (start + count - 1) // block_size
        out[req_id] = tables[req_id][first : last + 1] if count > 0 else []
    return out


def random_step(rng: np.random.Generator):
    """A step's batch: per request its table, scheduled range and rows, then the extras."""
    n = int(rng.integers(1, 40))
    free = list(rng.permutation(4000))
    tables, scheduled, batch = {}, {}, []
    shared = [int(free.pop()) for _ in range(4)]  # a cached prefix some requests hit
    for i in range(n):
        req_id = f"r{i}"
        length = int(rng.integers(1, 300))
        prefix = shared[: int(rng.integers(0, 5))] if rng.random() < 0.3 else []
        own = (length + BLOCK - 1) // BLOCK + 1
        tables[req_id] = prefix + [int(free.pop()) for _ in range(own)]
        floor = len(prefix) * BLOCK
        if rng.random() < 0.5:  # a decode
            start, count = floor + length - 1, 1
        else:  # a prefill chunk
            start = floor + int(rng.integers(0, length))
            count = int(rng.integers(1, floor + length - start + 1))
        scheduled[req_id] = (start, count)
        for pos in range(start, start + count):
            batch.append((pos, tables[req_id][pos // BLOCK] * BLOCK + pos % BLOCK))
        if start > 0 and rng.random() < 0.2:  # a stale padded row: earlier position and slot
            pos = int(rng.integers(0, start))
            batch.append((pos, tables[req_id][pos // BLOCK] * BLOCK + pos % BLOCK))
        if count > BLOCK and rng.random() < 0.5:  # a position in range, another block's slot
            pos = start + int(rng.integers(0, count))
            other = tables[req_id][(pos // BLOCK + 1) % len(tables[req_id])]
            batch.append((pos, other * BLOCK + pos % BLOCK))
    for _ in range(int(rng.integers(0, 20))):  # a request that does not capture
        block = int(free.pop())
        pos = int(rng.integers(0, 500))
        batch.append((pos, block * BLOCK + pos % BLOCK))
    order = rng.permutation(len(batch))
    positions = np.array([batch[k][0] for k in order], dtype=np.int64)
    slots = np.array([batch[k][1] for k in order], dtype=np.int64)
    pad = int(rng.integers(0, 9))  # padding: slot -1 (V1), arbitrary position
    positions = np.concatenate([positions, rng.integers(0, 300, pad)])
    slots = np.concatenate([slots, np.full(pad, -1)])
    if rng.random() < 0.3:  # a scheduled request with no rows this step (not in the batch)
        scheduled["idle"], tables["idle"] = (0, 5), [int(free.pop())]
    return slots, positions, scheduled, tables


@pytest.mark.parametrize("seed", range(40))
def test_owned_rows_match_the_per_request_reference(seed):
    rng = np.random.default_rng(seed)
    slots, positions, scheduled, tables = random_step(rng)
    expected = reference(slots, positions, scheduled, tables, BLOCK)
    got = owned_rows(slots, positions, scheduled, shipped(scheduled, tables, BLOCK), BLOCK)
    assert got.keys() == expected.keys()
    assert expected  # the batch has capture rows
    for req_id, (pos, rows) in expected.items():
        np.testing.assert_array_equal(got[req_id][0], pos)
        np.testing.assert_array_equal(got[req_id][1], rows)
        start, count = scheduled[req_id]
        assert ((pos >= start) & (pos < start + count)).all()


def test_a_block_shipped_for_two_requests_is_checked_for_each():
    """Never in a real step (a step writes a block for one request), but looked up for both:
    the rows go where their positions and table indices say."""
    scheduled = {"a": (0, 2), "b": (16, 2)}
    blocks = {"a": [7], "b": [7]}  # b's table index 1 is block 7 as well
    positions = np.array([0, 1, 16, 17, 5])
    slots = np.array([7 * BLOCK, 7 * BLOCK + 1, 7 * BLOCK, 7 * BLOCK + 1, -1])
    got = owned_rows(slots, positions, scheduled, blocks, BLOCK)
    assert {r: (p.tolist(), rows.tolist()) for r, (p, rows) in got.items()} == {
        "a": ([0, 1], [0, 1]),
        "b": ([16, 17], [2, 3]),
    }


def test_no_scheduled_request_or_no_rows_owns_nothing():
    slots, positions = np.array([-1, -1]), np.array([0, 1])
    assert owned_rows(slots, positions, {"a": (0, 2)}, {"a": [3]}, BLOCK) == {}
    assert owned_rows(np.array([48]), np.array([0]), {}, {}, BLOCK) == {}
