"""The connector's per-step row ownership at a pod's batch shapes, before and after, in one run.

Every step with a capture request, the worker finds which batch rows are whose
(`vllm_activations.connector.worker.owned_rows`), and the scheduler ships what it needs. Until
2026-12-04 the scheduler shipped each capture request's whole block table every step, and the
worker looped over the requests, testing every row for each (`tests/test_ownership.py`'s
`reference`, the baseline here); now the scheduler ships only the blocks the step's positions
are written to (one per request on a decode step) and the worker does one vectorized pass.
Both are timed on the same steps, interleaved, and checked to agree; the time counted is the
scheduler's copy of the tables plus the worker's ownership (the device-to-host copy of the
recorded slots and positions, the same for both, is not).

Shapes (defaults: a Qwen3-32B pod, block size 16, contexts of `--context` tokens): a decode
step of `--requests` requests, and a mixed step of 8192 tokens (those decodes plus prefill
chunks filling the rest), every request capturing.

    python bench/bench_ownership.py [--requests 256] [--context 1500] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_ownership import reference  # noqa: E402

from vllm_activations.connector.worker import owned_rows  # noqa: E402

BLOCK = 16


def make_step(requests: int, context: int, tokens: int, seed: int):
    """Block tables (lists, as the scheduler holds them), scheduled ranges and the batch's
    recorded slots and positions: `requests` decodes, then prefill chunks up to `tokens`."""
    rng = np.random.default_rng(seed)
    blocks = iter(rng.permutation(requests * (context // BLOCK + 2) * 4).tolist())
    tables, scheduled, pos, slots = {}, {}, [], []

    def add(req_id: str, start: int, count: int) -> None:
        end = start + count
        tables[req_id] = [next(blocks) for _ in range((end + BLOCK - 1) // BLOCK)]
        scheduled[req_id] = (start, count)
        p = np.arange(start, end)
        pos.append(p)
        slots.append(np.asarray(tables[req_id])[p // BLOCK] * BLOCK + p % BLOCK)

    for i in range(requests):
        add(f"d{i}", int(rng.integers(context // 2, context)), 1)
    left, k = tokens - requests, 0
    while left > 0:
        chunk = min(left, 2048)
        add(f"p{k}", int(rng.integers(0, 2)) * 2048, chunk)
        left, k = left - chunk, k + 1
    order = rng.permutation(len(pos))  # vLLM's batch order is its own
    return (
        tables,
        scheduled,
        np.concatenate([slots[i] for i in order]),
        np.concatenate([pos[i] for i in order]),
    )


def before(step) -> dict:
    tables, scheduled, slots, pos = step
    shipped = {r: list(t) for r, t in tables.items()}  # the scheduler's per-step copy
    return reference(slots, pos, scheduled, shipped, BLOCK)


def after(step) -> dict:
    tables, scheduled, slots, pos = step
    shipped = {}
    for r, (start, count) in scheduled.items():  # CaptureScheduler._written_blocks
        shipped[r] = tables[r][start // BLOCK : (start + count - 1) // BLOCK + 1]
    return owned_rows(slots, pos, scheduled, shipped, BLOCK)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cases = {
        f"decode, {args.requests} requests": make_step(args.requests, args.context, 0, 0),
        f"mixed, 8192 tokens ({args.requests} decodes + prefill chunks)": make_step(
            args.requests, args.context, 8192, 1
        ),
    }
    print(f"numpy {np.__version__}, block size {BLOCK}, contexts up to {args.context} tokens")
    for name, step in cases.items():
        a, b = before(step), after(step)
        assert a.keys() == b.keys() and all(
            np.array_equal(a[r][0], b[r][0]) and np.array_equal(a[r][1], b[r][1]) for r in a
        ), "the two disagree"
        walls: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            for label, fn in (("before", before), ("after", after)):
                start = time.perf_counter()
                fn(step)
                walls[label].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in walls.items()}
        print(name)
        for label, w in walls.items():
            print(
                f"  {label:8s} {med[label] * 1e3:8.2f} ms ({min(w) * 1e3:.2f}-{max(w) * 1e3:.2f})"
            )
        print(f"  before / after: {med['before'] / med['after']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
