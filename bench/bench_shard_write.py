"""Shard write throughput against a raw sequential write of the same bytes to the same disk.

SmolLM2 shards as the connector hands them over (30 layers x 2 sites x T positions x 576, bf16
bits already), written by `write_shard` (temporary file, HDF5, fsync, rename, directory fsync)
and, in turn with it, the same number of bytes written raw to the same directory (open, write,
fsync), and raw plus the rename and directory fsync that make a shard atomic, which separates
the cost of HDF5 from the cost of atomicity. After warm-up writes, each is timed `--repeats`
times; the median gives MB/s and the ratio to raw. Below the target ratio, a cProfile of
`write_shard` says where the time goes. Prints a table, writes bench/results/shard_write.json.

    python bench/bench_shard_write.py [--tokens 440,2048] [--repeats 20] [--dir bench/work/...]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from workload import RESULTS, ROOT, write_results

from vllm_activations.contract.files import fsync_dir
from vllm_activations.contract.shard import float32_to_bf16_bits, write_shard

LAYERS, HIDDEN, PROMPT = 30, 576, 312
TARGET_RATIO = 0.7
WARMUP = 3


def activations(tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        site: float32_to_bf16_bits(rng.normal(size=(LAYERS, tokens, HIDDEN)).astype(np.float32))
        for site in ("post_attention", "post_mlp")
    }


def shard_write(directory: Path, outputs: dict[str, np.ndarray]) -> Path:
    tokens = next(iter(outputs.values())).shape[1]
    return write_shard(
        directory / "bench.h5",
        input_tokens=np.arange(PROMPT),
        output_tokens=np.arange(tokens + 1 - PROMPT),
        positions=np.arange(tokens),
        layers=np.arange(LAYERS),
        layer_outputs=outputs,
        dtype="bfloat16",
        attrs={"model": "SmolLM2-135M-Instruct", "hidden_size": HIDDEN},
    )


def raw_write(directory: Path, payload: list[memoryview], atomic: bool) -> Path:
    """Write `payload` sequentially and fsync; if `atomic`, under a temporary name renamed
    into place with a directory fsync, as write_shard does."""
    path = directory / "bench.bin"
    target = directory / ".bench.bin.partial" if atomic else path
    with open(target, "wb") as f:
        for chunk in payload:
            f.write(chunk)
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
        fsync_dir(directory)
    return path


def timed(write) -> tuple[float, int]:
    """Seconds and bytes of one write; the file is deleted afterwards, outside the timing."""
    start = time.perf_counter()
    path = write()
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    return seconds, size


def profile(directory: Path, outputs: dict[str, np.ndarray], top: int = 8) -> list[dict]:
    """The functions write_shard spends its own time in, over a few writes, most first."""
    profiler = cProfile.Profile()
    for _ in range(5):
        profiler.enable()
        path = shard_write(directory, outputs)
        profiler.disable()
        path.unlink()
    stats = pstats.Stats(profiler).stats
    total = sum(s[2] for s in stats.values())
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "calls": calls,
            "seconds": own,
            "share": own / total,
        }
        for (file, line, name), (_, calls, own, _, _) in rows
    ]


def measure(directory: Path, tokens: int, repeats: int) -> dict:
    outputs = activations(tokens)
    size = shard_write(directory, outputs).stat().st_size
    (directory / "bench.h5").unlink()
    # The same bytes as the shard file: its activations, then as many bytes again as the
    # HDF5 metadata takes.
    payload = [memoryview(a).cast("B") for a in outputs.values()]
    payload.append(memoryview(bytes(size - sum(len(p) for p in payload))))
    writers = {
        "write_shard": lambda: shard_write(directory, outputs),
        "raw": lambda: raw_write(directory, payload, atomic=False),
        "raw + rename + dir fsync": lambda: raw_write(directory, payload, atomic=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in writers}
    names = list(writers)
    for i in range(WARMUP + repeats):
        # Rotate the order so no writer always follows the same one.
        for name in names[i % 3 :] + names[: i % 3]:
            s, written = timed(writers[name])
            assert written == size, (name, written, size)
            if i >= WARMUP:
                seconds[name].append(s)
    result = {"tokens": tokens, "bytes": size, "writers": {}}
    raw = statistics.median(seconds["raw"])
    for name, runs in seconds.items():
        median = statistics.median(runs)
        result["writers"][name] = {
            "median_s": median,
            "mb_per_s": size / median / 1e6,
            "best_mb_per_s": size / min(runs) / 1e6,
            "ratio_to_raw": raw / median,
            "runs_s": [round(r, 5) for r in runs],
        }
    if result["writers"]["write_shard"]["ratio_to_raw"] < TARGET_RATIO:
        result["profile"] = profile(directory, outputs)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="440,2048", help="positions per shard, comma list")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", default=str(ROOT / "bench" / "work" / "shard_write"))
    parser.add_argument("--out", default=str(RESULTS / "shard_write.json"))
    args = parser.parse_args()
    directory = Path(args.dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)

    results = [measure(directory, int(t), args.repeats) for t in args.tokens.split(",")]
    print(
        f"\nShard writes versus raw writes of the same bytes, {directory}, "
        f"median of {args.repeats} (target: write_shard >= {TARGET_RATIO:.0%} of raw)"
    )
    print(f"{'shard':>22s} {'writer':26s} {'median ms':>10s} {'MB/s':>8s} {'vs raw':>7s}")
    for r in results:
        label = f"{LAYERS}x2x{r['tokens']}x{HIDDEN} {r['bytes'] / 1e6:.0f} MB"
        for name, w in r["writers"].items():
            print(
                f"{label:>22s} {name:26s} {w['median_s'] * 1e3:10.1f} {w['mb_per_s']:8.0f} "
                f"{w['ratio_to_raw']:6.2f}x"
            )
            label = ""
        for row in r.get("profile", []):
            print(f"{'':>22s}   {row['share']:6.1%} {row['function']} ({row['calls']} calls)")
    write_results(
        Path(args.out),
        {
            "directory": os.path.relpath(directory, ROOT),
            "repeats": args.repeats,
            "target_ratio": TARGET_RATIO,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
