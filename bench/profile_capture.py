"""Where capture time goes: py-spy samples of a capture server under a capture load.

Starts `vllm-activations serve` on the embedded SmolLM2, runs one warm-up batch of concurrent
Phase 1 prompts with a capture spec, then records the whole server process tree with py-spy
(`pip install py-spy`) during a second batch, and prints the share of non-idle samples in the
plugin's parts: the shard writer thread, the per-step row bookkeeping (`wait_for_save`), the
capture op, and everything else (the model and vLLM). Idle spinning (`sched_yield` in vLLM's
shared-memory queues) and waiting threads are left out of the total.

    python bench/profile_capture.py [--requests 32] [--max-tokens 64]
        [--layers all|quarter|last|summary]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from workload import ROOT, bench_cores, chat_body, phase1_messages

from vllm_activations import embedded
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.openai_capture import capture_params
from vllm_activations.process import ServerProcess

IDLE = ("sched_yield", "Condition.wait", "EpollSelector.select", "select (selectors", "_worker (")
PARTS = {
    "shard writer thread": "ShardWriterThread._run",
    "row bookkeeping (wait_for_save)": "CaptureWorker.wait_for_save",
    "statistics slots (bind)": "CaptureWorker.bind",
    "capture op": "_capture_residuals_op",
    "channel statistics op": "_channel_stats_op",
    "summary op": "_summarize_op",
}


async def batch(server: ServerProcess, prompts, max_tokens: int, spec: CaptureSpec) -> None:
    async with httpx.AsyncClient(timeout=1800, headers=server.headers) as client:

        async def one(messages) -> None:
            body = chat_body(messages, max_tokens, spec)
            r = await client.post(f"{server.url}/v1/chat/completions", json=body)
            r.raise_for_status()
            capture_params(r.json())  # the sidecar answers once the shard is written

        await asyncio.gather(*(one(m) for m in prompts))


def shares(raw: Path) -> tuple[int, Counter]:
    """Non-idle sample count and samples per plugin part from py-spy's raw (collapsed) output."""
    parts: Counter = Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(frames[-1].startswith(i) or i in frames[-1] for i in IDLE):
            continue
        busy += int(count)
        for name, marker in PARTS.items():
            if any(marker in f for f in frames):
                parts[name] += int(count)
                break
    return busy, parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--layers", choices=("all", "quarter", "last", "summary"), default="all")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "work" / "profile"))
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    bench_cores()
    model = embedded.smollm2()
    spec = {
        "all": CaptureSpec(),
        "quarter": CaptureSpec(layers=tuple(range(0, 30, 4))),
        "last": CaptureSpec(positions="last"),
        "summary": CaptureSpec(summary=True, tensors=False),
    }[args.layers]
    workdir = Path(args.workdir).resolve()
    server = ServerProcess(
        model,
        workdir,
        [
            "--max-model-len", "4096", "--gpu-memory-utilization", "0.15",
            "--served-model-name", "bench", "--no-enable-prefix-caching",
            "--max-concurrent-captures", str(args.requests),
            "--summary-slots", str(args.requests),
        ],
    )  # fmt: skip
    prompts = phase1_messages(args.requests)
    raw = workdir / "profile.txt"
    try:
        server.wait_ready()
        asyncio.run(batch(server, prompts, args.max_tokens, spec))  # warm-up
        spy_proc = subprocess.Popen(
            [spy, "record", "--subprocesses", "--nonblocking", "-r", "50", "-f", "raw",
             "-o", str(raw), "-p", str(server.proc.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(2)
        start = time.perf_counter()
        asyncio.run(batch(server, prompts, args.max_tokens, spec))
        wall = time.perf_counter() - start
        spy_proc.send_signal(2)
        spy_proc.wait(timeout=120)
    finally:
        server.stop()
    busy, parts = shares(raw)
    print(f"{args.requests} requests x {args.max_tokens} tokens, {args.layers}: {wall:.1f} s")
    print(f"non-idle samples: {busy} (py-spy raw output: {raw})")
    for name in PARTS:
        print(f"  {name:34s} {parts[name] / max(busy, 1):6.1%}")
    rest = busy - sum(parts.values())
    print(f"  {'model, vLLM and the rest':34s} {rest / max(busy, 1):6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
