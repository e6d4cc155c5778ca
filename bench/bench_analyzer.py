"""Analyzer throughput beside a float32 batched-Gram reference, CPU use, peak memory, precision.

Synthetic bf16 random-walk shards of the Qwen3-32B shape (64 layers x 2 sites, hidden 5120;
a massive channel from layer 2 on at position 0) are written once. Then, each in a fresh
subprocess:
- the analyzer (`analyze`, `--jobs` worker processes) on the first N and on all shards, so
  its peak RSS can be seen to stay flat as the shard count grows;
- the reference: the work no analyzer can avoid, one float32 Gram per token over the same
  shards (read, bfloat16 to float32, normalise, batched matmul), in one process with every
  BLAS thread;
- precision: today's analyzer and the float64 implementation it replaced (`--baseline`, read
  from git) on the first shard, max differences of every accumulated quantity.
CPU time over wall time counts the analyzer's worker processes. Prints a table and writes
bench/results/analyzer.json.

    python bench/bench_analyzer.py [--shards 8] [--small 2] [--tokens 128] [--jobs N]
"""

from __future__ import annotations

import argparse
import importlib.util
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

from vllm_activations.contract.shard import write_shard  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "analyzer.json"
BASELINE = "c3f2d87"  # the last commit with the float64, one-process analyzer


def write_shards(directory: Path, count: int, layers: int, hidden: int, tokens: int) -> None:
    """`count` random-walk residual shards (bf16), with a massive channel at position 0."""
    rng = np.random.default_rng(0)
    for i in range(count):
        x = rng.normal(size=(tokens, hidden)).astype(np.float32)
        attn = np.empty((layers, tokens, hidden), np.float32)
        mlp = np.empty_like(attn)
        for layer in range(layers):
            x += 0.3 * rng.standard_normal(size=x.shape, dtype=np.float32)
            if layer == 1:
                x[0, 3] += 2000.0
            attn[layer] = x
            x += 0.3 * rng.standard_normal(size=x.shape, dtype=np.float32)
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


def _usage() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "rss_mb": me.ru_maxrss / 1024,
        "worker_rss_mb": kids.ru_maxrss / 1024,
    }


def child_analyze(shards: Path, out: Path, jobs: int) -> dict:
    from actclient.analysis.analyze import analyze

    start = time.perf_counter()
    analysis = analyze(shards, out, pictures=False, progress=False, jobs=jobs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": analysis["bytes_read"], **_usage()}


def child_reference(shards: Path, block_bytes: int) -> dict:
    """read, bf16 -> float32, normalise, one batched float32 Gram per token; nothing else."""
    from actclient.analysis.stats import AnalysisAccumulator

    start = time.perf_counter()
    total, checksum = 0, 0.0
    for path in sorted(shards.glob("*.h5")):
        acc = AnalysisAccumulator(block_bytes=block_bytes)
        from vllm_activations.contract.shard import ShardReader

        with ShardReader(path) as reader:
            acc._init_layout(reader)  # noqa: SLF001 - the analyzer's own reader
            n = len(reader.positions)
            per_token = len(acc.layout.labels) * acc.hidden_size * 4 * 6
            step = max(1, block_bytes // per_token)
            for begin in range(0, n, step):
                stop = min(begin + step, n)
                x = acc._read_block(reader, begin, stop, reader.positions[begin:stop])  # noqa: SLF001
                norms = np.sqrt(np.vecdot(x, x))
                x /= np.where(norms > 0, norms, 1.0)[..., None]
                checksum += float(np.matmul(x, x.transpose(0, 2, 1)).sum())
        total += path.stat().st_size
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": total, "checksum": checksum, **_usage()}


def _load_baseline(rev: str):  # noqa: ANN202 - a module
    repo, _, commit = rev.rpartition("@") if "@" in rev else (str(ROOT), "", rev)
    source = subprocess.run(
        ["git", "-C", repo, "show", f"{commit}:client/actclient/analysis/stats.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # the shard module has moved since (issue 19); the baseline reads shards the same way
    source = source.replace("from vllm_activations.shard ", "from vllm_activations.contract.shard ")
    path = Path(tempfile.mkdtemp(prefix="baseline-")) / "stats_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("stats_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _quantities(acc) -> dict[str, np.ndarray]:  # noqa: ANN001 - either implementation
    out = {}
    for name, stats in acc.populations.items():
        summary = stats.site_summary()
        n = max(stats.count, 1)
        out.update(
            {
                f"{name}/similarity": stats.similarity(),
                f"{name}/similarity_std": stats.similarity_std(),
                f"{name}/angle": stats.mean_angle(),
                f"{name}/mean_norm": summary["mean_norm"],
                f"{name}/kurtosis": summary["kurtosis"],
                f"{name}/hoyer": summary["hoyer_sparsity"],
                f"{name}/update_ratio": stats.update_ratio_sum / n,
                f"{name}/channel_mean": stats.channel_mean,
                f"{name}/channel_variance": stats.channel_variance(),
                f"{name}/absmax": stats.absmax,
                f"{name}/massive_count": stats.massive_count.astype(np.float64),
            }
        )
    return out


def child_precision(shard: Path, rev: str) -> dict:
    """Max differences between this analyzer and the baseline's float64 path on one shard."""
    from actclient.analysis.stats import AnalysisAccumulator

    baseline = _load_baseline(rev)
    start = time.perf_counter()
    old = baseline.AnalysisAccumulator()
    old.add_shard(shard)
    old_seconds = time.perf_counter() - start
    new = AnalysisAccumulator()
    new.add_shard(shard)
    ref, got = _quantities(old), _quantities(new)
    rows = {}
    for key, want in ref.items():
        have = got[key]
        diff = np.abs(have - want)
        scale = np.abs(want)
        big = scale >= 1e-3 * max(float(scale.max()), 1e-300)  # relative where not ~0
        rows[key] = {
            "max_abs": float(diff.max()),
            "max_rel": float((diff[big] / scale[big]).max()) if big.any() else 0.0,
        }
    exact = (
        np.array_equal(
            old.populations["all"].absmax_position, new.populations["all"].absmax_position
        )
        and old.populations["all"].massive_positions == new.populations["all"].massive_positions
    )
    return {
        "shard_mb": shard.stat().st_size / 1e6,
        "baseline_seconds": old_seconds,
        "baseline_mb_per_s": shard.stat().st_size / 1e6 / old_seconds,
        "positions_and_massive_equal": bool(exact),
        "differences": rows,
    }


def run_child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _subset(pool: list[Path], count: int, where: Path) -> Path:
    where.mkdir()
    for path in pool[:count]:
        os.symlink(path, where / path.name)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8, help="shards in the full run")
    parser.add_argument("--small", type=int, default=2, help="shards in the flat-memory check")
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per shard")
    parser.add_argument("--jobs", type=int, default=None, help="analyzer processes (all cores)")
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help="git revision of the old analyzer ([REPO@]REV; default REPO: this checkout)",
    )
    parser.add_argument("--no-precision", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "write":
            write_shards(Path(rest[0]), *(int(v) for v in rest[1:]))
            result = {}
        elif kind == "analyze":
            result = child_analyze(Path(rest[0]), Path(rest[1]), int(rest[2]))
        elif kind == "reference":
            result = child_reference(Path(rest[0]), int(rest[1]))
        else:
            result = child_precision(Path(rest[0]), rest[1])
        print(json.dumps(result))
        return
    from actclient.analysis.analyze import default_jobs
    from actclient.analysis.stats import DEFAULT_BLOCK_BYTES

    jobs = args.jobs or default_jobs()
    with tempfile.TemporaryDirectory(prefix="bench-analyzer-") as tmp:
        pool_dir = Path(tmp) / "pool"
        pool_dir.mkdir()
        t0 = time.perf_counter()
        # in a child, so this process stays small: children inherit a parent's peak RSS
        shape = (args.shards, args.layers, args.hidden, args.tokens)
        run_child("write", str(pool_dir), *(str(v) for v in shape))
        print(f"wrote {args.shards} shards in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        load_before = os.getloadavg()
        pool = sorted(pool_dir.glob("*.h5"))
        small = _subset(pool, args.small, Path(tmp) / "small")
        full = _subset(pool, args.shards, Path(tmp) / "full")
        runs = {
            "analyzer_small": run_child("analyze", str(small), f"{tmp}/out-small", str(jobs)),
            "analyzer": run_child("analyze", str(full), f"{tmp}/out-full", str(jobs)),
            "reference": run_child("reference", str(full), str(DEFAULT_BLOCK_BYTES)),
        }
        load_after = os.getloadavg()
        precision = (
            None if args.no_precision else run_child("precision", str(pool[0]), args.baseline)
        )
    for r in runs.values():
        r["mb"] = r["bytes"] / 1e6
        r["mb_per_s"] = r["mb"] / r["seconds"]
        r["cpu_per_wall"] = r["cpu_s"] / r["seconds"]
    ratio = runs["analyzer"]["mb_per_s"] / runs["reference"]["mb_per_s"]
    print(
        f"{'run':<16} {'shards':>6} {'MB':>8} {'s':>7} {'MB/s':>7} {'CPU/wall':>8} "
        f"{'RSS MB':>7} {'worker RSS MB':>13}"
    )
    for name, count in (
        ("analyzer_small", args.small),
        ("analyzer", args.shards),
        ("reference", args.shards),
    ):
        r = runs[name]
        print(
            f"{name:<16} {count:>6} {r['mb']:>8.1f} {r['seconds']:>7.2f} {r['mb_per_s']:>7.1f} "
            f"{r['cpu_per_wall']:>8.2f} {r['rss_mb']:>7.0f} {r['worker_rss_mb']:>13.0f}"
        )
    print(
        f"analyzer / reference: {ratio:.2f}x (jobs {jobs}, cores {os.cpu_count()}); "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    if precision is not None:
        worst = max(precision["differences"].items(), key=lambda kv: kv[1]["max_rel"])
        print(
            f"precision vs {args.baseline} (float64) on one shard: worst max_rel "
            f"{worst[1]['max_rel']:.2e} ({worst[0]}); baseline ran at "
            f"{precision['baseline_mb_per_s']:.1f} MB/s"
        )
        for key, row in sorted(precision["differences"].items()):
            if key.startswith("all/"):
                print(f"  {key:<24} max_abs {row['max_abs']:.2e}  max_rel {row['max_rel']:.2e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python "
                + " ".join([Path(sys.argv[0]).name and "bench/bench_analyzer.py", *sys.argv[1:]]),
                "config": {
                    "layers": args.layers,
                    "hidden": args.hidden,
                    "sites": 2 * args.layers,
                    "tokens_per_shard": args.tokens,
                    "shards": args.shards,
                    "small_shards": args.small,
                    "dtype": "bfloat16",
                    "jobs": jobs,
                },
                "machine": {
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                    "cpu_count": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "load_average_1min": {"before": load_before[0], "after": load_after[0]},
                "runs": runs,
                "analyzer_over_reference": ratio,
                "precision": precision,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
