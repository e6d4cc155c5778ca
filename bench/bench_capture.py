"""Capture overhead, through the routes users call, variants interleaved in the same run.

Two servers on the embedded SmolLM2, both up for the whole run: stock vLLM (`plain`) and
`vllm-activations serve` (the capture server). Each variant is the wall time of N concurrent
requests (Phase 1 tour-stop prompts, greedy, a fixed number of generated tokens, EOS ignored
so every variant computes exactly the same tokens):
- `plain vLLM, /v1/completions`: stock vLLM, the same token ids;
- `no capture, /v1/completions`: the capture server's OpenAI route through the sidecar, no
  capture spec (the baseline of every capture ratio);
- `no capture, no sidecar hop`: the capture server's internal vLLM port, straight;
- `/generate_with_activations` with `last token only`, `quarter of the layers`,
  `all layers x both sites`, `summary only, all layers`: the chat messages (so the route's own
  tokenization is counted), waiting for each shard (`wait: true`), as `actclient record`
  does.
Rounds run every variant once, in an order rotated each round (ABC.., BC..A, ...), so slow
drifts of the machine hit every variant alike. Reported per variant: median and range of
the wall times, and the median and range of the per-round ratios against the same round's
baseline. Shards are deleted between batches (not timed). Idle CPU of each server is
measured at the start: an idle server that burns CPU would bias the interleaving.

    python bench/bench_capture.py [--requests 64] [--max-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
from workload import RESULTS, ROOT, bench_cores, phase1_messages, write_results

from vllm_activations import embedded
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.process import ServerProcess, free_loopback_port

SERVER_ARGS = [
    "--max-model-len",
    "4096",
    "--gpu-memory-utilization",
    "0.15",
    "--served-model-name",
    "bench",
    # Every variant computes the same tokens: capture of prompt positions bypasses the
    # prefix cache, which would otherwise give the no-capture runs free prefill.
    "--no-enable-prefix-caching",
]
BASELINE = "no capture, /v1/completions"


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    total, todo, seen = 0.0, [pid], set()
    tick = 100.0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return total


def idle_cpu_share(server: ServerProcess, seconds: float = 3.0) -> float:
    before = process_tree_cpu_s(server.proc.pid)
    time.sleep(seconds)
    return (process_tree_cpu_s(server.proc.pid) - before) / seconds


async def batch(variant: dict, prompts: list, token_ids: list, max_tokens: int) -> dict:
    """One batch of concurrent requests; wall time, tokens, shard bytes and shard ids."""
    url, headers, spec = variant["url"], variant["headers"], variant.get("spec")

    async def one(client: httpx.AsyncClient, k: int) -> tuple[int, int, str | None, dict]:
        sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        if spec is None:
            body = {"model": "bench", "prompt": token_ids[k], **sampling}
            r = await client.post(f"{url}/v1/completions", json=body, headers=headers)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"], 0, None, {}
        body = {"messages": prompts[k], **sampling, "capture": spec.to_dict(), "wait": True}
        r = await client.post(f"{url}/generate_with_activations", json=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"{variant['name']}: HTTP {r.status_code}: {r.text[:300]}")
        data = r.json()
        shard = data["shard"]
        return len(data["output_tokens"]), int(shard["bytes"]), shard["id"], data["timings"]

    async with httpx.AsyncClient(timeout=1800) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, k) for k in range(len(prompts))))
        wall = time.perf_counter() - start
        ids = [i for _, _, i, _ in results if i]
        # Not timed: keep the disk from filling over the rounds.
        for i in ids:
            (await client.delete(f"{url}/shards/{i}", headers=headers)).raise_for_status()
    timings = [t for _, _, _, t in results if t]  # the route's own per-request timings
    return {
        "wall_s": wall,
        "completion_tokens": sum(n for n, _, _, _ in results),
        "shard_bytes": sum(b for _, b, _, _ in results),
        "timings_s": {k: statistics.median(t[k] for t in timings) for k in timings[0]}
        if timings
        else {},
    }


def start(model: Path, workdir: Path, plain: bool, concurrency: int) -> ServerProcess:
    # The sidecar's default concurrent-capture limit (16) and the default summary slots (8)
    # would refuse part of a full batch.
    limits = ["--max-concurrent-captures", str(concurrency), "--summary-slots", str(concurrency)]
    args = SERVER_ARGS if plain else [*SERVER_ARGS, *limits]
    if not plain:  # a known internal port, to measure vLLM behind the sidecar without it
        vllm_port = free_loopback_port()
        args = [*args, "--vllm-port", str(vllm_port)]
    server = ServerProcess(model, workdir, args, plain=plain).wait_ready()
    server.vllm_url = server.url if plain else f"http://127.0.0.1:{vllm_port}"
    return server


def tokenize(server: ServerProcess, prompts: list) -> list[list[int]]:
    """The chat-templated prompt token ids, from the capture server's vLLM (as the sidecar)."""
    ids = []
    with httpx.Client(timeout=120) as client:
        for messages in prompts:
            body = {"model": "bench", "messages": messages, "add_generation_prompt": True}
            r = client.post(f"{server.vllm_url}/tokenize", json=body, headers=server.headers)
            r.raise_for_status()
            ids.append(r.json()["tokens"])
    return ids


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--out", default=str(RESULTS / "capture.json"))
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated beginnings of capture variants' names, run beside the baselines",
    )
    args = parser.parse_args()
    # vLLM's CPU build picks its OpenMP cores from how many cores it reserves for API server
    # processes, which differs between stock vLLM and the launcher: pin the same cores for
    # both so the baseline and the capture server compute on equal hardware.
    cores = bench_cores()
    prompts = phase1_messages(args.requests)
    model = embedded.smollm2()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    workdir = Path(args.workdir).resolve()
    plain = start(model, workdir / "plain", plain=True, concurrency=args.requests)
    server = None
    try:
        server = start(model, workdir / "capture", plain=False, concurrency=args.requests)
        token_ids = tokenize(server, prompts)
        idle = {"plain": idle_cpu_share(plain), "capture": idle_cpu_share(server)}
        sidecar = {"url": server.url, "headers": server.headers}
        variants = [
            {"name": "plain vLLM, /v1/completions", "url": plain.url, "headers": plain.headers},
            {"name": BASELINE, **sidecar},
            {"name": "no capture, no sidecar hop", "url": server.vllm_url, "headers": {}},
            {"name": "last token only", **sidecar, "spec": CaptureSpec(positions="last")},
            {
                "name": "quarter of the layers",
                **sidecar,
                "spec": CaptureSpec(layers=tuple(range(0, num_layers, 4))),
            },
            {"name": "all layers x both sites", **sidecar, "spec": CaptureSpec()},
            {
                "name": "summary only, all layers",
                **sidecar,
                "spec": CaptureSpec(summary=True, tensors=False),
            },
        ]
        if args.only:  # names may hold commas: a variant stays when a part begins its name
            keep = [s.strip() for s in args.only.split(",") if s.strip()]
            variants = [
                v for v in variants if "spec" not in v or any(v["name"].startswith(k) for k in keep)
            ]
        # Warm-up at full size: the first batches at new shapes compile and allocate (with
        # --only, the chosen capture variants too: their first batch is not a round's).
        warm = {"plain vLLM, /v1/completions", BASELINE, "all layers x both sites"}
        if args.only:
            warm |= {v["name"] for v in variants if "spec" in v}
        for v in variants:
            if v["name"] in warm:
                asyncio.run(batch(v, prompts, token_ids, args.max_tokens))
        runs: dict[str, list[dict]] = {v["name"]: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                result = asyncio.run(batch(v, prompts, token_ids, args.max_tokens))
                runs[v["name"]].append(result)
                print(f"round {r + 1} {v['name']:30s} {result['wall_s']:7.2f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
        plain.stop()
    base = [run["wall_s"] for run in runs[BASELINE]]
    plain_walls = [run["wall_s"] for run in runs["plain vLLM, /v1/completions"]]
    results = {}
    for name, rs in runs.items():
        walls = [run["wall_s"] for run in rs]
        results[name] = {
            "wall_s": spread(walls),
            "walls_s": [round(w, 3) for w in walls],
            "ratio_to_baseline": spread([w / b for w, b in zip(walls, base, strict=True)]),
            "ratio_to_plain": spread([w / p for w, p in zip(walls, plain_walls, strict=True)]),
            "completion_tokens": rs[0]["completion_tokens"],
            "gen_tok_per_s": rs[0]["completion_tokens"] / statistics.median(walls),
            "shard_bytes": rs[0]["shard_bytes"],
            # per request, median over the batch, then over the rounds
            "route_timings_s": {
                k: statistics.median(run["timings_s"][k] for run in rs) for k in rs[0]["timings_s"]
            },
        }
    print(
        f"\n{args.requests} requests x {args.max_tokens} generated tokens, SmolLM2-135M, "
        f"{args.rounds} interleaved rounds, {platform.machine()} {platform.processor() or ''}"
    )
    print(f"idle CPU (cores busy): plain {idle['plain']:.2f}, capture server {idle['capture']:.2f}")
    print(
        f"{'variant':30s} {'wall s (median, range)':>24s} {'vs ' + BASELINE:>32s} "
        f"{'vs plain':>20s} {'shard MiB':>10s}"
    )
    for name, r in results.items():
        w, rb, rp = r["wall_s"], r["ratio_to_baseline"], r["ratio_to_plain"]
        print(
            f"{name:30s} {w['median']:8.2f} ({w['min']:.2f}-{w['max']:.2f})    "
            f"{rb['median']:14.3f}x ({rb['min']:.3f}-{rb['max']:.3f}) "
            f"{rp['median']:8.3f}x ({rp['min']:.3f}-{rp['max']:.3f}) "
            f"{r['shard_bytes'] / 2**20:10.1f}"
        )
    print("per request through /generate_with_activations (medians): seconds")
    for name, r in results.items():
        if r["route_timings_s"]:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["route_timings_s"].items())
            print(f"  {name:28s} {parts}")
    write_results(
        Path(args.out),
        {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "cores": cores,
            "idle_cpu_cores_busy": idle,
            "baseline": BASELINE,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
