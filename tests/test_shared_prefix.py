"""Concurrent captures that share a long prompt prefix, on the real CPU engine.

Prefix caching stays on: `all` captures skip cache reads (their prompt rows must be computed)
but still publish their blocks, and `generated` captures read the cache, so in the same steps
some requests' block tables hold blocks another request is computing. Every row must still be
the one Hugging Face computes for that request's tokens at that position.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
from test_capture import TOLERANCES, assert_matches_hf, capture, prefix_cache_hits, token_ids

from vllm_activations.contract.shard import read_shard
from vllm_activations.contract.spec import CaptureSpec

pytestmark = pytest.mark.integration

SERVER = "tiny-qwen3-tied"


def test_six_concurrent_captures_sharing_a_prefix_match_hf(servers, embedded_models):
    server = servers.get(SERVER)
    prefix = token_ids(300, 501)  # several KV blocks, and more than one 128-token step
    jobs = [
        (prefix + token_ids(20, 600 + i), CaptureSpec(positions=mode, dtype="float32"))
        for i, mode in enumerate(["all", "generated"] * 3)
    ]
    before = prefix_cache_hits(httpx.get(f"{server.vllm_url}/metrics", timeout=30).text)
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: capture(server, j[0], max_tokens=6, spec=j[1]), jobs))
    after = prefix_cache_hits(httpx.get(f"{server.vllm_url}/metrics", timeout=30).text)
    assert after > before, "no request read the shared prefix from the cache"
    min_cos, max_rel = TOLERANCES[SERVER]
    for (prompt, spec), (_, path) in zip(jobs, results, strict=True):
        shard = read_shard(path)
        assert shard.input_tokens.tolist() == prompt
        assert shard.positions.tolist() == spec.expected_positions(len(prompt), 6)
        assert_matches_hf(shard, embedded_models[SERVER], min_cos, max_rel)
