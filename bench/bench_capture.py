"""Capture overhead: plain vLLM versus capture, same prompts, same machine, same run.

Three measurements on the embedded SmolLM2, each the wall time of N concurrent requests
(Phase 1 tour-stop prompts, greedy, a fixed number of generated tokens, EOS ignored so every
variant generates exactly the same tokens), best of `--repeats`:
- `plain`: stock vLLM (no plugin architecture, no connector), its own server;
- on one capture server: `no capture, no sidecar hop` (straight to the launcher's internal
  vLLM port), `no capture` (requests without a spec, through the sidecar),
  `all layers x both sites`, `quarter of the layers`, `last token only`. Capture time runs
  until every shard is on disk.
Ratios are against `plain` and against `no capture` on the capture server, measured in the
same run. Prints a table (wall time and generated tokens/s per variant), writes
bench/results/capture.json.

    python bench/bench_capture.py [--requests 64] [--max-tokens 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import httpx
from workload import RESULTS, ROOT, bench_cores, chat_body, phase1_messages, write_results

from vllm_activations import embedded
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.openai_capture import capture_params
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


async def run_batch(url, headers, prompts, max_tokens, spec: CaptureSpec | None) -> dict:
    async def one(client, messages):
        body = chat_body(messages, max_tokens, spec)
        r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        data = r.json()
        if spec is not None:  # the sidecar answers once the shard is written
            return data["usage"], int(capture_params(data)["bytes"])
        return data["usage"], 0

    async with httpx.AsyncClient(timeout=1200) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, m) for m in prompts))
        wall = time.perf_counter() - start
    completion = sum(u["completion_tokens"] for u, _ in results)
    prompt = sum(u["prompt_tokens"] for u, _ in results)
    return {
        "wall_s": wall,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "gen_tok_per_s": completion / wall,
        "shard_bytes": sum(b for _, b in results),
    }


def measure(url, headers, prompts, max_tokens, spec, repeats) -> dict:
    runs = [asyncio.run(run_batch(url, headers, prompts, max_tokens, spec)) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["wall_s"])
    best["walls_s"] = [round(r["wall_s"], 3) for r in runs]
    return best


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--out", default=str(RESULTS / "capture.json"))
    args = parser.parse_args()
    # vLLM's CPU build picks its OpenMP cores from how many cores it reserves for API server
    # processes, which differs between stock vLLM and the launcher: pin the same cores for
    # both so the baseline and the capture server compute on equal hardware.
    cores = bench_cores()
    prompts = phase1_messages(args.requests)
    model = embedded.smollm2()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    workdir = Path(args.workdir).resolve()
    variants = {
        "no capture": None,
        "all layers x both sites": CaptureSpec(),
        "quarter of the layers": CaptureSpec(layers=tuple(range(0, num_layers, 4))),
        "last token only": CaptureSpec(positions="last"),
        "summary only, all layers": CaptureSpec(summary=True, tensors=False),
    }
    results: dict[str, dict] = {}
    plain = start(model, workdir / "plain", plain=True, concurrency=args.requests)
    try:
        # Warm-up at full size: the first batches at new shapes compile and allocate.
        measure(plain.url, plain.headers, prompts, args.max_tokens, None, 1)
        results["plain vLLM"] = measure(
            plain.url, plain.headers, prompts, args.max_tokens, None, args.repeats
        )
    finally:
        plain.stop()
    server = start(model, workdir / "capture", plain=False, concurrency=args.requests)
    try:
        measure(server.url, server.headers, prompts, args.max_tokens, CaptureSpec(), 1)
        # The same engine without the sidecar's HTTP hop: what the hop itself costs.
        results["no capture, no sidecar hop"] = measure(
            server.vllm_url, server.headers, prompts, args.max_tokens, None, args.repeats
        )
        for name, spec in variants.items():
            results[name] = measure(
                server.url, server.headers, prompts, args.max_tokens, spec, args.repeats
            )
    finally:
        server.stop()
    base = results["plain vLLM"]["wall_s"]
    same_server = results["no capture"]["wall_s"]
    print(
        f"\n{args.requests} requests x {args.max_tokens} generated tokens, SmolLM2-135M, "
        f"{platform.machine()} {platform.processor() or ''}".strip()
    )
    print(
        f"{'variant':28s} {'wall s':>8s} {'gen tok/s':>10s} {'vs plain':>9s} "
        f"{'vs no capture':>14s} {'shard MiB':>10s}"
    )
    for name, r in results.items():
        r["ratio_to_plain"] = r["wall_s"] / base
        r["ratio_to_no_capture"] = r["wall_s"] / same_server
        print(
            f"{name:28s} {r['wall_s']:8.2f} {r['gen_tok_per_s']:10.1f} "
            f"{r['ratio_to_plain']:8.3f}x {r['ratio_to_no_capture']:13.3f}x "
            f"{r['shard_bytes'] / 2**20:10.1f}"
        )
    write_results(
        Path(args.out),
        {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "cores": cores,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
