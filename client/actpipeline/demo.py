"""`make demo`: record, analyze and plan on a few shipped tour-stop prompts, embedded model.

Builds SmolLM2-135M-Instruct (cached), starts `vllm-activations serve` on loopback, sends the
first prompts of the shipped Phase 1 dataset through the chat API with capture on, and prints
where the shards are and what they hold; then `actclient analyze` and `actclient plan` turn
them into a report and a layer/neuron pruning plan.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from vllm_activations.contract.shard import ShardReader
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.openai_capture import capture_params, wait_for_shard
from vllm_activations.process import ServerProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actpipeline.demo")
    parser.add_argument("--out", default="demo-out", help="output directory")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from actclient.phase1.dataset import build_dataset
    from vllm_activations import embedded

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Each run analyzes its own shards only: the demo owns OUT/shards.
    for old in (out / "shards").glob("*"):
        if old.is_file() and old.suffix in (".h5", ".json"):
            old.unlink()
    print("building the embedded model (cached after the first run) ...", flush=True)
    model = embedded.smollm2()
    server = ServerProcess(
        model,
        out,
        [
            "--max-model-len",
            "4096",
            "--gpu-memory-utilization",
            "0.15",
            "--served-model-name",
            "smollm2",
        ],
    )
    try:
        print(
            f"starting vllm-activations serve {model.name} (log: {server.log_path}) ...", flush=True
        )
        server.wait_ready()
        records = build_dataset()[: args.prompts]
        for record in records:
            body = {
                "model": "smollm2",
                "messages": record.messages(),
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "kv_transfer_params": {"capture": CaptureSpec(channel_stats=True).to_dict()},
            }
            r = httpx.post(
                f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=600
            )
            r.raise_for_status()
            path = wait_for_shard(capture_params(r.json()), shard_dir=server.shard_dir)
            with ShardReader(path) as shard:
                size = path.stat().st_size / 2**20
                print(
                    f"{record.id:40s} {len(shard.input_tokens):4d} prompt + "
                    f"{len(shard.output_tokens):3d} generated tokens, {len(shard.layers)} "
                    f"layers x {len(shard.sites)} sites, {size:6.1f} MiB  {path}"
                )
    finally:
        server.stop()
    print(f"\nshards: {server.shard_dir}")
    from actclient.cli import main as actclient

    analysis = out / "analysis"
    # --force: a rerun replaces the previous run's analysis (the shards were started afresh).
    command = ["analyze", str(server.shard_dir), "--out", str(analysis), "--model", str(model)]
    if actclient([*command, "--force"]):
        return 1
    drop = max(1, len(shard.layers) // 5)
    plan = out / "plan.json"
    if actclient(
        ["plan", str(analysis), "--drop", str(drop), "--model", str(model), "--out", str(plan)]
    ):
        return 1
    print(f"\nreport: {analysis / 'report.md'}\nplan:   {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
