"""Analyzer throughput (MB of shards per second) and peak memory at 10, 100 and 1000 shards.

Synthetic bf16 shards with a small hidden size are written once; each size is analyzed in a
fresh subprocess so its peak RSS (ru_maxrss) and peak traced heap (tracemalloc, a second run)
belong to that size alone. Peak memory must stay flat as the shard count grows, because the
analyzer streams shard by shard and token block by token block. Prints a table and writes
bench/results/analyzer.json.

    python bench/bench_analyzer.py [--sizes 10,100,1000] [--hidden 256] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

from vllm_activations.shard import write_shard  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "analyzer.json"


def write_shards(directory: Path, count: int, layers: int, hidden: int, tokens: int) -> None:
    """`count` random-walk residual shards (bf16), with a massive channel at position 0."""
    rng = np.random.default_rng(0)
    for i in range(count):
        x = rng.normal(size=(tokens, hidden)).astype(np.float32)
        attn = np.empty((layers, tokens, hidden), np.float32)
        mlp = np.empty_like(attn)
        for layer in range(layers):
            x = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
            if layer == 1:
                x[0, 3] += 2000.0
            attn[layer] = x
            x = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
            mlp[layer] = x
        prompt = rng.integers(0, 1000, size=tokens)
        write_shard(
            directory / f"req-{i:05d}.h5",
            input_tokens=prompt,
            output_tokens=[1],
            positions=np.arange(tokens),
            layers=np.arange(layers),
            layer_outputs={"post_attention": attn, "post_mlp": mlp},
            dtype="bfloat16",
            attrs={"model": "synthetic", "num_hidden_layers": layers, "hidden_size": hidden},
        )


def child(shards: Path, out: Path, trace: bool) -> None:
    """Analyze `shards` in this process and print one JSON line of measurements."""
    import tracemalloc

    from actclient.analysis.analyze import analyze

    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    analysis = analyze(shards, out, pictures=False, progress=False)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bytes": analysis["bytes_read"],
                "tokens": analysis["tokens"]["all"],
                "rss_mb": rss_kb / 1024,
                "traced_peak_mb": peak / 2**20 if peak is not None else None,
            }
        )
    )


def run_child(shards: Path, out: Path, trace: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(shards), "--child-out", str(out)]
    if trace:
        cmd.append("--trace")
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_out, args.trace)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-analyzer-") as tmp:
        pool = Path(tmp) / "pool"
        pool.mkdir()
        t0 = time.perf_counter()
        write_shards(pool, max(sizes), args.layers, args.hidden, args.tokens)
        print(f"wrote {max(sizes)} shards in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        all_paths = sorted(pool.glob("*.h5"))
        for size in sizes:
            subset = Path(tmp) / f"n{size}"
            subset.mkdir()
            for path in all_paths[:size]:
                os.symlink(path, subset / path.name)
            timed = run_child(subset, Path(tmp) / f"out{size}", trace=False)
            traced = run_child(subset, Path(tmp) / f"trace{size}", trace=True)
            rows.append(
                {
                    "shards": size,
                    "mb": timed["bytes"] / 1e6,
                    "tokens": timed["tokens"],
                    "seconds": timed["seconds"],
                    "mb_per_s": timed["bytes"] / 1e6 / timed["seconds"],
                    "shards_per_s": size / timed["seconds"],
                    "peak_rss_mb": timed["rss_mb"],
                    "peak_traced_mb": traced["traced_peak_mb"],
                }
            )
            print(f"{size} shards done", file=sys.stderr)
    header = (
        f"{'shards':>7} {'MB':>8} {'tokens':>8} {'s':>7} {'MB/s':>7} {'shards/s':>9} "
        f"{'peak RSS MB':>12} {'peak heap MB':>13}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['shards']:>7} {r['mb']:>8.1f} {r['tokens']:>8} {r['seconds']:>7.2f} "
            f"{r['mb_per_s']:>7.2f} {r['shards_per_s']:>9.1f} {r['peak_rss_mb']:>12.1f} "
            f"{r['peak_traced_mb']:>13.1f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "config": {
                    "layers": args.layers,
                    "hidden": args.hidden,
                    "tokens_per_shard": args.tokens,
                    "dtype": "bfloat16",
                    "sites": 2 * args.layers + 0,
                },
                "machine": {
                    "python": platform.python_version(),
                    "cpu_count": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
