"""The HTTP sidecar: pure parts (keys, ids, limits) and the real stack (vLLM CPU + sidecar).

Integration tests use the session servers (started by `vllm-activations serve`, so the
launcher, auth and passthrough are exercised by every test). Limits are tested with a second
sidecar app, in this process, in front of the same vLLM and shard directory: a new limit
configuration needs no new engine.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from server import CaptureServer, free_port

from vllm_activations.cli import main as cli_main
from vllm_activations.cli import model_dimensions
from vllm_activations.contract.shard import ShardReader, read_shard
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.openai_capture import (
    CaptureFailed,
    capture_params,
    ended_on_stop_string,
    wait_for_shard,
)
from vllm_activations.sidecar import Limits, Settings, create_app
from vllm_activations.sidecar.errors import ApiError
from vllm_activations.sidecar.settings import (
    API_KEY_ENV,
    check_bind,
    is_loopback_host,
    key_matches,
    load_api_keys,
)
from vllm_activations.sidecar.store import ShardStore, validate_shard_id

MODEL = "tiny-qwen3-tied"  # float32 server: tight comparison with Hugging Face
MIN_COS, MAX_REL = 0.99999, 1e-4


# ---------------------------------------------------------------- unit: keys and binding


def test_key_matches_any_configured_key_only():
    keys = ("first-key-aaaa", "second-key-bbbb")
    assert key_matches("first-key-aaaa", keys)
    assert key_matches("second-key-bbbb", keys)
    for wrong in ("", "first-key-aaa", "first-key-aaaaa", "FIRST-KEY-AAAA", "x" * 1000):
        assert not key_matches(wrong, keys)
    assert not key_matches("anything", ())


def test_load_api_keys_merges_flag_env_and_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated 2026-01\nfile-key-1\n\n  file-key-2  \nflag-key\n")
    keys = load_api_keys(["flag-key"], key_file, env={API_KEY_ENV: "env-a, env-b,,"})
    assert keys == ("flag-key", "env-a", "env-b", "file-key-1", "file-key-2")
    assert load_api_keys([], None, env={}) == ()
    with pytest.raises(ValueError, match="whitespace"):
        load_api_keys(["two words"], None, env={})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_key(host):
    assert is_loopback_host(host)
    check_bind(host, (), insecure_no_auth=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com"])
def test_public_bind_needs_a_key_or_the_insecure_flag(host):
    assert not is_loopback_host(host)
    with pytest.raises(ValueError, match="--insecure-no-auth"):
        check_bind(host, (), insecure_no_auth=False)
    check_bind(host, ("a-key",), insecure_no_auth=False)
    check_bind(host, (), insecure_no_auth=True)


def test_launcher_refuses_public_bind_without_key_before_starting_vllm(monkeypatch, tmp_path):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    started = time.monotonic()
    with pytest.raises(SystemExit, match="refusing to listen on 0.0.0.0"):
        cli_main(["serve", str(tmp_path), "--host", "0.0.0.0", "--shard-dir", str(tmp_path)])
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- unit: ids and the store


@pytest.mark.parametrize("good", ["abc", "0f3e", "run-1_a.b", "a" * 128])
def test_valid_ids(good):
    assert validate_shard_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "../x",
        "..%2Fx",
        "a/b",
        "a\\b",
        ".hidden",
        "-x",
        "a" * 129,
        "a b",
        "a\nb",
        "abc\n",
    ],
)
def test_invalid_ids_are_400_naming_the_field(bad):
    with pytest.raises(ApiError) as info:
        validate_shard_id(bad)
    assert info.value.status == 400 and info.value.field == "id"


def test_store_never_leaves_its_directory(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    secret = tmp_path / "secret.h5"
    secret.write_bytes(b"outside")
    (root / "link.h5").symlink_to(secret)
    (root / "a.h5").write_bytes(b"a")
    (root / "b.h5").write_bytes(b"bb")
    (root / ".tmp.h5").write_bytes(b"partial")
    store = ShardStore(root)
    for shard_id in ("link", "missing"):
        with pytest.raises(ApiError) as info:
            store.existing(shard_id)
        assert info.value.status == 404
    with pytest.raises(ApiError):
        store.delete("link")
    assert secret.read_bytes() == b"outside" and (root / "link.h5").is_symlink()
    page, cursor = store.list(None, 1)
    assert [e.id for e in page] == ["a"] and cursor == "a"
    page, cursor = store.list(cursor, 1)
    assert [e.id for e in page] == ["b"] and cursor is None
    assert store.sha256(root / "b.h5") == hashlib.sha256(b"bb").hexdigest()
    store.delete("a")
    assert not (root / "a.h5").exists()


# ---------------------------------------------------------------- unit: limits


@pytest.mark.parametrize(
    "positions, expected_tokens",
    [("all", 10 + 5 - 1), ("prompt", 10), ("generated", 4), ("last", 1), ("every:4", 4)],
)
def test_capture_estimate_counts_forwarded_positions(positions, expected_tokens):
    spec = CaptureSpec(layers=(0, 2), positions=positions, dtype="float32")
    got = spec.estimate_bytes(10, 5, num_layers=4, hidden_size=8)
    assert got == expected_tokens * 2 * 2 * 8 * 4


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="--max-concurrent-captures"):
        Limits(max_concurrent_captures=0)
    with pytest.raises(ValueError, match="--max-tokens-limit"):
        Limits(max_tokens=-1)


def test_app_without_vllm_answers_health_and_auth(tmp_path):
    settings = Settings(
        vllm_url=f"http://127.0.0.1:{free_port()}",
        shard_dir=tmp_path,
        num_layers=4,
        hidden_size=8,
        api_keys=("right-key",),
    )
    with TestClient(create_app(settings)) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        r = client.get("/shards")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["field"] == "Authorization"
        auth = {"Authorization": "Bearer right-key"}
        schema = client.get("/openapi.json", headers=auth).json()
        assert {"/generate_with_activations", "/jobs/{job_id}", "/shards/{shard_id}"} <= set(
            schema["paths"]
        )
        both = client.post(
            "/generate_with_activations",
            json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            headers=auth,
        )
        assert both.status_code == 400 and both.json()["error"]["field"] == "prompt"
        bad = client.post(
            "/generate_with_activations",
            json={"prompt": "a", "capture": {"layers": [0, 9]}},
            headers=auth,
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["field"] == "capture.layers", bad.json()
        typo = client.post(
            "/generate_with_activations", json={"prompt": "a", "max_token": 3}, headers=auth
        )
        assert typo.status_code == 422 and typo.json()["error"]["field"] == "max_token"


# ---------------------------------------------------------------- integration helpers


@pytest.fixture(scope="module")
def server(servers) -> CaptureServer:
    return servers.get(MODEL)


def post(server, body, headers=None, timeout=300, base=None) -> httpx.Response:
    return httpx.post(
        f"{base or server.url}/generate_with_activations",
        json=body,
        headers=server.headers if headers is None else headers,
        timeout=timeout,
    )


def get(server, path, **kw) -> httpx.Response:
    kw.setdefault("headers", server.headers)
    return httpx.get(f"{server.url}{path}", timeout=120, **kw)


def tokenize(server, **payload) -> list[int]:
    # vLLM's own port, loopback only: the reference tokenization the sidecar must reproduce.
    r = httpx.post(f"{server.vllm_url}/tokenize", json={"model": "model", **payload}, timeout=60)
    r.raise_for_status()
    return r.json()["tokens"]


def assert_matches_hf(shard, model_dir):
    from test_capture import assert_matches_hf as check

    check(shard, model_dir, MIN_COS, MAX_REL)


def shard_files(server) -> set[str]:
    return {p.name for p in server.shard_dir.iterdir()}


# ---------------------------------------------------------------- integration: auth


@pytest.mark.integration
def test_every_route_but_health_needs_the_key(server):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    routes = [
        ("GET", "/shards"),
        ("GET", "/shards/abc"),
        ("DELETE", "/shards/abc"),
        ("GET", "/jobs/abc"),
        ("POST", "/generate_with_activations"),
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("GET", "/openapi.json"),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
        for method, path in routes:
            r = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert get(server, "/shards").status_code == 200
    assert get(server, "/v1/models").json()["data"][0]["id"] == "model"


# ---------------------------------------------------------------- integration: capture


@pytest.mark.integration
def test_generate_download_resume_and_match_hf(server, embedded_models, tmp_path):
    body = {
        "prompt": "The residual stream carries information",
        "max_tokens": 9,
        "temperature": 0,
        "ignore_eos": True,
        "capture": {"dtype": "float32"},
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    prompt_ids = tokenize(server, prompt=body["prompt"])
    assert out["mode"] == "generate"
    assert out["input_tokens"] == prompt_ids
    assert len(out["output_tokens"]) == 9 and out["finish_reason"] == "length"
    shard = out["shard"]
    assert shard["id"] == out["id"] and shard["url"] == f"/shards/{out['id']}"
    assert shard["positions"] == list(range(len(prompt_ids) + 9 - 1))
    assert shard["layers"] == list(range(4)) and shard["dtype"] == "float32"
    assert set(out["timings"]) >= {"generate_s", "shard_wait_s", "total_s"}
    on_disk = (server.shard_dir / f"{out['id']}.h5").read_bytes()
    assert shard["bytes"] == len(on_disk)
    assert shard["sha256"] == hashlib.sha256(on_disk).hexdigest()

    # Resume: the first part, then the rest from where it stopped.
    cut = len(on_disk) // 3
    first = get(server, shard["url"], headers={**server.headers, "Range": f"bytes=0-{cut - 1}"})
    assert first.status_code == 206 and len(first.content) == cut
    rest = get(server, shard["url"], headers={**server.headers, "Range": f"bytes={cut}-"})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {cut}-{len(on_disk) - 1}/{len(on_disk)}"
    whole = first.content + rest.content
    assert whole == on_disk
    assert rest.headers["x-content-sha256"] == hashlib.sha256(whole).hexdigest()
    full = get(server, shard["url"])
    assert full.status_code == 200 and full.content == on_disk
    assert full.headers["content-type"] == "application/x-hdf5"

    downloaded = tmp_path / "downloaded.h5"
    downloaded.write_bytes(whole)
    served, written = read_shard(downloaded), read_shard(server.shard_dir / f"{out['id']}.h5")
    assert served.input_tokens.tolist() == out["input_tokens"]
    assert served.output_tokens.tolist() == out["output_tokens"]
    for site in ("post_attention", "post_mlp"):
        np.testing.assert_array_equal(served.layer_outputs[site], written.layer_outputs[site])
    assert_matches_hf(served, embedded_models[MODEL])


@pytest.mark.integration
def test_teacher_forced_captures_exactly_prompt_plus_text(server, embedded_models):
    prompt, text = "Sydney Opera House:", " a multi-venue performing arts centre."
    r = post(server, {"prompt": prompt, "text": text, "capture": {"dtype": "float32"}})
    assert r.status_code == 200, r.text
    out = r.json()
    prompt_ids = tokenize(server, prompt=prompt)
    text_ids = tokenize(server, prompt=text, add_special_tokens=False)
    assert out["mode"] == "teacher_forced"
    assert out["input_tokens"] == prompt_ids + text_ids
    assert out["text_start"] == len(prompt_ids)
    n = len(prompt_ids) + len(text_ids)
    assert out["shard"]["positions"] == list(range(n))
    shard = read_shard(server.shard_dir / f"{out['id']}.h5")
    assert shard.input_tokens.tolist() == prompt_ids + text_ids
    assert shard.positions.tolist() == list(range(n))
    assert_matches_hf(shard, embedded_models[MODEL])


@pytest.mark.integration
def test_messages_use_the_chat_template(server):
    messages = [{"role": "user", "content": "Name a harbour."}]
    r = post(server, {"messages": messages, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == "chat"
    assert out["input_tokens"] == tokenize(server, messages=messages, add_generation_prompt=True)
    assert len(out["output_tokens"]) == 3


@pytest.mark.integration
def test_a_stop_string_ends_the_request_with_its_shard(server):
    """vLLM's front end ends a request on a stop string itself, and its answer then carries no
    connector params: both capture routes still answer with the shard of what the engine
    computed (none of it lost, no 500)."""
    body = {
        "prompt": "The harbour bridge", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "capture": {"layers": [0], "dtype": "float32"},
    }  # fmt: skip
    free = post(server, body)
    assert free.status_code == 200, free.text
    text = free.json()["text"]
    middle = len(text) // 2
    stop = text[middle : middle + 2]
    assert stop, text
    r = post(server, {**body, "stop": [stop]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["finish_reason"] == "stop" and len(out["text"]) < len(text)
    assert 1 <= len(out["output_tokens"]) <= 12
    shard = get(server, out["shard"]["url"])
    assert shard.status_code == 200 and len(shard.content) == out["shard"]["bytes"]
    v1 = {
        "model": "model", "prompt": "The harbour bridge", "max_tokens": 12, "temperature": 0,
        "ignore_eos": True, "stop": [stop],
        "kv_transfer_params": {"capture": {"layers": [0], "dtype": "float32"}},
    }  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=v1, headers=server.headers, timeout=300)
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert get(server, params["shard_url"]).status_code == 200
    # Straight to vLLM's own port: the answer names nothing; the capture id the request sent
    # and the shard directory do.
    direct = {**v1, "kv_transfer_params": {**v1["kv_transfer_params"], "capture_id": "stop-direct"}}
    r = httpx.post(f"{server.vllm_url}/v1/completions", json=direct, headers=server.headers,
                   timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text
    assert ended_on_stop_string(r.json()), r.json()
    with pytest.raises(CaptureFailed, match="ended on a stop string.*capture_id"):
        capture_params(r.json())
    path = wait_for_shard(capture_params(r.json(), "stop-direct", server.shard_dir))
    with ShardReader(path) as shard:  # greedy: the same tokens, as many as the engine ran
        tokens = shard.output_tokens.tolist()
    n = min(len(tokens), len(out["output_tokens"]))
    assert n >= 1 and tokens[:n] == out["output_tokens"][:n], (tokens, out["output_tokens"])


@pytest.mark.integration
def test_async_job_flow(server):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 40,
        "ignore_eos": True,
        "wait": False,
        "capture": {"layers": [0, -1], "sites": ["post_mlp"], "positions": "every:3"},
    }
    r = post(server, body)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert r.headers["location"] == accepted["job_url"] == f"/jobs/{accepted['id']}"
    deadline = time.monotonic() + 300
    while True:
        job = get(server, accepted["job_url"]).json()
        if job["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["id"] == accepted["id"] and job["finished"] >= job["created"]
    assert result["shard"]["layers"] == [0, 3]
    assert result["shard"]["positions"] == list(range(0, len(result["input_tokens"]) + 39, 3))
    download = get(server, accepted["shard_url"])
    assert hashlib.sha256(download.content).hexdigest() == result["shard"]["sha256"]


@pytest.mark.integration
def test_sixteen_concurrent_requests_get_separate_correct_shards(server, embedded_models):
    words = "harbour bridge shell roof concert opera sail white point tower".split()
    bodies = [
        {
            "prompt": " ".join(words[i % 10 :] + words[: i % 10]) + f" {i}",
            "max_tokens": 4 + i,
            "ignore_eos": True,
            "temperature": 0,
            "capture": {"dtype": "float32"},
        }
        for i in range(16)
    ]
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    outs = [r.json() for r in responses]
    assert len({o["id"] for o in outs}) == 16
    for body, out in zip(bodies, outs, strict=True):
        assert out["input_tokens"] == tokenize(server, prompt=body["prompt"])
        assert len(out["output_tokens"]) == body["max_tokens"]
        shard = read_shard(server.shard_dir / f"{out['id']}.h5")
        assert shard.input_tokens.tolist() == out["input_tokens"]
        assert shard.output_tokens.tolist() == out["output_tokens"]
        assert_matches_hf(shard, embedded_models[MODEL])


@pytest.mark.integration
def test_list_page_and_delete(server):
    ids = []
    for i in range(3):
        r = post(server, {"prompt": f"list me {i}", "max_tokens": 2})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = get(server, "/shards", params=params).json()
        assert len(page["shards"]) <= 2
        seen += [s["id"] for s in page["shards"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == sorted(seen) and set(ids) <= set(seen)
    victim = ids[0]
    r = httpx.delete(f"{server.url}/shards/{victim}", headers=server.headers, timeout=30)
    assert r.status_code == 204
    assert not (server.shard_dir / f"{victim}.h5").exists()
    assert get(server, f"/shards/{victim}").status_code == 404
    again = httpx.delete(f"{server.url}/shards/{victim}", headers=server.headers, timeout=30)
    assert again.status_code == 404
    assert get(server, f"/shards/{ids[1]}").status_code == 200


@pytest.mark.integration
def test_unknown_and_traversal_ids_touch_nothing(server, tmp_path):
    outside = server.shard_dir.parent / "server.log"
    assert outside.exists()
    bait = tmp_path / "bait.h5"
    bait.write_bytes(b"not yours")
    (server.shard_dir / "bait-link.h5").symlink_to(bait)
    before = shard_files(server)
    raw_ids = [
        "no-such-shard",
        "..",
        "%2e%2e",
        ".hidden",
        "..%2Fserver.log",
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "bait-link",
        "a%00b",
        "abc%0A",
    ]
    for raw in raw_ids:
        for method in ("GET", "DELETE"):
            for prefix in ("/shards/", "/jobs/"):
                if prefix == "/jobs/" and method == "DELETE":
                    continue
                r = httpx.request(
                    method, f"{server.url}{prefix}{raw}", headers=server.headers, timeout=30
                )
                assert r.status_code in (400, 404), (method, prefix, raw, r.status_code)
                assert r.json()["error"]["status"] == r.status_code
    assert shard_files(server) == before
    assert outside.exists() and bait.read_bytes() == b"not yours"
    (server.shard_dir / "bait-link.h5").unlink()


@pytest.mark.integration
def test_v1_passthrough_streams(server):
    body = {"model": "model", "prompt": "Once", "max_tokens": 5, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2


# ---------------------------------------------------------------- integration: limits


class InProcessSidecar:
    """A second sidecar app with its own limits, in front of a session server's vLLM."""

    def __init__(
        self, server: CaptureServer, model_dir: Path, limits: Limits, **settings: Any
    ) -> None:
        num_layers, hidden_size = model_dimensions(str(model_dir))
        self.key = "in-process-key"
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.app = create_app(
            Settings(
                vllm_url=server.vllm_url,
                shard_dir=server.shard_dir,
                num_layers=num_layers,
                hidden_size=hidden_size,
                api_keys=(self.key,),
                limits=limits,
                **settings,
            )
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessSidecar:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "in-process sidecar did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(
            f"{self.url}/generate_with_activations", json=body, headers=self.headers, timeout=300
        )

    def jobs(self) -> int:
        return len(self.app.state.jobs._jobs)


def assert_rejected(sidecar, server, body, status, field, flag):
    before = shard_files(server)
    r = sidecar.post(body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["status"] == status
    if flag:
        assert flag in error["message"], error["message"]
    assert shard_files(server) == before
    assert sidecar.jobs() == 0
    return r


@pytest.mark.integration
def test_each_limit_rejects_with_its_status_and_leaves_nothing(server, embedded_models):
    model_dir = embedded_models[MODEL]
    num_layers, hidden = model_dimensions(str(model_dir))
    prompt = " ".join(["bridge"] * 12)
    n = len(tokenize(server, prompt=prompt))
    long_prompt = " ".join(["harbour"] * 60)
    assert len(tokenize(server, prompt=long_prompt)) > n + 2
    # All layers, both sites, bf16, n + 16 - 1 positions: one byte over the limit.
    full = CaptureSpec().estimate_bytes(n, 16, num_layers, hidden)
    limits = Limits(max_prompt_tokens=n + 2, max_tokens=16, max_capture_bytes=full - 1)
    with InProcessSidecar(server, model_dir, limits) as sidecar:
        for wait in (True, False):
            assert_rejected(
                sidecar,
                server,
                {"prompt": long_prompt, "wait": wait},
                413,
                "prompt",
                "--max-prompt-tokens",
            )
            assert_rejected(
                sidecar,
                server,
                {"prompt": "hi", "text": long_prompt, "wait": wait},
                413,
                "text",
                "--max-prompt-tokens",
            )
            assert_rejected(
                sidecar,
                server,
                {"prompt": "hi", "max_tokens": 17, "wait": wait},
                413,
                "max_tokens",
                "--max-tokens-limit",
            )
            assert_rejected(
                sidecar,
                server,
                {"prompt": prompt, "max_tokens": 16, "wait": wait},
                413,
                "capture",
                "--max-capture-bytes",
            )
            assert_rejected(
                sidecar,
                server,
                {"prompt": "hi", "capture": {"layers": [7]}, "wait": wait},
                400,
                "capture.layers",
                "0..3",
            )
        # Fewer layers fit the same byte limit.
        ok = sidecar.post({"prompt": prompt, "max_tokens": 16, "capture": {"layers": [0]}})
        assert ok.status_code == 200, ok.text

    with InProcessSidecar(server, model_dir, Limits(min_free_disk_bytes=2**62)) as sidecar:
        for wait in (True, False):
            assert_rejected(
                sidecar,
                server,
                {"prompt": "hi", "wait": wait},
                507,
                None,
                "--min-free-disk-bytes",
            )


@pytest.mark.integration
def test_concurrency_limit_answers_429_with_retry_after(servers, embedded_models):
    # SmolLM2, not the tiny model: its 1500-token job must outlast the checks below (the
    # tiny model generates it in a few seconds, which made this test racy).
    slow = servers.get("smollm2")
    with InProcessSidecar(
        slow, embedded_models["smollm2"], Limits(max_concurrent_captures=1)
    ) as sidecar:
        long = sidecar.post(
            {"prompt": "Once", "max_tokens": 1500, "ignore_eos": True, "wait": False}
        )
        assert long.status_code == 202, long.text
        job_id = long.json()["id"]
        for wait in (True, False):
            before = shard_files(slow)
            r = sidecar.post({"prompt": "hi", "max_tokens": 2, "wait": wait})
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert "--max-concurrent-captures" in r.json()["error"]["message"]
            assert shard_files(slow) - before <= {f"{job_id}.h5"}
            assert set(sidecar.app.state.jobs._jobs) == {job_id}
        # A capture through the /v1 passthrough takes a slot too.
        raw = httpx.post(
            f"{sidecar.url}/v1/completions",
            json={
                "model": "model",
                "prompt": "x",
                "max_tokens": 1,
                "kv_transfer_params": {"capture": {}},
            },
            headers=sidecar.headers,
            timeout=60,
        )
        assert raw.status_code == 429
        deadline = time.monotonic() + 300
        while sidecar.app.state.jobs.get(job_id).status == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert sidecar.app.state.jobs.get(job_id).status == "succeeded"
        assert sidecar.post({"prompt": "hi", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------- integration: lifecycle


@pytest.mark.integration
def test_sigterm_stops_sidecar_and_vllm(embedded_models, tmp_path):
    server = CaptureServer(embedded_models[MODEL], tmp_path, dtype="float32")
    try:
        server.wait_ready()
        assert httpx.get(f"{server.vllm_url}/health", timeout=10).status_code == 200
        server.proc.send_signal(signal.SIGTERM)  # the launcher only, not its process group
        assert server.proc.wait(timeout=90) == 0, server.log_tail()
        for url in (server.url, server.vllm_url):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health", timeout=5)
    finally:
        server.stop()


def test_module_runs_as_script():
    # `python -m vllm_activations.cli serve --help` lists the sidecar flags.
    out = subprocess.run(
        [sys.executable, "-m", "vllm_activations.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert out.returncode == 0
    for flag in (
        "--api-key",
        "--api-key-file",
        "--insecure-no-auth",
        "--max-prompt-tokens",
        "--max-tokens-limit",
        "--max-capture-bytes",
        "--min-free-disk-bytes",
        "--max-concurrent-captures",
    ):
        assert flag in out.stdout
