"""The sidecar's own tokenizer gives vLLM's ids, or is not used.

Against the real engines: on every session server the sidecar settles on its local
tokenizer, and for prompts, teacher-forced texts and chat messages of many shapes (the Phase
1 tour prompts, special tokens' text, unicode, whitespace runs, multi-turn) it gives exactly
the ids of vLLM's /tokenize, the reference. Without an engine: the shapes it takes on, the
probe comparison that keeps it off, and the flags that leave tokenization to vLLM.
"""

from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest

from vllm_activations.cli import TOKENIZER_FLAGS, sidecar_tokenizer
from vllm_activations.sidecar.tokenizer import (
    PROBES,
    LocalTokenizer,
    disagreements,
    local_shape,
)

SERVERS = ("smollm2", "tiny-qwen3-tied", "tiny-qwen3-untied")


def phase1_messages(count: int) -> list[list[dict[str, str]]]:
    from actclient.phase1.dataset import build_dataset

    return [record.messages() for record in build_dataset()[:count]]


def payloads() -> list[dict]:
    texts = [
        "The harbour bridge",
        "  leading spaces and trailing  ",
        "Ünïcode: 你好, こんにちは, emoji 👋🏽, combining e\u0301",
        "special token text <|im_start|>user\nhi<|im_end|> and <|endoftext|>",
        "tabs\tnew\nlines\r\n" * 5,
        "8FVC9G8F+6W " * 200,
    ]
    out = []
    for text in texts:
        out.append({"prompt": text, "add_special_tokens": True})
        out.append({"prompt": text, "add_special_tokens": False})
        out.append({"messages": [{"role": "user", "content": text}], "add_generation_prompt": True})
    out.append(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": texts[0]},
                {"role": "assistant", "content": texts[2]},
                {"role": "user", "content": texts[3]},
            ],
            "add_generation_prompt": True,
        }
    )
    for messages in phase1_messages(4):
        out.append({"messages": messages, "add_generation_prompt": True})
    return out


def vllm_tokenize(client: httpx.Client, server, payload: dict) -> list[int]:
    r = client.post(f"{server.vllm_url}/tokenize", json={"model": "model", **payload})
    r.raise_for_status()
    return r.json()["tokens"]


@pytest.mark.parametrize("name", SERVERS)
def test_local_tokenizer_matches_vllm(servers, embedded_models, name):
    server = servers.get(name)
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health == {"status": "ok", "vllm": "ready", "tokenizer": "local"}
    local = LocalTokenizer.load(str(embedded_models[name]))
    checked = 0
    with httpx.Client(timeout=60) as client:
        for payload in payloads():
            assert local_shape(payload)
            assert local.encode(payload) == vllm_tokenize(client, server, payload), payload
            checked += 1
        assert disagreements(local, [vllm_tokenize(client, server, p) for p in PROBES]) == []
    assert checked >= 20


def test_capture_route_ids_are_vllms(servers):
    """Through the route: a chat capture's shard holds vLLM's own prompt ids."""
    server = servers.get("tiny-qwen3-tied")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {
        "messages": messages,
        "max_tokens": 2,
        "temperature": 0.0,
        "capture": {"positions": "last", "layers": [0]},
    }
    r = httpx.post(
        f"{server.url}/generate_with_activations", json=body, headers=server.headers, timeout=300
    )
    assert r.status_code == 200, r.text
    out = r.json()
    with httpx.Client(timeout=60) as client:
        expected = vllm_tokenize(
            client, server, {"messages": messages, "add_generation_prompt": True}
        )
    assert out["input_tokens"] == expected
    assert out["timings"]["tokenize_s"] < 0.5
    httpx.delete(f"{server.url}{out['shard']['url']}", headers=server.headers).raise_for_status()


def test_local_shape():
    assert local_shape({"prompt": "x", "add_special_tokens": True})
    assert not local_shape({"prompt": [1, 2, 3]})
    assert local_shape({"messages": [{"role": "user", "content": "hi"}]})
    assert not local_shape({"messages": []})
    # content parts, tool calls and names go to vLLM, whose chat parser normalises them
    assert not local_shape({"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert not local_shape({"messages": [{"role": "user", "content": "hi", "name": "a"}]})


def test_disagreements_keep_vllm(embedded_models):
    local = LocalTokenizer.load(str(embedded_models["smollm2"]))
    answers = [local.encode(p) for p in PROBES]
    assert disagreements(local, answers) == []
    changed = [list(a) for a in answers]
    changed[0][3] += 1
    changed[2] = None
    problems = disagreements(local, changed)
    assert problems == ["probe 0: ids differ from position 3", "probe 2: vLLM refused it"]
    changed = [list(a) for a in answers]
    changed[1] = changed[1][:-1]  # a prefix of ours: differs where it ends
    assert disagreements(local, changed) == [f"probe 1: ids differ from position {len(changed[1])}"]


def test_tokenizer_flags_leave_it_to_vllm():
    args = argparse.Namespace(model="some/model")
    assert sidecar_tokenizer(args, ["--max-model-len", "4096"]) == "some/model"
    for flag in TOKENIZER_FLAGS:
        assert sidecar_tokenizer(args, [flag, "x"]) is None
        assert sidecar_tokenizer(args, [f"{flag}=x"]) is None


def test_runner_without_tokenizer_setting_asks_vllm(tmp_path):
    """A sidecar built without `tokenizer` (as by `create_app` callers) settles on vLLM at
    once, without waiting for anything."""
    from vllm_activations.sidecar.generate import CaptureRunner
    from vllm_activations.sidecar.settings import Settings
    from vllm_activations.sidecar.store import ShardStore

    settings = Settings(
        vllm_url="http://127.0.0.1:9", shard_dir=tmp_path, num_layers=2, hidden_size=8
    )

    async def settle() -> str:
        async with httpx.AsyncClient() as client:
            runner = CaptureRunner(settings, client, ShardStore(tmp_path))
            assert runner.tokenizer == "vllm"
            return await asyncio.wait_for(runner.enable_local_tokenizer(), 5)

    assert asyncio.run(settle()) == "vllm"
