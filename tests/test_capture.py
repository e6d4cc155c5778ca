"""Capture against a real vLLM CPU engine, checked against Hugging Face transformers.

Every captured layer and site must equal the residual stream HF computes for the same token
ids: post_mlp[l] == HF hidden_states[l+1] (the pre-final-norm residual for the last layer),
post_attention[l] == the input of HF's post_attention_layernorm of layer l. Requests go to
vLLM's own loopback port, so these test the connector and its answer (which names the files);
tests/test_sidecar.py tests the sidecar's /v1 in front of it.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import numpy as np
import pytest
from hf_reference import hf_channel_inputs, hf_residuals

from vllm_activations.contract.shard import ShardError, ShardReader, iter_shard_paths, read_shard
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.openai_capture import (
    CaptureFailed,
    capture_params,
    completion_body,
    wait_for_shard,
)

pytestmark = pytest.mark.integration

# (server, min cosine, max |diff| / max |ref|): bf16 servers at the tolerance,
# the float32 server much tighter.
TOLERANCES = {
    "tiny-qwen3-tied": (0.99999, 1e-4),
    "tiny-qwen3-untied": (0.999, 2e-2),
    "smollm2": (0.999, 2e-2),
}


def token_ids(n: int, seed: int, vocab: int = 1000) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def capture(server, prompt, max_tokens=8, spec=None, capture_id=None, timeout=300, **kw):
    body = completion_body(
        model="model",
        prompt=prompt,
        spec=spec or CaptureSpec(),
        capture_id=capture_id,
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        **kw,
    )
    r = httpx.post(
        f"{server.vllm_url}/v1/completions", json=body, timeout=timeout, headers=server.headers
    )
    r.raise_for_status()
    response = r.json()
    return response, wait_for_shard(capture_params(response))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_matches_hf(shard, model_dir, min_cos, max_rel):
    """Compare with HF float32 on the same tokens.

    A bf16 engine cannot match float32 better than bf16 arithmetic allows: on SmolLM2, HF's
    own bf16 forward falls below 0.999 cosine against HF float32 at a few positions. For bf16
    engines the worst position must be within 2e-3 of HF bf16's worst, 99% of positions must
    reach `min_cos`, and max|diff|/max|ref| may reach 1.5x HF bf16's own where that exceeds
    `max_rel`.
    """
    ids = np.concatenate([shard.input_tokens, shard.output_tokens]).tolist()
    forwarded = ids[: len(ids) - 1]
    ref = hf_residuals(model_dir, forwarded, dtype="float32")
    bf16_engine = shard.attrs["model_dtype"] == "bfloat16"
    ref16 = hf_residuals(model_dir, forwarded, dtype="bfloat16") if bf16_engine else None
    for site, got in shard.layer_outputs.items():
        want = ref[site][shard.layers][:, shard.positions]
        assert got.shape == want.shape, site
        cos = cosine(got, want)
        rel = np.abs(got - want).max() / np.abs(want).max()
        floor = min_cos
        if ref16 is not None:
            hf16 = cosine(ref16[site][shard.layers][:, shard.positions], want)
            floor = min(min_cos, float(hf16.min()) - 2e-3)
            hf16_rel = np.abs(ref16[site][shard.layers][:, shard.positions] - want).max()
            max_rel = max(max_rel, 1.5 * hf16_rel / np.abs(want).max())
            share = (cos >= min_cos).mean()
            assert share >= 0.99, f"{site}: only {share:.4f} of positions reach {min_cos}"
        worst = np.unravel_index(np.argmin(cos), cos.shape)
        assert cos.min() >= floor, f"{site}: cosine {cos.min()} < {floor} at {worst}"
        assert rel <= max_rel, f"{site}: max|diff|/max|ref| = {rel}"
    return ref


@pytest.mark.parametrize("name", list(TOLERANCES))
def test_every_layer_and_site_matches_hf(servers, embedded_models, name):
    server = servers.get(name)
    min_cos, max_rel = TOLERANCES[name]
    dtype = "float32" if server.dtype == "float32" else "bfloat16"
    worst = {}
    # Longer than max_num_batched_tokens (128): the prefill is chunked.
    for n, seed in ((37, 1), (300, 2)):
        response, path = capture(
            server, token_ids(n, seed), max_tokens=12, spec=CaptureSpec(dtype=dtype)
        )
        shard = read_shard(path)
        assert len(shard.input_tokens) == n
        assert len(shard.output_tokens) == 12
        assert shard.layers.tolist() == list(range(shard.attrs["num_hidden_layers"]))
        assert shard.positions.tolist() == list(range(n + 12 - 1))
        ref = assert_matches_hf(shard, embedded_models[name], min_cos, max_rel)
        for site, got in shard.layer_outputs.items():
            cos = cosine(got, ref[site][:, shard.positions]).min()
            rel = np.abs(got - ref[site][:, shard.positions]).max() / np.abs(ref[site]).max()
            worst[site] = (
                min(cos, worst.get(site, (1, 0))[0]),
                max(rel, worst.get(site, (1, 0))[1]),
            )
    print(f"\n{name} ({server.dtype} engine, {dtype} storage): min cosine / max rel diff {worst}")


def test_float32_storage_is_tighter_than_bfloat16(servers, embedded_models):
    server = servers.get("tiny-qwen3-tied")
    prompt = token_ids(50, 3)
    _, p32 = capture(server, prompt, spec=CaptureSpec(dtype="float32"))
    _, p16 = capture(server, prompt, spec=CaptureSpec(dtype="bfloat16"))
    s32, s16 = read_shard(p32), read_shard(p16)
    ref = hf_residuals(
        embedded_models["tiny-qwen3-tied"],
        np.concatenate([s32.input_tokens, s32.output_tokens])[:-1].tolist(),
    )
    err32 = np.abs(s32.layer_outputs["post_mlp"] - ref["post_mlp"]).max()
    err16 = np.abs(s16.layer_outputs["post_mlp"] - ref["post_mlp"]).max()
    assert err32 < err16 / 10, (err32, err16)
    with ShardReader(p16) as reader:
        assert reader.attrs["dtype"] == "bfloat16"
        assert reader._file["layer_outputs/post_mlp"].dtype == np.uint16


def test_concurrent_requests_equal_solo_runs(servers):
    """Mixed lengths, chunked prefill and 64+ token generations, all at once, then alone."""
    server = servers.get("tiny-qwen3-tied")
    jobs = [
        (token_ids(n, 100 + i), g)
        for i, (n, g) in enumerate(
            [
                (5, 70),
                (300, 8),
                (64, 64),
                (129, 3),
                (17, 100),
                (250, 40),
                (1, 65),
                (90, 1),
                (200, 20),
                (33, 80),
            ]
        )
    ]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda j: capture(server, j[0], max_tokens=j[1]), jobs))
    for (prompt, gen), (_, path) in zip(jobs, batched, strict=True):
        together = read_shard(path)
        _, solo_path = capture(server, prompt, max_tokens=gen)
        solo = read_shard(solo_path)
        assert together.input_tokens.tolist() == prompt
        assert together.output_tokens.tolist() == solo.output_tokens.tolist()
        assert together.positions.tolist() == list(range(len(prompt) + gen - 1))
        for site in ("post_attention", "post_mlp"):
            a, b = together.layer_outputs[site], solo.layer_outputs[site]
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            assert cos.min() > 0.9999, (len(prompt), gen, site, cos.min())
    # No row of one request appears in another's shard: every first-layer row is unique to
    # its own request (different random prompts give different residuals).
    rows = {}
    for _, path in batched:
        shard = read_shard(path, layers=[0], sites=["post_attention"])
        for row in shard.layer_outputs["post_attention"][0]:
            key = row.tobytes()
            assert rows.setdefault(key, path) == path, "a row appears in two shards"


def test_same_prompt_twice_gives_two_complete_shards(servers):
    server = servers.get("tiny-qwen3-untied")
    prompt = token_ids(200, 7)  # over one KV block: a prefix-cache hit would drop positions
    (_, p1), (_, p2) = capture(server, prompt), capture(server, prompt)
    assert p1 != p2
    s1, s2 = read_shard(p1), read_shard(p2)
    assert s1.positions.tolist() == s2.positions.tolist() == list(range(200 + 8 - 1))
    np.testing.assert_array_equal(s1.layer_outputs["post_mlp"], s2.layer_outputs["post_mlp"])


@pytest.mark.parametrize(
    "spec_dict, expected",
    [
        ({"positions": "all"}, lambda p, g: list(range(p + g - 1))),
        ({"positions": "prompt"}, lambda p, g: list(range(p))),
        ({"positions": "generated"}, lambda p, g: list(range(p, p + g - 1))),
        ({"positions": "last"}, lambda p, g: [p + g - 2]),
        ({"positions": "every:4"}, lambda p, g: list(range(0, p + g - 1, 4))),
    ],
)
def test_position_subsets(servers, embedded_models, spec_dict, expected):
    server = servers.get("tiny-qwen3-tied")
    p, g = 150, 20
    spec = CaptureSpec.from_dict({**spec_dict, "dtype": "float32"})
    _, path = capture(server, token_ids(p, 11), max_tokens=g, spec=spec)
    shard = read_shard(path)
    assert shard.positions.tolist() == expected(p, g)
    assert shard.layer_outputs["post_mlp"].shape[1] == len(expected(p, g))
    assert_matches_hf(shard, embedded_models["tiny-qwen3-tied"], *TOLERANCES["tiny-qwen3-tied"])


def test_layer_site_and_dtype_subsets(servers, embedded_models):
    server = servers.get("smollm2")
    spec = CaptureSpec(layers=(0, 7, -1), sites=("post_attention",), dtype="float16")
    _, path = capture(server, token_ids(40, 12), spec=spec)
    shard = read_shard(path)
    assert shard.layers.tolist() == [0, 7, 29]
    assert list(shard.layer_outputs) == ["post_attention"]
    assert shard.attrs["capture_spec"]["dtype"] == "float16"
    assert_matches_hf(shard, embedded_models["smollm2"], *TOLERANCES["smollm2"])


@pytest.mark.parametrize(
    "spec, field, allowed",
    [
        ({"layers": [0, 99]}, "layers", "0..3"),
        ({"sites": ["post_attn"]}, "sites", "post_attention"),
        ({"positions": "every:0"}, "positions", "every:K"),
        ({"dtype": "int8"}, "dtype", "bfloat16"),
        ({"stride": 2}, "stride", "layers, sites, positions, dtype"),
    ],
)
def test_bad_spec_is_rejected_and_writes_nothing(servers, spec, field, allowed):
    server = servers.get("tiny-qwen3-tied")
    before = set(server.shard_dir.iterdir())
    body = {
        "model": "model",
        "prompt": token_ids(10, 5),
        "max_tokens": 2,
        "kv_transfer_params": {"capture": spec, "capture_id": "bad-spec"},
    }
    r = httpx.post(
        f"{server.vllm_url}/v1/completions", json=body, timeout=120, headers=server.headers
    )
    r.raise_for_status()
    with pytest.raises(CaptureFailed) as info:
        capture_params(r.json())
    message = str(info.value)
    assert f"capture.{field}" in message and allowed in message, message
    assert set(server.shard_dir.iterdir()) == before


def test_killed_server_leaves_no_readable_shard(embedded_models, tmp_path):
    from server import CaptureServer

    server = CaptureServer(embedded_models["tiny-qwen3-untied"], tmp_path, max_model_len=4096)
    try:
        server.wait_ready()
        body = completion_body(
            model="model",
            prompt=token_ids(300, 9),
            spec=CaptureSpec(),
            max_tokens=3000,
            ignore_eos=True,
            capture_id="killed",
        )
        with cf.ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                httpx.post,
                f"{server.vllm_url}/v1/completions",
                json=body,
                timeout=600,
                headers=server.headers,
            )
            # Let it generate for a while, then crash the whole server.
            time.sleep(5)
            assert not future.done()
            server.kill()
            with pytest.raises(httpx.HTTPError):
                future.result()
    finally:
        server.stop()
    assert list(iter_shard_paths(server.shard_dir)) == []
    for path in server.shard_dir.iterdir():
        with pytest.raises(ShardError):
            ShardReader(path)


@pytest.mark.parametrize("positions", ["generated", "last"])
def test_generated_and_last_keep_prefix_cache_hits(servers, positions):
    """Specs without prompt positions read the prefix cache, and still lose no position."""
    server = servers.get("tiny-qwen3-tied")
    prompt, gen = token_ids(290, 21 if positions == "last" else 22), 9
    _, full_path = capture(server, prompt, max_tokens=gen, spec=CaptureSpec(dtype="float32"))
    before = httpx.get(f"{server.vllm_url}/metrics", timeout=30).text
    spec = CaptureSpec(positions=positions, dtype="float32")
    _, path = capture(server, prompt, max_tokens=gen, spec=spec)
    after = httpx.get(f"{server.vllm_url}/metrics", timeout=30).text
    assert prefix_cache_hits(after) > prefix_cache_hits(before), "no prefix-cache hit"
    full, part = read_shard(full_path), read_shard(path)
    assert part.positions.tolist() == spec.expected_positions(len(prompt), gen)
    rows = np.searchsorted(full.positions, part.positions)
    for site in ("post_attention", "post_mlp"):
        cos = cosine(part.layer_outputs[site], full.layer_outputs[site][:, rows])
        assert cos.min() > 0.99999, (site, cos.min())


def prefix_cache_hits(metrics: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("name", ["tiny-qwen3-tied", "tiny-qwen3-untied"])
def test_channel_stats_match_hf(servers, embedded_models, name):
    """Per-request channel sums of the down_proj and o_proj inputs equal HF's over every
    forwarded token, whatever positions and layers the residual capture keeps; concurrent
    requests (with and without statistics) do not leak into each other's slots."""
    server = servers.get(name)
    # float32 engine: float32 accumulation order only; bf16 engine: bf16 activations.
    tol = 1e-4 if server.dtype == "float32" else 3e-2
    specs = [
        CaptureSpec(layers=(0, 2, 3), positions="last", channel_stats=True),
        CaptureSpec(channel_stats=True, sites=("post_mlp",)),
        CaptureSpec(layers=(1,)),
    ]
    prompts = [token_ids(n, seed) for n, seed in ((150, 31), (40, 32), (90, 33))]
    with cf.ThreadPoolExecutor(len(specs)) as pool:
        futures = [
            pool.submit(capture, server, p, 10, spec)
            for p, spec in zip(prompts, specs, strict=True)
        ]
        results = [f.result() for f in futures]
    for spec, (_, path) in zip(specs, results, strict=True):
        with ShardReader(path) as reader:
            if not spec.channel_stats:
                assert "channel_stats" not in reader
                continue
            layers = reader.layers.tolist()
            ids = reader.dataset("input_tokens").tolist() + reader.dataset("output_tokens").tolist()
            forwarded = ids[:-1]
            ref = hf_channel_inputs(embedded_models[name], forwarded, dtype="float32")
            for kind, acts in ref.items():
                want = acts[layers]
                got_sum = reader.dataset(f"channel_stats/{kind}/sum")
                got_sq = reader.dataset(f"channel_stats/{kind}/sum_sq")
                got_abs = reader.dataset(f"channel_stats/{kind}/abs_sum")
                count = reader.dataset(f"channel_stats/{kind}/count")
                assert count.tolist() == [len(forwarded)] * len(layers)
                assert got_sum.shape == (len(layers), want.shape[-1])
                pairs = ((got_sum, want.sum(1)), (got_sq, (want * want).sum(1)))
                for got, exp in (*pairs, (got_abs, np.abs(want).sum(1))):
                    rel = np.abs(got - exp).max() / np.abs(exp).max()
                    assert rel <= tol, f"{kind}: max|diff|/max|ref| = {rel}"
                    assert cosine(got.ravel(), exp.ravel()) > 1 - tol
