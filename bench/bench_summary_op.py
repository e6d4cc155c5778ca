"""Summary accumulation, its two paths side by side on the same inputs, in one run.

`SummaryState.accumulate` adds a step's tokens into their requests' slots, after the forward
(the connector's `wait_for_save`, outside CUDA graphs):
- `segments`: the GPU's path (forced here): each slot's rows summed first (`partials`), then
  one gather-add-scatter per accumulator (the CPU build's path until 2026-12-02, so the
  baseline of the ratio printed);
- `cpu`: the CPU build's path: in-place `index_add_` of only the rows that join the sums.
SmolLM2's shape (30 layers, 576 channels, 61 sites), 64 slots; a decode-like step (one token
for each of `--tokens` requests) and a prefill-like step (chunks of 64 tokens). Prints the
median and range of wall time per step over `--repeats`, interleaving the paths (each on its
own state, warmed up once). Run it with the glibc malloc tunables `serve` sets on the CPU
build (`vllm_activations.cli.GLIBC_MALLOC_ENV`; the script re-executes itself with them unless
`--malloc-as-is`), as the engine runs.

    python bench/bench_summary_op.py [--tokens 64] [--prefill 512] [--repeats 5] [--candidates 1.0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from vllm_activations import summary
from vllm_activations.cli import GLIBC_MALLOC_ENV

LAYERS, HIDDEN, SLOTS = 30, 576, 64


def make_state() -> summary.SummaryState:
    state = summary.SummaryState.allocate(
        SLOTS, LAYERS, HIDDEN, rows=4096, dtype=torch.bfloat16, vocab_size=49152,
        special_ids=[0, 1, 2], device="cpu",
    )  # fmt: skip
    for slot in range(SLOTS):
        state.start_slot(slot, "all", 0, 300)
    return state


def step(tokens: int, per_request: int, seed: int, candidates: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(tokens, 2 * LAYERS, HIDDEN, generator=g).to(torch.bfloat16)
    # a channel above the massive rule's threshold in a share `candidates` of the rows
    rows = torch.rand(tokens, 2 * LAYERS, generator=g) < candidates
    buffer[:, :, 7] *= torch.where(rows, 400.0, 1.0).to(torch.bfloat16)
    embedding = torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16)
    request = torch.arange(tokens) // per_request  # its slot
    pos = 300 + torch.arange(tokens) % per_request
    return buffer, embedding, pos, request


def timed(path: str, state: summary.SummaryState, inputs) -> float:
    buffer, embedding, pos, owner = inputs
    state.embedding[: len(pos)] = embedding
    original = summary._segments_path
    summary._segments_path = lambda device: path == "segments"
    try:
        start = time.perf_counter()
        state.accumulate(buffer, torch.arange(len(pos)), pos, owner)
        return time.perf_counter() - start
    finally:
        summary._segments_path = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="decode step: one per request")
    parser.add_argument("--prefill", type=int, default=512, help="prefill step tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--candidates", type=float, default=1.0,
        help="share of (token, site) rows with a channel above the massive rule's threshold "
        "(1.0: every row, the worst case; 0.43 in a captured SmolLM2 request)",
    )  # fmt: skip
    parser.add_argument("--malloc-as-is", action="store_true", help="keep this shell's malloc")
    args = parser.parse_args()
    tunables = {k: v for k, v in GLIBC_MALLOC_ENV.items() if os.environ.get(k) != v}
    if tunables and not args.malloc_as_is:  # glibc reads them at start-up: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **tunables})
    cases = {
        f"decode, {args.tokens} requests x 1 token": step(args.tokens, 1, 0, args.candidates),
        f"prefill, {args.prefill} tokens in chunks of 64": step(
            args.prefill, 64, 1, args.candidates
        ),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"massive-rule candidates in {args.candidates:.0%} of rows")  # fmt: skip
    for name, inputs in cases.items():
        walls: dict[str, list[float]] = {"segments": [], "cpu": []}
        # One state per path, touched once first: the timings leave out first-use page faults.
        states = {path: make_state() for path in walls}
        for path in walls:
            timed(path, states[path], inputs)
        for _ in range(args.repeats):
            for path in walls:
                walls[path].append(timed(path, states[path], inputs))
        med = {p: statistics.median(w) for p, w in walls.items()}
        print(name)
        for path, w in walls.items():
            print(f"  {path:18s} {med[path] * 1e3:8.1f} ms ({min(w) * 1e3:.1f}-{max(w) * 1e3:.1f})")
        print(f"  segments / cpu: {med['segments'] / med['cpu']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
