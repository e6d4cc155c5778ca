"""`actclient evaluate` math: factual tokens, perplexity, vLLM's prompt_logprobs, pass rules."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from actclient.cli import main as actclient
from actclient.evaluate import (
    DEFAULT_TEXTS,
    EvaluateError,
    compare,
    factual_mask,
    format_report,
    load_texts,
    parse_prompt_logprobs,
    perplexity,
    summarize,
    text_result,
)
from actclient.phase1.dataset import load_places


def _factual(tokens: list[str]) -> list[str]:
    return [t for t, f in zip(tokens, factual_mask(tokens), strict=True) if f]


def test_factual_tokens_numbers_dates_and_proper_nouns() -> None:
    tokens = ["The", " Tower", " of", " London", " opened", " in", " ", "1", "0", "7", "8", "."]
    assert _factual(tokens) == [" Tower", " London", "1", "0", "7", "8"]
    # sentence starts are not proper nouns; months and "I" follow their own rules
    tokens = ["It", " fell", " on", " 9", " November", ".", " It", " was", " cold", " and", " I"]
    assert _factual(tokens) == [" 9", " November"]
    tokens = ["May", " be", " built", " in", " may", " by", " Gaud", "i", ":", " Sag", "rada"]
    assert _factual(tokens) == ["May", " Gaud", "i"]
    # a comma inside a number stays in the word; punctuation after it does not
    assert _factual(["About", " 1", ",", "280", " metres", ","]) == [" 1", ",", "280"]
    assert _factual(["The", " 86", "th", " floor"]) == [" 86", "th"]
    assert factual_mask([]) == []


def test_perplexity_and_text_summary() -> None:
    assert perplexity([math.log(4.0)] * 3) == pytest.approx(4.0)
    assert perplexity([800.0]) == math.inf
    tokens = ["In", " 1889", " Paris", " was", " busy"]
    result = text_result("t", tokens, [1.0, 3.0, 2.0, 2.0], [5, 6, 7, 8, 9])
    assert result.tokens == 4 and result.token_ids == [5, 6, 7, 8, 9]
    assert result.mean_surprisal == pytest.approx(2.0)
    assert result.perplexity == pytest.approx(math.exp(2.0))
    assert result.factual == [True, True, False, False]
    assert result.factual_mean_surprisal == pytest.approx(2.0)
    assert (result.factual_max_surprisal, result.factual_max_token) == (3.0, " Paris")
    with pytest.raises(EvaluateError):
        text_result("short", ["One"], [])


def test_summary_mean_of_text_perplexities_and_catastrophic() -> None:
    a = text_result("a", ["x", " y", " z"], [math.log(2.0), math.log(8.0)])  # ppl 4
    b = text_result("b", ["x", " 7"], [math.log(2000.0)])  # ppl 2000, one factual token
    s = summarize([a, b])
    assert s["mean_perplexity"] == pytest.approx((4.0 + 2000.0) / 2)
    assert s["token_perplexity"] == pytest.approx((2 * 8 * 2000) ** (1 / 3))
    assert s["catastrophic"] == ["b"] and s["factual_tokens"] == 1
    assert s["factual_max_where"] == {"text": "b", "token": " 7"}


def test_parse_vllm_prompt_logprobs() -> None:
    # The shape vLLM 0.32 returns for prompt_logprobs=0 with return_token_ids=true.
    choice = {
        "prompt_token_ids": [504, 18669, 282],
        "prompt_logprobs": [
            None,
            {"18669": {"logprob": -16.5, "rank": 27671, "decoded_token": " Tower"}},
            {"282": {"logprob": -0.25, "rank": 1, "decoded_token": " of"}},
        ],
    }
    ids, tokens, surprisal = parse_prompt_logprobs(choice, "The Tower of")
    assert ids == [504, 18669, 282]
    assert tokens == ["The", " Tower", " of"] and surprisal == [16.5, 0.25]
    # a BOS the text does not contain leaves the first string empty
    assert parse_prompt_logprobs(choice, "Tower of")[1][0] == ""
    with pytest.raises(EvaluateError, match="prompt_logprobs"):
        parse_prompt_logprobs({"prompt_token_ids": [1, 2]}, "x")


def test_pass_rules() -> None:
    dense = {"mean_perplexity": 10.0, "factual_mean_surprisal": 2.0, "catastrophic": []}
    ok = compare({**dense, "mean_perplexity": 11.9, "factual_mean_surprisal": 3.9}, dense)
    assert ok["pass"] and ok["mean_perplexity_ratio"] == pytest.approx(1.19)
    worse = compare({**dense, "mean_perplexity": 12.1}, dense)
    assert not worse["pass"] and not worse["rules"]["perplexity"]["pass"]
    forgetful = compare({**dense, "factual_mean_surprisal": 4.0}, dense)
    assert not forgetful["pass"] and forgetful["rules"]["perplexity"]["pass"]
    assert not compare({**dense, "catastrophic": ["a"]}, dense)["pass"]


def test_report_prints_the_verdict() -> None:
    r = text_result("a", ["x", " 7", " y"], [1.0, 2.0])
    s = summarize([r])
    result = {"model": "m", "per_text": [r.__dict__], "summary": s, "comparison": compare(s, s)}
    text = format_report(result)
    assert "PASS  mean perplexity at most 20%" in text and "overall: PASS" in text


def test_shipped_heldout_texts_are_held_out() -> None:
    texts = load_texts(DEFAULT_TEXTS)
    assert len(texts) >= 16 and len({t.id for t in texts}) == len(texts)
    places = load_places()
    banned = {p["name_en"].lower() for p in places} | {p["city"].lower() for p in places}
    for line in DEFAULT_TEXTS.read_text().splitlines():
        item = json.loads(line)
        assert item["city"].lower() not in banned and item["title"].lower() not in banned
        assert 80 <= len(item["text"].split()) <= 150
        assert item["text"].isascii()


class _FakeVllm(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions with prompt_logprobs, as vLLM 0.32 answers them."""

    scale = 1.0  # surprisal multiplier: 1.0 plays the dense model

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        assert self.headers["Authorization"] == "Bearer k"
        self._send({"data": [{"id": "model", "root": "/models/m"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["prompt_logprobs"] == 0 and body["max_tokens"] == 1
        words = body["prompt"].split(" ")
        tokens = [words[0]] + [" " + w for w in words[1:]]
        entries = [None] + [
            {str(i): {"logprob": -self.scale * (1 + i % 3), "rank": 1, "decoded_token": t}}
            for i, t in enumerate(tokens[1:], 1)
        ]
        choice = {"prompt_token_ids": list(range(len(tokens))), "prompt_logprobs": entries}
        self._send({"choices": [{**choice, "text": "x"}]})


def test_cli_against_a_fake_server(tmp_path, capsys) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        json.dumps({"id": "a", "text": "The bridge opened in May 1937 near Paris."})
        + "\n"
        + json.dumps({"id": "b", "text": "It was long. Visitors came from London daily."})
        + "\n"
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        base = ["evaluate", "--server", url, "--texts", str(texts), "--api-key", "k"]
        assert actclient([*base, "--out", str(tmp_path / "dense.json")]) == 0
        _FakeVllm.scale = 1.5
        out = tmp_path / "pruned.json"
        assert (
            actclient([*base, "--reference", str(tmp_path / "dense.json"), "--out", str(out)]) == 0
        )
    finally:
        _FakeVllm.scale = 1.0
        server.shutdown()
    result = json.loads(out.read_text())
    assert result["model"] == "model" and result["model_path"] == "/models/m"
    first = result["per_text"][0]
    assert first["token_strings"][0] == " bridge" and first["token_ids"][0] == 0
    assert [t for t, f in zip(first["token_strings"], first["factual"], strict=True) if f] == [
        " May",
        " 1937",
        " Paris.",
    ]
    comparison = result["comparison"]
    assert comparison["factual_mean_surprisal_ratio"] == pytest.approx(1.5)
    assert not comparison["rules"]["perplexity"]["pass"] and comparison["rules"]["factual"]["pass"]
    assert "overall: FAIL" in capsys.readouterr().out
