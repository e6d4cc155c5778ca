"""Sidecar admission under pressure: a small full disk, captures on /v1, a schema fuzzer.

The disk tests mount a small tmpfs over the shard directory of a session server (the vLLM
worker writes there by path, so its shards land on the tmpfs) and unmount it afterwards; they
skip only where mounting is impossible (not root, or no mount privilege). The schemathesis run
is bounded (a fixed seed and example count) and excludes /v1, which is vLLM's own API.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from server import free_port
from test_sidecar import MODEL, InProcessSidecar, shard_files, tokenize

from vllm_activations.cli import model_dimensions
from vllm_activations.connector.scheduler import _SlotPool
from vllm_activations.contract.shard import ShardReader
from vllm_activations.contract.spec import CaptureSpec, CaptureSpecError
from vllm_activations.openai_capture import CaptureFailed
from vllm_activations.sidecar import Limits, Settings, create_app
from vllm_activations.sidecar.errors import ApiError
from vllm_activations.sidecar.generate import capture_failure
from vllm_activations.sidecar.jobs import DiskBudget, DiskFull
from vllm_activations.sidecar.settings import (
    SIDECAR_KEEP_ALIVE_S,
    VLLM_KEEP_ALIVE_ENV,
    vllm_keepalive_expiry,
)

KEY = {"Authorization": "Bearer right-key"}


def offline_settings(shard_dir: Path, limits: Limits | None = None) -> Settings:
    """A 4-layer model's sidecar with no vLLM behind it (nothing listens on the port)."""
    return Settings(
        vllm_url=f"http://127.0.0.1:{free_port()}",
        shard_dir=shard_dir,
        num_layers=4,
        hidden_size=8,
        api_keys=("right-key",),
        limits=limits or Limits(),
    )


def _mount_tmpfs(path: Path, size: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A function mounting a tmpfs of `size` bytes at a path; all are unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: int, path: Path | None = None) -> Path:
        path = path or tmp_path / f"disk{len(mounted)}"
        path.mkdir(exist_ok=True)
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        _unmount(path)


def no_partial_files(directory: Path) -> list[str]:
    """Names in a shard directory other than complete shards and error records."""
    return [
        p.name
        for p in directory.iterdir()
        if not (p.name.endswith(".h5") or p.name.endswith(".error.json")) or p.name.startswith(".")
    ]


# ---------------------------------------------------------------- unit: the disk budget


def test_disk_budget_counts_every_capture_in_flight(small_disk):
    root = small_disk(4 * 2**20)
    free = shutil.disk_usage(root).free
    budget = DiskBudget(root, reserve=2**20)
    first = budget.reserve_for(2 * 2**20)
    # Free space alone would admit this one too; the first capture's promise does not.
    assert free - 2 * 2**20 >= 2**20
    with pytest.raises(DiskFull) as info:
        budget.reserve_for(2 * 2**20)
    assert info.value.promised == first and info.value.in_flight == 1
    budget.release(first)
    assert budget.promised == 0 and budget.in_flight == 0
    budget.release(budget.reserve_for(2 * 2**20))


def test_full_disk_answers_507_naming_the_directory(small_disk):
    root = small_disk(2**20)
    settings = offline_settings(root, Limits(min_free_disk_bytes=0))
    with TestClient(create_app(settings)) as client:
        runner = client.app.state.runner
        with pytest.raises(ApiError) as info:
            runner.reserve_disk_bytes(2 * 2**20)
        assert info.value.status == 507 and str(root) in info.value.message
        assert "--min-free-disk-bytes" in info.value.message
        assert runner.disk.in_flight == 0
    failure = capture_failure(
        CaptureFailed("shard write failed: [Errno 28] No space left on device"), root, 2
    )
    assert failure.status == 507 and str(root) in failure.message
    other = capture_failure(CaptureFailed("shard x not written after 3 s"), root, 2)
    assert other.status == 500
    refused = capture_failure(CaptureFailed("capture.tensors: false keeps nothing"), root, 2)
    assert (refused.status, refused.field) == (400, "capture.tensors")


def test_busy_device_slots_are_429_not_bad_input(tmp_path):
    """The connector's own refusal when every summary slot is taken (a request that reached
    vLLM past the sidecar's count) is a retryable 429, while a server without such slots is
    a 400: the connector's messages, as its slot pool writes them."""
    pool = _SlotPool("summary", 1)
    pool.take()
    with pytest.raises(CaptureSpecError) as busy:
        pool.take()
    answer = capture_failure(CaptureFailed(str(busy.value)), tmp_path, 7)
    assert (answer.status, answer.field, answer.headers) == (
        429, "capture.summary", {"Retry-After": "7"},
    )  # fmt: skip
    with pytest.raises(CaptureSpecError) as none:
        _SlotPool("summary", 0).take()
    answer = capture_failure(CaptureFailed(str(none.value)), tmp_path, 7)
    assert (answer.status, answer.field) == (400, "capture.summary")
    assert "--summary-slots 0" in answer.message


def test_a_full_server_refuses_before_asking_vllm(tmp_path):
    """Busy slots are refused before the prompt is tokenized: a sidecar with no vLLM behind it
    answers 429 (not 503 for the vLLM it cannot reach) on both routes while its one summary
    slot, or all its capture slots, are held, and frees nothing it did not take."""
    settings = dataclasses.replace(
        offline_settings(tmp_path, Limits(max_concurrent_captures=2)), device_slots={"summary": 1}
    )
    summary = {"layers": [0], "summary": True, "tensors": False}
    with TestClient(create_app(settings)) as client:
        slots = client.app.state.slots
        for held, capture, full in (
            ([["summary"]], summary, "capture.summary"),  # the one device slot
            ([[], []], {"layers": [0]}, None),  # both capture slots
        ):
            for needs in held:
                assert slots.try_acquire(needs) is None
            for route, body, field in (
                ("/generate_with_activations", {"prompt": "x", "capture": capture}, full),
                (
                    "/v1/completions",
                    {"prompt": "x", "kv_transfer_params": {"capture": capture}},
                    full and f"kv_transfer_params.{full}",
                ),
            ):
                r = client.post(route, json=body, headers=KEY)
                assert r.status_code == 429 and r.headers["retry-after"] == "2", (route, r.text)
                assert r.json()["error"].get("field") == field, r.text
            assert (slots.in_use, slots.kind_in_use) == (len(held), {"summary": len(held) % 2})
            for needs in held:
                slots.release(needs)
        r = client.post("/generate_with_activations", json={"prompt": "x"}, headers=KEY)
        assert r.status_code == 503 and "not ready" in r.text, r.text  # free slots: asks vLLM
        assert (slots.in_use, slots.kind_in_use) == (0, {"summary": 0})


def test_idle_connections_to_vllm_are_dropped_before_vllm_drops_them(tmp_path):
    """vLLM's uvicorn closes an idle connection after VLLM_HTTP_TIMEOUT_KEEP_ALIVE s (5), and
    httpx would reuse one for 5 s: the sidecar reused one vLLM was closing and answered 502
    (ReadError) mid-benchmark. Its client now keeps them half vLLM's time, set or not."""
    assert vllm_keepalive_expiry({}) == 2.5
    assert vllm_keepalive_expiry({VLLM_KEEP_ALIVE_ENV: "1"}) == 0.5
    assert vllm_keepalive_expiry({VLLM_KEEP_ALIVE_ENV: "soon"}) == 2.5
    assert SIDECAR_KEEP_ALIVE_S > 5  # longer than any httpx client keeps one (its default)
    with TestClient(create_app(offline_settings(tmp_path))) as client:
        pool = client.app.state.client._transport._pool
        assert pool._keepalive_expiry == vllm_keepalive_expiry() < 5


# ---------------------------------------------------------------- unit: the schema


def test_openapi_states_the_rules_the_server_enforces(tmp_path):
    settings = offline_settings(tmp_path, Limits(max_tokens=64))
    with TestClient(create_app(settings)) as client:
        schema = client.get("/openapi.json", headers=KEY).json()
        paths, components = schema["paths"], schema["components"]["schemas"]
        for path, method in (("/shards/{shard_id}", "get"), ("/jobs/{job_id}", "get")):
            (param,) = paths[path][method]["parameters"]
            assert param["schema"]["pattern"].startswith("^[A-Za-z0-9]")
        after = next(p for p in paths["/shards"]["get"]["parameters"] if p["name"] == "after")
        assert after["schema"]["pattern"] == param["schema"]["pattern"]
        generate = components["GenerateRequest"]
        assert [b["required"] for b in generate["oneOf"]] == [["prompt"], ["messages"]]
        assert generate["properties"]["max_tokens"]["maximum"] == 64
        capture = components["CaptureRequest"]["properties"]
        assert "every:" in capture["positions"]["pattern"]
        (layers,) = [b for b in capture["layers"]["anyOf"] if b.get("type") == "array"]
        assert layers["items"] == {"type": "integer", "minimum": -4, "maximum": 3}

        # The server agrees with what the schema says: ids, `after`, prompt xor messages.
        for bad in ("a b", "-x", ".hidden"):
            r = client.get(f"/shards/{bad}", headers=KEY)
            assert r.status_code == 400 and r.json()["error"]["field"] == "id"
        r = client.get("/shards", params={"after": ""}, headers=KEY)
        assert r.status_code == 400 and r.json()["error"]["field"] == "after"
        r = client.post("/generate_with_activations", json={"max_tokens": 2}, headers=KEY)
        assert r.status_code == 400 and r.json()["error"]["field"] == "prompt"
        r = client.post("/generate_with_activations", json={"prompt": "a", "wait": 0}, headers=KEY)
        assert r.status_code == 422 and r.json()["error"]["field"] == "wait"
        # true/false are not numbers, whatever pydantic would make of them.
        for body, field in (
            ({"seed": False}, "seed"),
            ({"temperature": False}, "temperature"),
            ({"max_tokens": True}, "max_tokens"),
            ({"capture": {"layers": [False]}}, "capture.layers"),
        ):
            r = client.post("/generate_with_activations", json={"prompt": "a", **body}, headers=KEY)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.json()

        # A wrong method names every method of the path.
        r = client.put("/shards/abc", headers=KEY)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"


# ---------------------------------------------------------------- unit: /v1 refusals


@pytest.mark.parametrize(
    "method, path, body, status, field",
    [
        ("POST", "/v1/completions", {"prompt": "a", "stream": True}, 400, "stream"),
        ("POST", "/v1/completions", {"prompt": "a", "n": 2}, 400, "n"),
        ("POST", "/v1/embeddings", {"input": "a"}, 400, "kv_transfer_params.capture"),
        ("POST", "/v1/completions", {"prompt": "a", "layers": 1}, 400, None),
        ("POST", "/v1/completions", {"prompt": "a", "teacher": 1}, 400, "teacher_logprobs"),
    ],
)
def test_v1_capture_is_checked_before_vllm_is_asked(tmp_path, method, path, body, status, field):
    settings = offline_settings(tmp_path)
    capture = {"layers": [9]} if body.pop("layers", None) else {}
    if body.pop("teacher", None):
        capture = {"teacher_logprobs": 5}
        field = "kv_transfer_params.capture.teacher_logprobs"
    body["kv_transfer_params"] = {"capture": capture}
    with TestClient(create_app(settings)) as client:
        r = client.request(method, path, json=body, headers=KEY)
        error = r.json()["error"]
        assert r.status_code == status, error
        assert error["field"] == (field or "kv_transfer_params.capture.layers"), error
        assert client.app.state.runner.disk.in_flight == 0
        assert client.app.state.slots.in_use == 0
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def server(servers):
    return servers.get(MODEL)


def _post_all(sidecar, bodies, threads):
    with cf.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(sidecar.post, bodies))


@pytest.mark.integration
def test_concurrent_captures_on_a_small_disk_get_200_or_507_never_500(
    server, embedded_models, small_disk
):
    small_disk(8 * 2**20, server.shard_dir)
    limits = Limits(min_free_disk_bytes=0, max_concurrent_captures=16)
    bodies = [
        {
            "prompt": f"harbour bridge opera {i}",
            "max_tokens": 64,
            "ignore_eos": True,
            "capture": {"dtype": "float32"},
        }
        for i in range(40)
    ]
    with InProcessSidecar(server, embedded_models[MODEL], limits) as sidecar:
        responses = _post_all(sidecar, bodies, threads=8)
        assert sidecar.app.state.runner.disk.promised == 0
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 507}, [r.text for r in responses if r.status_code != 200]
    assert 200 in statuses and 507 in statuses, statuses
    for r in responses:
        if r.status_code == 507:
            assert str(server.shard_dir) in r.json()["error"]["message"]
        else:
            path = server.shard_dir / f"{r.json()['id']}.h5"
            with ShardReader(path) as shard:
                assert len(shard.positions) == len(r.json()["shard"]["positions"])
    assert no_partial_files(server.shard_dir) == []


@pytest.mark.integration
def test_disk_filling_up_during_a_capture_answers_507_and_keeps_nothing_partial(
    server, embedded_models, small_disk
):
    small_disk(16 * 2**20, server.shard_dir)
    limits = Limits(min_free_disk_bytes=0)
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 1500,
        "ignore_eos": True,
        "wait": False,
        "capture": {"dtype": "float32"},
    }
    with InProcessSidecar(server, embedded_models[MODEL], limits) as sidecar:
        accepted = sidecar.post(body)
        assert accepted.status_code == 202, accepted.text
        # Someone else fills the disk while the capture generates; leave room for the
        # connector's small error record.
        free = shutil.disk_usage(server.shard_dir).free
        with open(server.shard_dir / "filler", "wb") as filler:
            os.posix_fallocate(filler.fileno(), 0, free - 256 * 2**10)
        job_id = accepted.json()["id"]
        deadline = time.monotonic() + 300
        while (job := sidecar.app.state.jobs.get(job_id)).status == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert job.status == "failed" and job.error["status"] == 507, job.error
        assert str(server.shard_dir) in job.error["message"]
        assert sidecar.app.state.runner.disk.promised == 0
    (server.shard_dir / "filler").unlink()
    assert no_partial_files(server.shard_dir) == []
    assert not (server.shard_dir / f"{job_id}.h5").exists()


def _v1_body(**kw):
    body = {
        "model": "model",
        "prompt": "The harbour bridge",
        "max_tokens": 4,
        "temperature": 0,
        "kv_transfer_params": {"capture": {"layers": [0, -1], "dtype": "float32"}},
    }
    body.update(kw)
    return body


@pytest.mark.integration
def test_v1_capture_answers_shard_ids_and_urls_not_paths(server):
    chat = {
        "model": "model",
        "messages": [{"role": "user", "content": "Name a harbour."}],
        "max_tokens": 3,
        "kv_transfer_params": {"capture": {"sites": ["post_mlp"]}},
    }
    for route, body in (("/v1/completions", _v1_body()), ("/v1/chat/completions", chat)):
        r = httpx.post(f"{server.url}{route}", json=body, headers=server.headers, timeout=120)
        assert r.status_code == 200, r.text
        params = r.json()["kv_transfer_params"]
        assert "shard_path" not in params and "error_path" not in params
        assert str(server.shard_dir) not in r.text and str(server.shard_dir.parent) not in r.text
        assert params["shard_url"] == f"/shards/{params['shard_id']}"
        shard = httpx.get(f"{server.url}{params['shard_url']}", headers=server.headers, timeout=60)
        assert shard.status_code == 200 and len(shard.content) == params["bytes"]
        assert hashlib.sha256(shard.content).hexdigest() == params["sha256"]


@pytest.mark.integration
def test_v1_capture_the_connector_refuses_is_400_like_generate(server):
    """A capture id a running request holds: the connector refuses the second request, and /v1
    answers that as /generate_with_activations does (400 naming the field), not as a 200
    carrying the error; the refused request leaves no trace.

    The first request streams straight from vLLM and the second is sent after its first token,
    so the first is running then. It can still finish before the sidecar reads the second
    (a warm float32 tiny model makes 1,800 tokens in a few seconds, and a loaded 2-core
    machine can delay a request that long): then its shard exists and the sidecar answers 409
    before vLLM is asked, correctly, and the test tries again with a new id.
    """
    for attempt in range(3):
        capture_id = f"v1-refused-twice-{attempt}"
        params = {"capture": {"layers": [0], "dtype": "float32"}, "capture_id": capture_id}
        first = _v1_body(max_tokens=1800, ignore_eos=True, stream=True, kv_transfer_params=params)
        opts = {"headers": server.headers, "timeout": 120}
        url = f"{server.vllm_url}/v1/completions"
        with httpx.stream("POST", url, json=first, **opts) as stream:
            assert stream.status_code == 200, stream.read()
            lines = stream.iter_lines()
            assert any(line.startswith("data: {") for line in lines)  # a token: it is running
            sent = time.monotonic()
            second = httpx.post(
                f"{server.url}/v1/completions",
                json=_v1_body(max_tokens=2, kv_transfer_params=params),
                **opts,
            )
            answered = time.monotonic() - sent
            assert "data: [DONE]" in list(lines)
            streamed = time.monotonic() - sent
        wait_for_shard_file(server.shard_dir / f"{capture_id}.h5")
        if second.status_code == 409 and "exists" in second.text:
            print(
                f"attempt {attempt}: the first request finished before the second was read "
                f"(second answered after {answered:.1f} s, the first's stream ended after "
                f"{streamed:.1f} s)"
            )
            continue
        assert second.status_code == 400, second.text
        error = second.json()["error"]
        assert error["field"] == "kv_transfer_params.capture.capture_id", error
        assert "already in use" in error["message"] and str(server.shard_dir) not in second.text
        assert not (server.shard_dir / f"{capture_id}.error.json").exists()
        return
    raise AssertionError("each first request finished before its second was read")


def wait_for_shard_file(path: Path, timeout: float = 120.0) -> None:
    """The streamed request's shard, written after its last token."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"no shard {path.name} within {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.integration
def test_summaries_beyond_the_device_slots_get_429_at_once(server, embedded_models):
    """A sidecar that knows the engine keeps one summary slot admits one summary capture at a
    time: a second, on either route, is 429 with Retry-After before vLLM is asked (so no
    generation the connector would refuse), and leaves nothing; a server without summary
    slots answers 400 naming the field."""
    model_dir = embedded_models[MODEL]
    long = {
        "prompt": "The harbour bridge", "max_tokens": 1200, "ignore_eos": True,
        "capture": {"layers": [0], "summary": True, "tensors": False},
    }  # fmt: skip
    with InProcessSidecar(server, model_dir, Limits(), device_slots={"summary": 1}) as sidecar:
        with cf.ThreadPoolExecutor(1) as pool:
            first = pool.submit(sidecar.post, long)
            deadline = time.monotonic() + 60
            while sidecar.app.state.slots.kind_in_use["summary"] < 1:
                assert time.monotonic() < deadline and not first.done()
                time.sleep(0.02)
            before = shard_files(server)
            start = time.monotonic()
            second = sidecar.post({**long, "max_tokens": 2})
            v1 = httpx.post(
                f"{sidecar.url}/v1/completions",
                json=_v1_body(kv_transfer_params={"capture": long["capture"]}),
                headers=sidecar.headers,
                timeout=60,
            )
            seconds, first_running = time.monotonic() - start, not first.done()
            plain = sidecar.post({**long, "max_tokens": 2, "capture": {"layers": [0]}})
            assert first.result().status_code == 200, first.result().text
        assert first_running and seconds < 10, seconds  # refused at once, not after generating
        for r, field in ((second, "capture.summary"), (v1, "kv_transfer_params.capture.summary")):
            assert r.status_code == 429 and r.headers["retry-after"] == "2", r.text
            error = r.json()["error"]
            assert error["field"] == field and "--summary-slots" in error["message"], error
        assert plain.status_code == 200, plain.text  # a capture without a summary still runs
        assert sidecar.app.state.slots.kind_in_use == {"summary": 0}
        assert sidecar.app.state.slots.in_use == 0
    kept = (plain.json()["shard"]["id"], first.result().json()["shard"]["id"])
    assert [n for n in shard_files(server) - before if not n.startswith(kept)] == []
    with InProcessSidecar(server, model_dir, Limits(), device_slots={"summary": 0}) as sidecar:
        r = sidecar.post({**long, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["field"] == "capture.summary", r.text
        assert "--summary-slots 0" in r.json()["error"]["message"]


@pytest.mark.integration
def test_v1_capture_has_the_same_limits_as_generate(server, embedded_models):
    n = len(tokenize(server, prompt="The harbour bridge"))
    spec = CaptureSpec(layers=(0, -1), dtype="float32")
    estimate = spec.estimate_bytes(n, 4, 4, 128)
    limits = Limits(max_prompt_tokens=n, max_tokens=4, max_capture_bytes=estimate)
    cases = [
        (_v1_body(max_tokens=5), 413, "max_tokens", "--max-tokens-limit"),
        (_v1_body(prompt="The harbour bridge of Sydney"), 413, "prompt", "--max-prompt-tokens"),
        (
            _v1_body(kv_transfer_params={"capture": {"dtype": "float32"}}),
            413,
            "capture",
            "--max-capture-bytes",
        ),
        (_v1_body(kv_transfer_params={"capture": {"layers": [7]}}), 400, None, "0..3"),
        (_v1_body(stream=True), 400, "stream", "/generate_with_activations"),
    ]
    with InProcessSidecar(server, embedded_models[MODEL], limits) as sidecar:
        url = f"{sidecar.url}/v1/completions"
        for body, status, field, hint in cases:
            before = shard_files(server)
            r = httpx.post(url, json=body, headers=sidecar.headers, timeout=120)
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert error["field"] == (field or "kv_transfer_params.capture.layers"), error
            assert hint in error["message"], error
            assert shard_files(server) == before
        ok = httpx.post(url, json=_v1_body(), headers=sidecar.headers, timeout=120)
        assert ok.status_code == 200, ok.text
        assert sidecar.app.state.runner.disk.promised == 0
    disk = Limits(min_free_disk_bytes=2**62)
    with InProcessSidecar(server, embedded_models[MODEL], disk) as sidecar:
        before = shard_files(server)
        r = httpx.post(
            f"{sidecar.url}/v1/completions", json=_v1_body(), headers=sidecar.headers, timeout=60
        )
        assert r.status_code == 507 and "--min-free-disk-bytes" in r.json()["error"]["message"]
        assert shard_files(server) == before


SCHEMATHESIS_CONFIG = """
[checks.positive_data_acceptance]
# Valid by the schema, refused by the server's state or the tokenizer: a prompt too long in
# tokens or a capture too large (413), a full disk (507), busy (429), an id in use (409).
expected-statuses = ["2xx", "401", "403", "404", "409", "413", "429", "507"]

[checks.negative_data_rejection]
# A value over a stated server limit (max_tokens > --max-tokens-limit) is answered 413.
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428",
                     "429", "5xx"]
"""


# Rules across fields the schema does not state, refused with 400, so not generated: a negative
# index naming a layer another index names ([1, -3] of 4 layers), and `tensors: false` with
# nothing else to keep (no summary, channel_stats or teacher_logprobs).
SCHEMATHESIS_HOOKS = """
import schemathesis

NUM_LAYERS = {num_layers}


@schemathesis.hook
def filter_body(context, body):
    capture = body.get("capture") if isinstance(body, dict) else None
    if isinstance(capture, dict) and capture.get("tensors") is False:
        if not any(capture.get(k) for k in ("summary", "channel_stats", "teacher_logprobs")):
            return False
    layers = capture.get("layers") if isinstance(capture, dict) else None
    if not isinstance(layers, list):
        return True
    numbers = [x for x in layers if isinstance(x, (int, float)) and not isinstance(x, bool)]
    resolved = [int(x) % NUM_LAYERS for x in numbers if -NUM_LAYERS <= x < NUM_LAYERS]
    return len(set(resolved)) == len(resolved)
"""


@pytest.mark.integration
def test_schemathesis_finds_no_disagreement_with_the_schema(server, embedded_models, tmp_path):
    pytest.importorskip("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    hooks = tmp_path / "hooks.py"
    num_layers, _ = model_dimensions(str(embedded_models[MODEL]))
    hooks.write_text(SCHEMATHESIS_HOOKS.format(num_layers=num_layers))
    limits = Limits(max_prompt_tokens=64, max_tokens=16, max_concurrent_captures=4)
    with InProcessSidecar(server, embedded_models[MODEL], limits) as sidecar:
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("st")),
                "--config-file",
                str(config),
                "run",
                f"{sidecar.url}/openapi.json",
                "--header",
                f"Authorization: Bearer {sidecar.key}",
                "--checks",
                "all",
                "--exclude-path-regex",
                "^/v1",
                "--max-examples",
                "30",
                "--seed",
                os.environ.get("VA_SCHEMATHESIS_SEED", "1"),
                # The stateful phase stops itself at random ("no progress can be made"):
                # coverage and fuzzing are what this run is for.
                "--phases",
                "coverage,fuzzing",
                "--request-timeout",
                "120",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks)},
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout


def test_what_the_fuzzer_found_is_answered_in_the_documented_shape(tmp_path, monkeypatch):
    settings = offline_settings(tmp_path, Limits(max_tokens=16))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        # Teacher-forced requests ignore max_tokens, but not the schema's maximum for it.
        body = {"prompt": "a", "text": "b", "max_tokens": 17}
        r = client.post("/generate_with_activations", json=body, headers=KEY)
        assert r.status_code == 413 and r.json()["error"]["field"] == "max_tokens"
        schema = client.get("/openapi.json", headers=KEY).json()
        layers = schema["components"]["schemas"]["CaptureRequest"]["properties"]["layers"]
        assert layers["uniqueItems"] is True
        # vLLM refuses more than VLLM_MAX_STOP_STRINGS stop strings and an empty one: the
        # schema says so, and the sidecar answers before the engine does (found in CI).
        for stop in (["a", "b", "c", "d", "e"], "", ["a", ""]):
            r = client.post(
                "/generate_with_activations", json={"prompt": "a", "stop": stop}, headers=KEY
            )
            assert r.status_code == 422 and r.json()["error"]["field"].startswith("stop"), r.text
        stop_schema = schema["components"]["schemas"]["GenerateRequest"]["properties"]["stop"]
        assert {"type": "array", "maxItems": 4} in [
            {k: v for k, v in alt.items() if k in ("type", "maxItems")}
            for alt in stop_schema["anyOf"]
        ]

        async def broken(_request, _spec):
            raise RuntimeError("a bug")

        monkeypatch.setattr(client.app.state.runner, "prepare", broken)
        r = client.post("/generate_with_activations", json={"prompt": "a"}, headers=KEY)
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["message"] == "internal error: RuntimeError: a bug"
