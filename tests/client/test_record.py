"""`actclient record`: unit tests against an in-process fake sidecar, then end to end.

The fake sidecar (an httpx MockTransport) exercises what a healthy real server rarely does:
429 with Retry-After, a download dropped mid-stream and resumed by Range, a wrong key, a
capture left half-downloaded by a killed client. The integration tests run the real stack
(`vllm-activations serve` on the embedded SmolLM2, vLLM CPU) through build -> generate ->
record in both modes, kill the client mid-run and resume it, feed a dataset with bad lines
and bad Plus Codes, and install the client alone into a fresh venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from actclient import cli, record
from actclient.phase1.dataset import Phase1Record, build_dataset, write_jsonl
from actclient.phase1.generate import generate
from actclient.phase1.ingest import load_records
from vllm_activations.contract.shard import ShardReader, iter_shard_paths, read_shard, write_shard
from vllm_activations.contract.spec import CaptureSpec, CaptureSpecError

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO.parent / "shared" / "data" / "phase1-samples"
MAX_TOKENS = 12  # generated tokens per record: small, so 2 CPU cores keep up


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_capture_spec_from_flags() -> None:
    spec = record.capture_spec_from_flags("0,4,-1", "post_mlp", "every:2", "float32")
    assert spec == CaptureSpec(
        layers=(0, 4, -1), sites=("post_mlp",), positions="every:2", dtype="float32"
    )
    assert record.capture_spec_from_flags("all", "all", None, None) == CaptureSpec()
    for flags, field in [
        (("0,x", None, None, None), "layers"),
        (("1,1", None, None, None), "layers"),
        ((None, "resid", None, None), "sites"),
        ((None, None, "every:0", None), "positions"),
        ((None, None, None, "int8"), "dtype"),
    ]:
        with pytest.raises(CaptureSpecError) as info:
            record.capture_spec_from_flags(*flags)
        assert info.value.field == field
        assert str(info.value).startswith(f"capture.{field}:")


def test_bad_capture_flag_fails_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 9 (discard) on loopback: nothing listens, and nothing must be tried.
    rc = cli.main(
        [
            "record",
            str(tmp_path),
            "--server",
            "http://127.0.0.1:9",
            "--out",
            str(tmp_path / "o"),
            "--sites",
            "post_mlp,bogus",
        ]
    )
    assert rc == 2
    assert "capture.sites: 'bogus' is not a site" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shard_names_are_safe_and_unique() -> None:
    assert record.shard_name("sydney-opera-house.stimulate.en") == (
        "sydney-opera-house.stimulate.en.h5"
    )
    assert record.shard_name("4RRH46H4+8M_en") == "4RRH46H4+8M_en.h5"
    odd = [record.shard_name(i) for i in ("../etc/passwd", "a/b", "a b", ".hidden", "x.part")]
    assert len(set(odd)) == len(odd)
    for name in odd:
        assert "/" not in name and not name.startswith(".") and name.endswith(".h5")


def test_request_body_modes() -> None:
    rec = _records(1)[0]
    spec = CaptureSpec(layers=(0,), positions="last")
    body = record.request_body(rec, "generate", spec, max_tokens=7, seed=3)
    assert body["messages"] == rec.messages() and body["max_tokens"] == 7
    assert body["wait"] is False and body["capture"]["layers"] == [0] and body["seed"] == 3
    assert "text" not in body
    with pytest.raises(record.RecordError, match="no response"):
        record.request_body(rec, "teacher-forced", spec)
    rec.response = "Bonjour."
    body = record.request_body(rec, "teacher-forced", spec)
    assert body["text"] == "Bonjour." and "max_tokens" not in body


# ---------------------------------------------------------------------------------------------
# A fake sidecar


class _DroppedStream(httpx.AsyncByteStream):
    """Sends some bytes, then the connection drops."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self):  # type: ignore[override]
        yield self.data
        raise httpx.ReadError("connection reset by peer")


class FakeSidecar:
    """Just enough of the sidecar API, with scripted faults."""

    def __init__(
        self,
        tmp: Path,
        key: str = "fake-key",
        rate_limit_first: int = 0,
        drop_first_download: bool = False,
    ) -> None:
        self.key = key
        self.rate_limit_left = rate_limit_first
        self.drop_left = 1 if drop_first_download else 0
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.bodies: list[dict[str, Any]] = []
        self.shards: dict[str, bytes] = {}
        self._tmp = tmp
        self._n = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        self.calls.append((method, path, dict(request.headers)))
        if path == "/health":
            return httpx.Response(200, json={"status": "ok", "vllm": "ready"})
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return _error(401, "missing or wrong API key", "Authorization")
        if method == "POST" and path == "/generate_with_activations":
            if self.rate_limit_left:
                self.rate_limit_left -= 1
                return httpx.Response(
                    429,
                    headers={"Retry-After": "0"},
                    json={"error": {"status": 429, "field": None, "message": "busy"}},
                )
            self.bodies.append(json.loads(request.content))
            return self._accept(self.bodies[-1])
        if method == "GET" and path.startswith("/jobs/"):
            job = self.jobs.get(path.rsplit("/", 1)[1])
            if job is None:
                return _error(404, "no job", "id")
            job["polls"] += 1
            if job["polls"] < 2:
                return httpx.Response(
                    200, json={"id": job["id"], "status": "running", "created": 0.0}
                )
            return httpx.Response(
                200,
                json={
                    "id": job["id"],
                    "status": "succeeded",
                    "created": 0.0,
                    "result": job["result"],
                },
            )
        if method == "GET" and path == "/shards":
            listed = [
                {"id": i, "url": f"/shards/{i}", "bytes": 1, "modified": 0.0} for i in self.shards
            ]
            return httpx.Response(200, json={"shards": listed, "next_after": None})
        if path.startswith("/shards/"):
            shard_id = path.rsplit("/", 1)[1]
            if shard_id not in self.shards:
                return _error(404, "no shard", "id")
            if method == "DELETE":
                del self.shards[shard_id]
                return httpx.Response(204)
            return self._download(shard_id, request.headers.get("range"))
        return _error(404, "not found")

    def _accept(self, body: dict[str, Any]) -> httpx.Response:
        self._n += 1
        shard_id = f"cap{self._n:04d}"
        n_in = 3 + len(body["messages"][1]["content"]) % 5
        n_out = 1 if "text" in body else body["max_tokens"]
        path = write_shard(
            self._tmp / f"{shard_id}.h5",
            input_tokens=np.arange(n_in),
            output_tokens=np.arange(n_out) + 100,
            positions=np.arange(n_in + n_out - 1),
            layers=[0, 1],
            layer_outputs={"post_mlp": np.ones((2, n_in + n_out - 1, 8), np.float32)},
            dtype="float32",
        )
        data = path.read_bytes()
        self.shards[shard_id] = data
        result = {
            "id": shard_id,
            "mode": "chat",
            "text": "x",
            "finish_reason": "length",
            "input_tokens": list(range(n_in)),
            "output_tokens": list(range(100, 100 + n_out)),
            "text_start": None,
            "shard": {
                "id": shard_id,
                "url": f"/shards/{shard_id}",
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "layers": [0, 1],
                "positions": list(range(n_in + n_out - 1)),
                "sites": ["post_mlp"],
                "dtype": "float32",
            },
        }
        self.jobs[shard_id] = {"id": shard_id, "polls": 0, "result": result}
        return httpx.Response(
            202,
            json={
                "id": shard_id,
                "status": "running",
                "job_url": f"/jobs/{shard_id}",
                "shard_url": f"/shards/{shard_id}",
            },
        )

    def _download(self, shard_id: str, range_header: str | None) -> httpx.Response:
        data = self.shards[shard_id]
        headers = {"X-Content-SHA256": hashlib.sha256(data).hexdigest()}
        status, start = 200, 0
        if range_header:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if self.drop_left:
            self.drop_left -= 1
            return httpx.Response(status, headers=headers, stream=_DroppedStream(body[:100]))
        return httpx.Response(status, headers=headers, content=body)

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p, _ in self.calls if m == method and p.startswith(prefix))


def _error(status: int, message: str, field: str | None = None) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"status": status, "field": field, "message": message}}
    )


def _records(n: int, response: str | None = None) -> list[Phase1Record]:
    records = build_dataset()[:n]
    for r in records:
        r.max_tokens = 4
        r.response = response
    return records


@pytest.fixture()
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("actclient.record.transport.POLL_START_S", 0.001)
    for where in ("actclient.record.transport", "actclient.record.run"):
        monkeypatch.setattr(f"{where}.backoff", lambda attempt, hint=None: 0.0)
    monkeypatch.setattr("actclient.http.backoff", lambda attempt, hint=None: 0.0)


def _fake_run(tmp: Path, fake: FakeSidecar, records: list[Phase1Record], **options: Any):
    write_jsonl(records, tmp / "in.jsonl")
    opts = record.RecordOptions(
        spec=CaptureSpec(sites=("post_mlp",), dtype="float32"), progress=False, **options
    )
    return record.record(
        [tmp / "in.jsonl"],
        ["http://fake:8000/"],
        tmp / "out",
        opts,
        api_key=fake.key,
        transport=httpx.MockTransport(fake.handler),
    )


def _manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_fake_retries_429_resumes_dropped_download_and_reruns_nothing(
    tmp_path: Path, fast: None
) -> None:
    fake = FakeSidecar(tmp_path, rate_limit_first=2, drop_first_download=True)
    records = _records(3)
    summary = _fake_run(tmp_path, fake, records, concurrency=1)
    assert (summary.ok, summary.failed, summary.skipped) == (3, 0, 0)
    assert fake.count("POST", "/generate_with_activations") == 3 + 2  # two 429s retried
    ranged = [h for m, p, h in fake.calls if p.startswith("/shards/") and "range" in h]
    assert ranged and ranged[0]["range"] == "bytes=100-"  # resumed where the drop happened
    out = tmp_path / "out"
    entries = _manifest(out)
    assert [e["id"] for e in entries] == [r.id for r in records]
    for e in entries:
        assert e["status"] == "ok" and e["error"] is None and e["server"] == "http://fake:8000"
        data = (out / e["shard"]).read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
        assert e["tokens"] == e["input_tokens"] + e["output_tokens"]
    assert summary.tokens == sum(e["tokens"] for e in entries)
    assert summary.bytes == sum(e["bytes"] for e in entries)
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        record.shard_name(r.id) for r in records
    )

    # A rerun sends nothing; a corrupted shard is recorded again, and only that one.
    posts = fake.count("POST", "/generate_with_activations")
    again = _fake_run(tmp_path, fake, records, concurrency=1)
    assert (again.ok, again.skipped) == (0, 3)
    assert fake.count("POST", "/generate_with_activations") == posts
    bad = out / entries[1]["shard"]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    third = _fake_run(tmp_path, fake, records, concurrency=1)
    assert (third.ok, third.skipped) == (1, 2)
    last = record.read_manifest(out / "manifest.jsonl")
    assert all(e["status"] == "ok" for e in last.values()) and len(last) == 3
    assert record.shard_verifies(out, last[records[1].id])


def test_fake_wrong_key_stops_the_run(tmp_path: Path, fast: None) -> None:
    fake = FakeSidecar(tmp_path)
    write_jsonl(_records(4), tmp_path / "in.jsonl")
    opts = record.RecordOptions(progress=False, concurrency=1)
    with pytest.raises(record.FatalError, match="401") as info:
        record.record(
            [tmp_path / "in.jsonl"],
            ["http://fake:8000"],
            tmp_path / "out",
            opts,
            api_key="wrong-key-xyz",
            transport=httpx.MockTransport(fake.handler),
        )
    message = str(info.value)
    assert "wrong-key-xyz" not in message
    assert "--api-key" in message and "VLLM_ACTIVATIONS_API_KEY" in message
    # The up-front probe finds the bad key: no record is submitted, nothing is created.
    assert fake.count("POST", "/generate_with_activations") == 0
    assert not (tmp_path / "out").exists()


def test_fake_resumes_a_finished_capture_of_a_killed_run(tmp_path: Path, fast: None) -> None:
    """A capture that finished before the client was killed is downloaded, not redone."""
    fake = FakeSidecar(tmp_path)
    rec = _records(1)[0]
    response = fake._accept({"messages": rec.messages(), "max_tokens": 4})
    shard_id = response.json()["id"]
    result = fake.jobs[shard_id]["result"]
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    name = record.shard_name(rec.id)
    (shards / f".{name}.job.json").write_text(
        json.dumps({"server": "http://fake:8000", "result": result})
    )
    (shards / f".{name}.part").write_bytes(fake.shards[shard_id][:500])
    summary = _fake_run(tmp_path, fake, [rec], delete_remote=True)
    assert summary.ok == 1
    assert fake.count("POST", "/generate_with_activations") == 0
    ranged = [h["range"] for m, p, h in fake.calls if m == "GET" and "range" in h]
    assert ranged == ["bytes=500-"]
    assert shard_id not in fake.shards  # --delete-remote, after the verified download
    assert sorted(p.name for p in shards.iterdir()) == [name]
    assert _manifest(tmp_path / "out")[0]["remote_id"] == shard_id


def test_fake_rerun_tidies_the_job_file_of_a_record_killed_after_its_manifest_line(
    tmp_path: Path, fast: None
) -> None:
    """Killed between the manifest line and the job file's removal: the rerun skips the
    record and removes its leftover job and part files (CI's kill test once left one)."""
    fake = FakeSidecar(tmp_path)
    records = _records(2)
    assert _fake_run(tmp_path, fake, records).ok == 2
    shards = tmp_path / "out" / "shards"
    name = record.shard_name(records[0].id)
    (shards / f".{name}.job.json").write_text('{"server": "http://fake:8000", "result": {}}')
    (shards / f".{name}.part").write_bytes(b"stale")
    posts = fake.count("POST", "/generate_with_activations")
    again = _fake_run(tmp_path, fake, records)
    assert (again.ok, again.skipped) == (0, 2)
    assert fake.count("POST", "/generate_with_activations") == posts
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        record.shard_name(r.id) for r in records
    )


def test_fake_teacher_forced_without_response_is_skipped_in_one_line(
    tmp_path: Path, fast: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeSidecar(tmp_path)
    records = _records(5)
    records[0].response = "Welcome to the harbour."
    summary = _fake_run(tmp_path, fake, records, mode="teacher-forced")
    assert (summary.ok, summary.failed, summary.skipped_unanswered) == (1, 0, 4)
    err = capsys.readouterr().err
    assert err.count("without a response") == 1 and "skipped 4 record(s)" in err
    assert "skipped (no response to teacher-force)" in record.format_summary(summary, "out")
    manifest = (tmp_path / "out" / "manifest.jsonl").read_text()
    assert [e["id"] for e in _manifest(tmp_path / "out")] == [records[0].id]
    assert [b.get("text") for b in fake.bodies] == ["Welcome to the harbour."]
    assert fake.bodies[0]["messages"] == records[0].messages()
    # A rerun changes nothing: the recorded one is skipped, the others stay out.
    again = _fake_run(tmp_path, fake, records, mode="teacher-forced")
    assert (again.ok, again.skipped, again.skipped_unanswered) == (0, 1, 4)
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == manifest


# ---------------------------------------------------------------------------------------------
# End to end against the real server


@pytest.fixture(scope="module")
def server(servers):
    return servers.get("smollm2")


def _tokenize(server, payload: dict[str, Any]) -> list[int]:
    """Token ids from vLLM's own /tokenize (on its loopback port, behind the sidecar)."""
    r = httpx.post(f"{server.vllm_url}/tokenize", json={"model": "model", **payload}, timeout=60)
    r.raise_for_status()
    return r.json()["tokens"]


@pytest.fixture(scope="module")
def phase1(server, tmp_path_factory) -> Path:
    """build -> generate: a small Phase 1 dataset with responses, through the CLI and /v1."""
    tmp = tmp_path_factory.mktemp("phase1")
    assert cli.main(["phase1", "build", "--out", str(tmp / "prompts.jsonl")]) == 0
    loaded = load_records(tmp / "prompts.jsonl")
    assert not loaded.errors
    by_language: dict[str, Phase1Record] = {}
    for r in loaded.records:
        by_language.setdefault(r.language, r)
    chosen = list(by_language.values())[:6]
    for r in chosen:
        r.max_tokens = MAX_TOKENS
    write_jsonl(chosen, tmp / "small.jsonl")
    summary = generate(
        tmp / "small.jsonl",
        tmp / "answers.jsonl",
        server.url,
        api_key=server.api_key,
        concurrency=3,
    )
    assert (summary.done, summary.failed) == (len(chosen), 0), summary.errors
    return tmp / "answers.jsonl"


def _record_cli(server, *args: str) -> list[str]:
    return ["record", *args, "--server", server.url, "--api-key", server.api_key, "--no-progress"]


def _check_manifest(out: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Exactly one ok line per id, every shard present and matching, nothing else on disk."""
    lines = _manifest(out)
    ok = Counter(e["id"] for e in lines if e["status"] == "ok")
    assert ok == Counter(ids), ok
    last = record.read_manifest(out / "manifest.jsonl")
    for rid in ids:
        assert record.shard_verifies(out, last[rid]), rid
    on_disk = sorted(p.name for p in (out / "shards").iterdir())
    assert on_disk == sorted(record.shard_name(i) for i in ids)  # no .part/.job.json left
    return last


@pytest.mark.integration
def test_record_generate_mode(
    server, phase1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = load_records(phase1).records
    out = tmp_path / "gen"
    rc = cli.main(
        _record_cli(
            server,
            str(phase1),
            "--out",
            str(out),
            "--layers",
            "0,-1",
            "--max-tokens",
            "6",
            "--concurrency",
            "3",
        )
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert server.api_key not in err
    assert f"record: {len(records)} ok, 0 skipped" in err
    last = _check_manifest(out, [r.id for r in records])
    for r in records:
        entry = last[r.id]
        shard = read_shard(out / entry["shard"])
        prompt = _tokenize(server, {"messages": r.messages(), "add_generation_prompt": True})
        assert shard.input_tokens.tolist() == prompt
        assert 1 <= len(shard.output_tokens) <= 6
        assert shard.layers.tolist()[0] == 0 and len(shard.layers) == 2
        forwarded = len(shard.input_tokens) + len(shard.output_tokens) - 1
        assert shard.positions.tolist() == list(range(forwarded))
        assert set(shard.layer_outputs) == {"post_attention", "post_mlp"}
        assert shard.layer_outputs["post_mlp"].shape[:2] == (2, forwarded)
        assert np.isfinite(shard.layer_outputs["post_mlp"]).all()
        assert entry["input_tokens"] == len(prompt)
        assert entry["output_tokens"] == len(shard.output_tokens)
        assert entry["mode"] == "generate" and entry["server"] == server.url

    # Rerun: everything is skipped, nothing sent.
    rc = cli.main(
        _record_cli(server, str(phase1), "--out", str(out), "--layers", "0,-1", "--max-tokens", "6")
    )
    assert rc == 0
    assert f"record: 0 ok, {len(records)} skipped" in capsys.readouterr().err
    # Another capture spec into the same folder is refused rather than mixed in.
    rc = cli.main(_record_cli(server, str(phase1), "--out", str(out), "--layers", "1"))
    assert rc == 2 and "use another --out" in capsys.readouterr().err


@pytest.mark.integration
def test_record_teacher_forced_captures_prompt_plus_response(
    server, phase1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = load_records(phase1).records
    out = tmp_path / "tf"
    rc = cli.main(
        _record_cli(
            server,
            str(phase1),
            "--out",
            str(out),
            "--mode",
            "teacher-forced",
            "--sites",
            "post_mlp",
            "--dtype",
            "float32",
            "--delete-remote",
        )
    )
    assert rc == 0, capsys.readouterr().err
    last = _check_manifest(out, [r.id for r in records])
    listed = httpx.get(f"{server.url}/shards", headers=server.headers, params={"limit": 1000})
    remote = {s["id"] for s in listed.json()["shards"]}
    for r in records:
        entry = last[r.id]
        assert r.response
        prompt = _tokenize(server, {"messages": r.messages(), "add_generation_prompt": True})
        text = _tokenize(server, {"prompt": r.response, "add_special_tokens": False})
        shard = read_shard(out / entry["shard"])
        assert shard.input_tokens.tolist() == prompt + text  # exactly prompt + response
        assert entry["text_start"] == len(prompt)
        assert shard.positions.tolist() == list(range(len(prompt) + len(text)))
        assert shard.layer_outputs["post_mlp"].shape[:2] == (len(shard.layers), len(prompt + text))
        assert entry["remote_id"] not in remote  # --delete-remote
        detok = httpx.post(
            f"{server.vllm_url}/detokenize", json={"model": "model", "tokens": text}, timeout=60
        )
        assert detok.json()["prompt"] == r.response


@pytest.mark.integration
def test_record_fans_out_across_servers(
    server, phase1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two URLs of the same server share the work; an unreachable one is left out."""
    records = load_records(phase1).records
    port = server.url.rsplit(":", 1)[1]
    out = tmp_path / "fan"
    rc = cli.main(
        _record_cli(
            server,
            str(phase1),
            "--out",
            str(out),
            "--mode",
            "teacher-forced",
            "--layers",
            "0",
            "--concurrency",
            "1",
            "--server",
            f"http://localhost:{port}/",
            "--server",
            "http://127.0.0.1:9",
        )
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "leaving out a server: cannot reach http://127.0.0.1:9" in err
    last = _check_manifest(out, [r.id for r in records])
    used = Counter(e["server"] for e in last.values())
    assert set(used) == {server.url, f"http://localhost:{port}"}, used
    assert min(used.values()) >= len(records) // 2 - 1


@pytest.mark.integration
def test_record_killed_mid_run_resumes_without_loss_or_duplicates(
    server, phase1: Path, tmp_path: Path
) -> None:
    records = load_records(phase1).records
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "actclient.cli",
        *_record_cli(
            server, str(phase1), "--out", str(out), "--mode", "teacher-forced", "--concurrency", "2"
        ),
    ]
    args.remove("--api-key")
    args.remove(server.api_key)  # from the environment this time
    env = {**os.environ, "VLLM_ACTIVATIONS_API_KEY": server.api_key}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count('"status": "ok"') >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = record.read_manifest(manifest)
    assert 2 <= len(before) < len(records)

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert server.api_key not in rerun.stdout + rerun.stderr
    assert f"{len(before)} skipped" in rerun.stderr
    last = _check_manifest(out, [r.id for r in records])
    for rid, entry in before.items():
        assert last[rid] == entry  # finished records were kept, not redone
    for entry in last.values():
        shard = read_shard(out / entry["shard"])
        assert len(shard.input_tokens) == entry["input_tokens"]


@pytest.mark.integration
def test_record_bad_dataset_reports_every_error_and_records_the_rest(
    server, phase1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = load_records(phase1).records[:2]
    jsonl = tmp_path / "mixed.jsonl"
    lines = [
        good[0].to_json(),
        "{not json",
        json.dumps({"id": "bad-code", "plus_code": "4RRH46H4+8"}),
        json.dumps({"id": "bad-char", "plus_code": "IRRH46H4+8M"}),
        good[1].to_json(),
    ]
    jsonl.write_text("\n".join(lines) + "\n")
    samples = tmp_path / "samples"
    samples.mkdir()
    good_sample = "4RRH46H4+8M_en.txt"
    text = (SAMPLES / good_sample).read_text() if (SAMPLES / good_sample).exists() else ""
    (samples / good_sample).write_text(text[:300] or "Welcome to the Queen Victoria Building.")
    (samples / "46H4+8M.txt").write_text("no language in the name")
    (samples / "587G+VF_pt.txt").write_text("a short code without a reference")
    (samples / "4RRH46H4+8M_xx.txt").write_text("unknown language")
    out = tmp_path / "out"
    rc = cli.main(
        _record_cli(
            server,
            str(jsonl),
            str(samples),
            "--out",
            str(out),
            "--mode",
            "teacher-forced",
            "--layers",
            "0",
        )
    )
    err = capsys.readouterr().err
    assert rc == 1  # problems were reported
    expected_locations = [
        f"{jsonl}:2:",
        f"{jsonl}:3:",
        f"{jsonl}:4:",
        f"{samples / '46H4+8M.txt'}:1:",
        f"{samples / '587G+VF_pt.txt'}:1:",
        f"{samples / '4RRH46H4+8M_xx.txt'}:1:",
    ]
    for location in expected_locations:
        assert location in err, (location, err)
    assert "4RRH46H4+8" in err and "IRRH46H4+8M" in err  # the bad codes are named
    assert "record: 6 dataset problem(s)" in err
    _check_manifest(out, [good[0].id, good[1].id, "4RRH46H4+8M_en"])


@pytest.mark.integration
def test_client_installs_and_reads_shards_without_vllm_or_torch(
    server, phase1: Path, tmp_path: Path
) -> None:
    """`pip install` of the project alone (base dependencies only) into a fresh venv."""
    out = tmp_path / "one"
    assert (
        cli.main(
            _record_cli(
                server, str(phase1), "--out", str(out), "--layers", "0", "--max-tokens", "2"
            )
        )
        == 0
    )
    shard_path = next(iter_shard_paths(out / "shards"))
    expected = read_shard(shard_path)

    src = tmp_path / "src"  # a clean copy, so the build leaves nothing in the work tree
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.h5")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("vllm_activations", "client"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    venv = Path(tempfile.mkdtemp(dir=tmp_path, prefix="venv"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, bindir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    help_out = subprocess.run(
        [str(bindir / "actclient"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert help_out.returncode == 0, help_out.stderr
    for command in ("phase1", "record"):
        assert command in help_out.stdout
    record_help = subprocess.run(
        [str(bindir / "actclient"), "record", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert record_help.returncode == 0 and "--server" in record_help.stdout
    # The laptop install has no server extra: `serve` says which extra, in one line.
    serve = subprocess.run(
        [str(bindir / "vllm-activations"), "serve", str(REPO / "no-such-model")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert serve.returncode != 0 and "Traceback" not in serve.stderr, serve.stderr
    assert serve.stderr.strip().splitlines() == [
        "vllm-activations serve: uvicorn is missing; install the server extra: "
        "pip install 'vllm-activations[server]'"
    ]

    script = (
        "import importlib.util, json, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
        "assert importlib.util.find_spec('vllm') is None, 'vllm is installed'\n"
        "for name in ('torch', 'vllm'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        sys.exit(name + ' imported')\n"
        "import actclient.record\n"
        "from vllm_activations.contract.shard import read_shard\n"
        "s = read_shard(sys.argv[1])\n"
        "assert 'torch' not in sys.modules and 'vllm' not in sys.modules\n"
        "print(json.dumps({'input': s.input_tokens.tolist(), 'output': s.output_tokens.tolist(),"
        " 'shape': list(s.layer_outputs['post_mlp'].shape),"
        " 'sum': float(s.layer_outputs['post_mlp'].sum())}))\n"
    )
    read = subprocess.run(
        [str(py), "-c", script, str(shard_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert read.returncode == 0, read.stdout + read.stderr
    got = json.loads(read.stdout)
    assert got["input"] == expected.input_tokens.tolist()
    assert got["output"] == expected.output_tokens.tolist()
    assert got["shape"] == list(expected.layer_outputs["post_mlp"].shape)
    assert got["sum"] == pytest.approx(float(expected.layer_outputs["post_mlp"].sum()))


@pytest.mark.integration
def test_record_analyze_plan_on_smollm2(
    server, phase1: Path, embedded_models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user's path on the embedded model: record the shipped prompts (all layers, channel
    statistics on by default) -> analyze with the model (embedding rebuilt from its weights)
    -> plan with Wanda-sp neuron scores; the pictures and the widths come out."""
    model = embedded_models["smollm2"]
    out = tmp_path / "rec"
    rc = cli.main(_record_cli(server, str(phase1), "--out", str(out), "--max-tokens", "8"))
    assert rc == 0, capsys.readouterr().err
    shards = sorted((out / "shards").glob("*.h5"))
    expected_sum = 0.0
    for path in shards:
        with ShardReader(path) as reader:
            count = reader.dataset("channel_stats/mlp_intermediate/count")
            forwarded = len(reader.dataset("input_tokens")) + len(reader.dataset("output_tokens"))
            assert count.tolist() == [forwarded - 1] * 30
            expected_sum += float(reader.dataset("channel_stats/attn_heads/sum_sq").sum())
    analysis = tmp_path / "analysis"
    assert (
        cli.main(["analyze", str(out / "shards"), "--out", str(analysis), "--model", str(model)])
        == 0
    )
    for picture in ("similarity_all.png", "block_influence.png", "norms.png"):
        assert (analysis / picture).stat().st_size > 10_000, picture
    result = json.loads((analysis / "analysis.json").read_text())
    assert len(result["block_influence"]) == 30 and result["redundant_layers"] is not None
    total = np.load(analysis / "arrays" / "channel_stats_attn_heads_sum_sq.npy").sum()
    assert total == pytest.approx(expected_sum, rel=1e-6)
    plan_path = tmp_path / "plan.json"
    rc = cli.main(
        ["plan", str(analysis), "--drop", "6", "--model", str(model), "--out", str(plan_path)]
    )
    assert rc == 0, capsys.readouterr().err
    plan = json.loads(plan_path.read_text())
    neurons = plan["neurons"]
    assert neurons["mlp"]["score"].startswith("Wanda-sp")
    # SmolLM2: 1536 intermediate, 9 query heads in 3 KV groups of 3, head_dim 64.
    assert plan["widths"] == {
        "num_hidden_layers": 24,
        "intermediate_size": 1536 - round(0.2 * 1536),
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "head_dim": 64,
    }
    for entry in neurons["heads"]["layers"]:
        groups = Counter(h // 3 for h in entry["pruned"])
        assert groups == {0: 1, 1: 1, 2: 1}, entry
