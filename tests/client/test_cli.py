"""The command line as a careless new user meets it: wrong servers, bad files, odd options.

Wrong servers are real ones: Python's own file server (404 on /health, 501 on POST, an HTML
error page) and a port nothing listens on. Each must fail within 10 seconds, in one line, with
exit status 2 and nothing created.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

# The tiny checkpoint and the fake vLLM of the prune and evaluate tests.
from test_evaluate import _FakeVllm  # noqa: E402
from test_prune_safetensors import model_dir  # noqa: F401, F811 (a fixture)

from actclient.analysis import plots
from actclient.analysis.embedding import ModelFilesError, load_config, resolve_model_dir
from actclient.cli import main as actclient
from actclient.evaluate import ReferenceText, evaluate
from actclient.http import describe, is_retryable, request_with_retries
from actclient.phase1.dataset import build_dataset, write_jsonl
from actclient.prune import LayerSelection, prune_checkpoint
from vllm_activations.process import free_loopback_port


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def file_server(tmp_path):
    """A plain HTTP file server (not vLLM, not the sidecar) serving an empty folder."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def records(tmp_path) -> Path:
    path = tmp_path / "phase1.jsonl"
    write_jsonl(build_dataset()[:3], path)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    code = actclient(argv)
    return code, capsys.readouterr().err, time.monotonic() - start


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "<html" not in err.lower()
    return lines[0]


# ---------------------------------------------------------------- wrong servers fail fast


def test_record_against_a_plain_http_server_fails_fast_and_creates_nothing(
    file_server, records, tmp_path, capsys
):
    out = tmp_path / "out"
    code, err, seconds = _run(
        ["record", str(records), "--server", file_server, "-o", str(out)], capsys
    )
    assert code == 2 and seconds < 10
    line = _one_line(err)
    assert "is not a vllm-activations server" in line and "HTTP 404" in line
    assert not out.exists()


def test_record_against_nothing_listening_creates_nothing(records, tmp_path, capsys):
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{free_loopback_port()}"
    code, err, seconds = _run(["record", str(records), "--server", url, "-o", str(out)], capsys)
    assert code == 2 and seconds < 10
    assert "cannot reach" in _one_line(err)
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "phase1-generate"])
def test_openai_commands_against_a_plain_http_server_fail_fast(
    command, file_server, records, tmp_path, capsys
):
    if command == "evaluate":
        argv = ["evaluate", "--server", file_server, "-o", str(tmp_path / "r.json")]
    else:
        argv = ["phase1", "generate", str(records), "--server", file_server]
        argv += ["-o", str(tmp_path / "answered.jsonl")]
    code, err, seconds = _run(argv, capsys)
    assert code == 2 and seconds < 10
    line = _one_line(err)
    assert "is not a vLLM or vllm-activations server" in line and "HTTP 404" in line
    assert list(tmp_path.glob("r.json")) == [] and not (tmp_path / "answered.jsonl").exists()


class _VllmWithAnotherKey(SimpleHTTPRequestHandler):
    """A server that looks like vLLM (/health 200) but wants a key the client does not have."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        ok = self.path == "/health"
        body = b"" if ok else b'{"error": {"message": "Unauthorized"}}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        raise AssertionError("the probe must stop the command before any POST")


@pytest.mark.parametrize("command", ["evaluate", "phase1-generate"])
def test_openai_commands_with_a_wrong_key_fail_fast_naming_the_key_settings(
    command, records, tmp_path, capsys
):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VllmWithAnotherKey)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    if command == "evaluate":
        argv = ["evaluate", "--server", url, "-o", str(tmp_path / "r.json")]
    else:
        argv = ["phase1", "generate", str(records), "--server", url]
        argv += ["-o", str(tmp_path / "answered.jsonl")]
    try:
        code, err, seconds = _run([*argv, "--api-key", "not-the-key"], capsys)
    finally:
        server.shutdown()
    assert code == 2 and seconds < 10
    line = _one_line(err)
    assert "refuses the key" in line and "HTTP 401" in line, line
    assert "--api-key" in line and "VLLM_ACTIVATIONS_API_KEY" in line
    assert "not-the-key" not in line
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "answered.jsonl").exists()


def test_a_url_the_client_cannot_speak_fails_at_once(capsys):
    code, err, seconds = _run(["evaluate", "--server", "ftp://example.invalid"], capsys)
    assert code == 2 and seconds < 5
    assert "http:// or https://" in _one_line(err)


def test_permanent_answers_are_not_retried():
    for status in (400, 401, 403, 404, 405, 409, 413, 422, 501):
        assert not is_retryable(status), status
    for status in (408, 429, 500, 502, 503, 504, 520, 524):
        assert is_retryable(status), status
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(501, text="<html><head><title>501 Unsupported</title></head>...")

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await request_with_retries(client, "POST", "http://x/generate_with_activations")

    response = asyncio.run(go())
    assert response.status_code == 501 and len(calls) == 1
    assert describe(response) == "HTTP 501: 501 Unsupported"


def test_error_bodies_are_one_line_and_401_names_the_key_settings():
    page = "<!DOCTYPE html>\n<html>\n<body>\n<h1>Error response</h1>\n" + "x " * 500 + "</body>"
    text = describe(httpx.Response(404, text=page))
    assert "\n" not in text and len(text) < 230 and text.startswith("HTTP 404: Error response")
    sidecar = httpx.Response(
        401, json={"error": {"status": 401, "field": "Authorization", "message": "wrong key"}}
    )
    assert describe(sidecar) == (
        "HTTP 401: wrong key (give the server's key with --api-key or $VLLM_ACTIVATIONS_API_KEY)"
    )
    vllm = httpx.Response(400, json={"error": {"message": "bad model", "type": "x"}})
    assert describe(vllm) == "HTTP 400: bad model"


# ---------------------------------------------------------------- bad input: exit 2, one line


def test_record_of_a_missing_dataset_is_bad_input(tmp_path, capsys):
    argv = ["record", str(tmp_path / "nope.jsonl"), "--server", "http://127.0.0.1:9", "-o"]
    code, err, _ = _run([*argv, str(tmp_path / "out")], capsys)
    assert code == 2 and "no such dataset file or folder" in _one_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_analyze_without_shards_says_so(where, tmp_path, capsys):
    shards = tmp_path / "shards"
    if where == "empty":
        shards.mkdir()
    out = tmp_path / "analysis"
    code, err, _ = _run(["analyze", str(shards), "-o", str(out)], capsys)
    line = _one_line(err)
    assert code == 2 and f"{shards}: no *.h5 shards" in line, line
    assert not out.exists()


def test_plan_of_a_file_that_is_not_json_names_the_file(tmp_path, capsys):
    bad = tmp_path / "analysis.json"
    bad.write_text("not json at all")
    code, err, _ = _run(["plan", str(bad), "--drop", "2"], capsys)
    line = _one_line(err)
    assert code == 2 and str(bad) in line and "not an `actclient analyze` result" in line


@pytest.mark.parametrize("content", ["not json at all", "[1, 2]", '{"schema": "other"}'])
def test_evaluate_reference_that_is_not_a_result_names_the_file(content, tmp_path, capsys):
    bad = tmp_path / "dense.json"
    bad.write_text(content)
    url = f"http://127.0.0.1:{free_loopback_port()}"
    code, err, seconds = _run(["evaluate", "--server", url, "--reference", str(bad)], capsys)
    line = _one_line(err)
    assert code == 2 and seconds < 5
    assert f"{bad}: not an `actclient evaluate` result" in line, line


@pytest.fixture
def analysis_30_layers(tmp_path) -> Path:
    """Just enough of an analysis for the plan's size checks (a 30-layer model)."""
    path = tmp_path / "analysis.json"
    path.write_text(
        json.dumps(
            {"by_tokens": {}, "layers": list(range(30)), "model_config": {"num_hidden_layers": 30}}
        )
    )
    return path


@pytest.mark.parametrize(
    "option, message",
    [
        (["--drop", "-3"], "--drop must be at least 1, got -3"),
        (["--drop", "0"], "--drop must be at least 1, got 0"),
        (["--target-layers", "31"], "--target-layers must be 1..29 (the model has 30 layers)"),
        (["--target-layers", "30"], "--target-layers must be 1..29"),
        (["--target-layers", "0"], "--target-layers must be 1..29"),
    ],
)
def test_plan_sizes_out_of_range_say_so(analysis_30_layers, option, message, capsys):
    code, err, _ = _run(["plan", str(analysis_30_layers), *option], capsys)
    line = _one_line(err)
    assert code == 2 and message in line and "protected" not in line


def test_an_output_path_that_is_a_directory_is_bad_input(tmp_path, capsys):
    out = tmp_path / "a-directory"
    out.mkdir()
    code, err, _ = _run(["phase1", "build", "-o", str(out)], capsys)
    line = _one_line(err)
    assert code == 2 and str(out) in line and "directory" in line.lower()


def test_a_bad_places_file_is_named(tmp_path, capsys):
    places = tmp_path / "places.json"
    places.write_text("{oops")
    code, err, _ = _run(
        ["phase1", "build", "--places", str(places), "-o", str(tmp_path / "x.jsonl")], capsys
    )
    line = _one_line(err)
    assert code == 2 and str(places) in line and "not JSON" in line


def test_evaluate_rejects_concurrency_zero_like_record(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_loopback_port()}"
    code, err, seconds = _run(["evaluate", "--server", url, "--concurrency", "0"], capsys)
    assert code == 2 and seconds < 2
    assert "--concurrency must be at least 1, got 0" in _one_line(err)


# ---------------------------------------------------------------- conventions


def test_python_m_actclient_runs_the_same_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "actclient", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "record" in result.stdout and "evaluate" in result.stdout


def _commands() -> list[list[str]]:
    """Every leaf command of `actclient` (e.g. ["phase1", "build"]), read from its parser, so
    a command added later is checked too."""
    import argparse

    from actclient.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [prefix]
        return [c for name, p in subs[0].choices.items() for c in leaves(p, [*prefix, name])]

    return leaves(build_parser(), [])


# What each command is for, when it runs long enough to want a progress bar.
LONG_COMMANDS = {
    "phase1 generate", "record", "export-kd", "analyze", "crosscheck", "prune", "evaluate"
}  # fmt: skip


def test_the_command_list_is_what_this_file_checks():
    names = {" ".join(c) for c in _commands()}
    assert names == LONG_COMMANDS | {"phase1 build", "plan"}


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_takes_o_for_out(command, capsys):
    with pytest.raises(SystemExit):
        actclient([*command, "--help"])
    text = capsys.readouterr().out
    assert re.search(r"-o [A-Z]+, --out [A-Z]+", text), text


@pytest.mark.parametrize("command", sorted(LONG_COMMANDS))
def test_long_commands_take_no_progress(command, capsys):
    with pytest.raises(SystemExit):
        actclient([*command.split(), "--help"])
    assert "--no-progress" in capsys.readouterr().out


def test_model_may_be_a_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-32B-FP8"
    (repo / "snapshots" / "old1").mkdir(parents=True)
    (repo / "snapshots" / "main2").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("main2\n")
    assert resolve_model_dir("Qwen/Qwen3-32B-FP8") == repo / "snapshots" / "main2"
    (repo / "snapshots" / "main2" / "config.json").write_text('{"num_hidden_layers": 64}')
    assert load_config("Qwen/Qwen3-32B-FP8") == {"num_hidden_layers": 64}  # analyze's reader
    assert resolve_model_dir(tmp_path) == tmp_path  # a folder is itself
    with pytest.raises(ModelFilesError, match="hf download Org/missing"):
        resolve_model_dir("Org/missing")
    with pytest.raises(ModelFilesError, match="no such model directory"):
        resolve_model_dir(tmp_path / "nope")


def test_missing_pictures_name_the_plots_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    assert plots.render({}, {}, tmp_path) == []
    assert "[plots] extra" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_prune_and_evaluate_draw_a_progress_bar_when_asked(model_dir, tmp_path, capsys):  # noqa: F811
    prune_checkpoint(model_dir, tmp_path / "pruned", LayerSelection([1], {}), progress=True)
    assert "prune [" in capsys.readouterr().err
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        texts = [
            ReferenceText("a", "The bridge opened in May 1937."),
            ReferenceText("b", "It was."),
        ]
        url = f"http://127.0.0.1:{server.server_address[1]}"
        evaluate(url, texts, api_key="k", progress=True)
    finally:
        server.shutdown()
    assert "evaluate [" in capsys.readouterr().err
