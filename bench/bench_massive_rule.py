"""Summary capture's massive-activation rule: a median for every candidate row, against the
counting shortcut `summary._massive_bounds` uses outside CUDA graphs, on the same inputs.

A 64-token decode step of SmolLM2's shape (61 sites x 576 channels), with a channel scaled
by 400 so every (token, site) row is a candidate (the worst case for the rule), and one
without any candidate. CPU time, one thread, minimum and median over `--repeats`, the two
interleaved; checks both give the same flags.

    python bench/bench_massive_rule.py [--tokens 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_activations import summary  # noqa: E402

SITES, HIDDEN = 61, 576


def median_rule(mag: torch.Tensor) -> torch.Tensor:
    """The rule as written: the median of every row whose max exceeds the threshold."""
    median = torch.zeros(mag.shape[:2], dtype=mag.dtype)
    rows = torch.nonzero(mag.amax(2) > summary.MASSIVE_THRESHOLD, as_tuple=True)
    if rows[0].numel():
        median[rows] = summary._median(mag[rows])  # noqa: SLF001
    return torch.clamp(summary.MASSIVE_RATIO * median, min=summary.MASSIVE_THRESHOLD)


def cpu_ms(fn, mag: torch.Tensor) -> float:
    start = time.process_time()
    fn(mag)
    return (time.process_time() - start) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, SITES, HIDDEN, generator=g)
    massive = x.clone()
    massive[:, :, 7] *= 400.0
    for name, inputs in (("a candidate in every row", massive), ("no candidate", x)):
        mag = inputs.abs()
        same = torch.equal(mag > median_rule(mag)[:, :, None],
                           mag > summary._massive_bounds(mag)[:, :, None])  # fmt: skip  # noqa: SLF001
        times: dict[str, list[float]] = {"median per row": [], "counting": []}
        for _ in range(args.repeats):
            times["median per row"].append(cpu_ms(median_rule, mag))
            times["counting"].append(cpu_ms(summary._massive_bounds, mag))  # noqa: SLF001
        print(f"{name}, {args.tokens} tokens x {SITES} sites x {HIDDEN}: flags equal {same}")
        for label, values in times.items():
            mid = statistics.median(values)
            print(f"  {label:15s} min {min(values):6.1f} ms  median {mid:6.1f} ms")
        ratio = statistics.median(times["median per row"]) / statistics.median(times["counting"])
        print(f"  median per row / counting: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
