"""What every benchmark shares: the Phase 1 prompts, the CPU cores, the results file.

One definition, so that vLLM, the capture server and Hugging Face are measured on the same
requests and the same cores, and their results can be compared across scripts.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The vLLM CPU build reads its OpenMP cores from this variable; the other benchmarks pin to
# the same cores so every measurement computes on equal hardware.
CORES_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def phase1_messages(count: int) -> list[list[dict[str, str]]]:
    """The first `count` Phase 1 tour-stop requests as chat messages (cycled if needed)."""
    from actclient.phase1.dataset import build_dataset

    records = build_dataset()
    return [records[i % len(records)].messages() for i in range(count)]


def chat_body(messages: list[dict[str, str]], max_tokens: int, spec=None) -> dict[str, Any]:
    """A greedy chat request that generates exactly `max_tokens`, with capture when `spec`."""
    body: dict[str, Any] = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if spec is not None:
        body["kv_transfer_params"] = {"capture": spec.to_dict()}
    return body


def bench_cores() -> list[int]:
    """The CPU cores every benchmark computes on: `VLLM_CPU_OMP_THREADS_BIND` (set to all
    cores when unset, e.g. "0-1"), so stock vLLM, the capture server and HF agree."""
    os.environ.setdefault(CORES_VARIABLE, f"0-{(os.cpu_count() or 1) - 1}")
    cores: list[int] = []
    for part in os.environ[CORES_VARIABLE].split(","):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return cores


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write a benchmark's JSON with the machine and finish time that produced it."""
    payload = {
        "machine": platform.platform(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
