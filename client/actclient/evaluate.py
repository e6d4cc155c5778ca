"""`actclient evaluate`: teacher-forced surprisal of reference texts through a vLLM server.

Each text goes to `POST /v1/completions` with `prompt_logprobs: 0` and `max_tokens: 1`: vLLM
then returns, for every prompt token after the first, the log-probability the model gave it
given the tokens before it (one forward pass, nothing generated matters). Surprisal is
`-logprob` in nats; a text's perplexity is `exp(mean surprisal)` over its tokens after the
first. The same server tokenizer serves the dense and the pruned models (pruning never
touches it), so every model is scored on the same tokens.

Factual tokens (a heuristic, from the decoded token strings; no tokenizer is needed here):
tokens that overlap a word that contains a digit (numbers, years, dates), is a capitalised
month name (also at a sentence start; "may" the verb is not one), or starts with a capital
letter and is not the first word of a sentence (proper nouns; "I" is not counted). Sentences
end at . ! ? : ; or a line break. A proper noun that opens a sentence is missed; that is the
price of needing no tagger.

The user's pass rules, checked against a dense reference (`--reference`):
- mean perplexity (mean over texts of each text's perplexity) at most 20% above the dense;
- factual-token surprisal (mean over all factual tokens) under 2x the dense. The maximum
  factual surprisal is reported too, but it is one token out of thousands and bounded by
  about log(vocabulary), so a 2x rule on it would hardly ever fail.
A text with perplexity above 1000 is a catastrophic case.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from actclient.http import (
    RetriesExhausted,
    ServerCheckFailed,
    api_base,
    api_key_from,
    auth_headers,
    describe,
    probe,
    request_with_retries,
)
from actclient.progress import Progress

RESULT_SCHEMA = "actclient.evaluate/1"
DEFAULT_TEXTS = Path(__file__).parent / "data" / "heldout_tour_texts.jsonl"
CATASTROPHIC_PPL = 1000.0
MAX_PPL_INCREASE = 0.20
MAX_FACTUAL_RATIO = 2.0
DEFAULT_CONCURRENCY = 4
REQUEST_TIMEOUT_S = 600.0
MONTHS = frozenset(
    "january february march april may june july august september october november december".split()
)
_WORD = re.compile(r"[^\W_](?:[\w'’.,-]*[^\W_])?")
_SENTENCE_BREAK = re.compile(r"[.!?:;\n]")


class EvaluateError(RuntimeError):
    """The evaluation cannot run or finish; the message says why."""


@dataclass(frozen=True)
class ReferenceText:
    id: str
    text: str
    title: str = ""


@dataclass
class TextResult:
    """Surprisal of one text: per token and summarised."""

    id: str
    tokens: int  # scored tokens (all but the first)
    mean_surprisal: float
    perplexity: float
    factual_tokens: int
    factual_mean_surprisal: float | None
    factual_max_surprisal: float | None
    factual_max_token: str | None
    token_ids: list[int]  # every prompt token, the unscored first one included
    token_strings: list[str]
    surprisal: list[float]  # nats, per scored token
    factual: list[bool]


def load_texts(path: str | Path) -> list[ReferenceText]:
    """A JSONL file of {"id", "text", "title"?} objects."""
    path = Path(path)
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvaluateError(f"{path}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            texts.append(ReferenceText(str(item["id"]), str(item["text"]), item.get("title", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise EvaluateError(f"{path}:{n}: expected a JSON object with id and text") from exc
    if not texts:
        raise EvaluateError(f"{path}: no texts")
    return texts


def factual_mask(tokens: Sequence[str]) -> list[bool]:
    """Which tokens (decoded strings, in order) belong to factual words; see the module doc."""
    text = "".join(tokens)
    bounds = []
    start = 0
    for token in tokens:
        bounds.append((start, start + len(token)))
        start += len(token)
    factual_spans = []
    previous_end = None
    for match in _WORD.finditer(text):
        word = match.group()
        # A word opens a sentence when it is the first, or the gap before it holds a break.
        sentence_start = previous_end is None or bool(
            _SENTENCE_BREAK.search(text, previous_end, match.start())
        )
        previous_end = match.end()
        if (
            any(c.isdigit() for c in word)
            or (word.lower() in MONTHS and word[:1].isupper())
            or (word[:1].isupper() and not sentence_start and word != "I")
        ):
            factual_spans.append((match.start(), match.start() + len(word)))
    mask = []
    k = 0
    for begin, end in bounds:
        while k < len(factual_spans) and factual_spans[k][1] <= begin:
            k += 1
        mask.append(k < len(factual_spans) and factual_spans[k][0] < end and begin < end)
    return mask


def perplexity(surprisal: Sequence[float]) -> float:
    """exp of the mean surprisal (nats); inf when it overflows."""
    mean = sum(surprisal) / len(surprisal)
    return math.exp(mean) if mean < 700 else math.inf


def text_result(
    text_id: str,
    tokens: Sequence[str],
    surprisal: Sequence[float],
    token_ids: Sequence[int] = (),
) -> TextResult:
    """Summary of one text. `tokens` are all decoded tokens, the first (unscored) one
    included so that word boundaries are right; `surprisal` is for tokens[1:]."""
    if not surprisal:
        raise EvaluateError(f"{text_id}: fewer than two tokens, nothing to score")
    if len(tokens) != len(surprisal) + 1:
        raise EvaluateError(f"{text_id}: {len(tokens)} tokens for {len(surprisal)} surprisals")
    scored = list(tokens[1:])
    mask = factual_mask(tokens)[1:]
    facts = [(s, t) for s, t, f in zip(surprisal, scored, mask, strict=True) if f]
    worst = max(facts) if facts else None
    return TextResult(
        id=text_id,
        tokens=len(surprisal),
        mean_surprisal=sum(surprisal) / len(surprisal),
        perplexity=perplexity(surprisal),
        factual_tokens=len(facts),
        factual_mean_surprisal=sum(s for s, _ in facts) / len(facts) if facts else None,
        factual_max_surprisal=worst[0] if worst else None,
        factual_max_token=worst[1] if worst else None,
        token_ids=list(token_ids),
        token_strings=scored,
        surprisal=list(surprisal),
        factual=mask,
    )


def parse_prompt_logprobs(
    choice: dict[str, Any], text: str
) -> tuple[list[int], list[str], list[float]]:
    """(token ids, decoded tokens, surprisal of tokens[1:]) from a completions choice.

    vLLM gives no entry (and so no decoded string) for the first prompt token; its string is
    what is left of `text` before the other tokens' strings (empty when they do not match,
    e.g. a BOS token was added).
    """
    ids = choice.get("prompt_token_ids")
    entries = choice.get("prompt_logprobs")
    if not ids or entries is None or len(entries) != len(ids):
        raise EvaluateError(
            "the server returned no prompt_logprobs / prompt_token_ids; is it vLLM (0.32) "
            "with the OpenAI completions API?"
        )
    tokens, surprisal = [], []
    for token_id, entry in zip(ids[1:], entries[1:], strict=True):
        info = (entry or {}).get(str(token_id))
        if info is None:
            raise EvaluateError(f"the server returned no logprob for prompt token {token_id}")
        tokens.append(info.get("decoded_token") or "")
        surprisal.append(-float(info["logprob"]))
    rest = "".join(tokens)
    first = text[: len(text) - len(rest)] if text.endswith(rest) else ""
    return list(ids), [first, *tokens], surprisal


def summarize(results: Sequence[TextResult]) -> dict[str, Any]:
    """Corpus-level numbers over the per-text results."""
    all_s = [s for r in results for s in r.surprisal]
    facts = [s for r in results for s, f in zip(r.surprisal, r.factual, strict=True) if f]
    worst = max(
        (r for r in results if r.factual_max_surprisal is not None),
        key=lambda r: r.factual_max_surprisal,
        default=None,
    )
    return {
        "texts": len(results),
        "tokens": len(all_s),
        "mean_perplexity": sum(r.perplexity for r in results) / len(results),
        "token_perplexity": perplexity(all_s),
        "mean_surprisal": sum(all_s) / len(all_s),
        "factual_tokens": len(facts),
        "factual_mean_surprisal": sum(facts) / len(facts) if facts else None,
        "factual_max_surprisal": worst.factual_max_surprisal if worst else None,
        "factual_max_where": (
            {"text": worst.id, "token": worst.factual_max_token} if worst else None
        ),
        "catastrophic": [r.id for r in results if r.perplexity > CATASTROPHIC_PPL],
    }


def compare(summary: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Ratios to the dense reference's summary and the user's pass rules."""
    ppl_ratio = summary["mean_perplexity"] / reference["mean_perplexity"]

    def ratio(key: str) -> float | None:
        if summary.get(key) is None or not reference.get(key):
            return None
        return summary[key] / reference[key]

    factual_ratio = ratio("factual_mean_surprisal")
    rules = {
        "perplexity": {
            "rule": f"mean perplexity at most {MAX_PPL_INCREASE:.0%} above the dense model",
            "value": ppl_ratio,
            "pass": ppl_ratio <= 1 + MAX_PPL_INCREASE,
        },
        "factual": {
            "rule": f"mean factual-token surprisal under {MAX_FACTUAL_RATIO:g}x the dense model",
            "value": factual_ratio,
            "pass": factual_ratio is not None and factual_ratio < MAX_FACTUAL_RATIO,
        },
    }
    return {
        "mean_perplexity_ratio": ppl_ratio,
        "token_perplexity_ratio": ratio("token_perplexity"),
        "factual_mean_surprisal_ratio": factual_ratio,
        "factual_max_surprisal_ratio": ratio("factual_max_surprisal"),
        "rules": rules,
        "pass": all(r["pass"] for r in rules.values()) and not summary["catastrophic"],
    }


async def _served_model(client: httpx.AsyncClient, base: str) -> tuple[str, str | None]:
    """(served model name, model path the server loaded) from GET /v1/models."""
    response = await request_with_retries(client, "GET", f"{base}/v1/models")
    if response.status_code != 200:
        raise EvaluateError(f"GET /v1/models: {describe(response)}")
    data = response.json().get("data") or []
    if not data:
        raise EvaluateError("the server lists no models")
    return str(data[0]["id"]), data[0].get("root")


async def _score_text(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    text: ReferenceText,
    gate: asyncio.Semaphore,
    bar: Progress,
) -> TextResult:
    body = {
        "model": model,
        "prompt": text.text,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
        "return_token_ids": True,
    }
    async with gate:
        response = await request_with_retries(client, "POST", f"{base}/v1/completions", json=body)
    if response.status_code != 200:
        raise EvaluateError(f"{text.id}: POST /v1/completions: {describe(response)}")
    ids, tokens, surprisal = parse_prompt_logprobs(response.json()["choices"][0], text.text)
    bar.update(1)
    return text_result(text.id, tokens, surprisal, ids)


async def evaluate_async(
    server: str,
    texts: Sequence[ReferenceText],
    *,
    api_key: str | None = None,
    model: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Score every text on one server; the result dict that `evaluate` writes as JSON.
    `progress`: a bar over the texts (None: only on a terminal)."""
    if concurrency < 1:
        raise EvaluateError(f"--concurrency must be at least 1, got {concurrency}")
    base = api_base(server)
    async with httpx.AsyncClient(
        headers=auth_headers(api_key), timeout=REQUEST_TIMEOUT_S
    ) as client:
        try:
            await probe(client, base, "openai")
        except ServerCheckFailed as exc:
            raise EvaluateError(str(exc)) from None
        served, root = await _served_model(client, base)
        gate = asyncio.Semaphore(concurrency)
        with Progress(len(texts), desc="evaluate", unit="text", enabled=progress) as bar:
            results = await asyncio.gather(
                *(_score_text(client, base, model or served, t, gate, bar) for t in texts)
            )
    return {
        "schema": RESULT_SCHEMA,
        "server": base,
        "model": model or served,
        "model_path": root,
        "summary": summarize(results),
        "per_text": [asdict(r) for r in results],
    }


def evaluate(
    server: str,
    texts: Sequence[ReferenceText],
    *,
    api_key: str | None = None,
    model: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    reference: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Score every text; with a reference result, add the ratios and the pass rules."""
    try:
        result = asyncio.run(
            evaluate_async(
                server,
                texts,
                api_key=api_key,
                model=model,
                concurrency=concurrency,
                progress=progress,
            )
        )
    except (RetriesExhausted, httpx.HTTPError) as exc:
        raise EvaluateError(f"{server}: {exc}") from exc
    if reference is not None:
        result["reference_model_path"] = reference.get("model_path")
        result["comparison"] = compare(result["summary"], reference["summary"])
    return result


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table per text, then the summary and (with a reference) the verdict."""
    lines = [f"{'text':32s} {'tokens':>6s} {'ppl':>9s} {'fact':>5s} {'fact max':>8s}  worst"]
    for r in result["per_text"]:
        lines.append(
            f"{r['id'][:32]:32s} {r['tokens']:6d} {r['perplexity']:9.2f} "
            f"{r['factual_tokens']:5d} {_fmt(r['factual_max_surprisal']):>8s}  "
            f"{r['factual_max_token']!r}"
        )
    s = result["summary"]
    lines += [
        "",
        f"model {result['model']} ({result.get('model_path')}): {s['texts']} texts, "
        f"{s['tokens']} tokens",
        f"mean perplexity {s['mean_perplexity']:.3f} (token-level {s['token_perplexity']:.3f})",
        f"factual tokens {s['factual_tokens']}: mean surprisal "
        f"{_fmt(s['factual_mean_surprisal'], '.3f')} nats, max "
        f"{_fmt(s['factual_max_surprisal'], '.3f')} nats {s['factual_max_where']}",
        f"catastrophic (ppl > {CATASTROPHIC_PPL:g}): {s['catastrophic'] or 'none'}",
    ]
    c = result.get("comparison")
    if c:
        lines.append(
            f"vs dense: mean perplexity x{c['mean_perplexity_ratio']:.3f}, factual surprisal "
            f"mean x{_fmt(c['factual_mean_surprisal_ratio'], '.3f')}, max "
            f"x{_fmt(c['factual_max_surprisal_ratio'], '.3f')}"
        )
        for rule in c["rules"].values():
            verdict = "PASS" if rule["pass"] else "FAIL"
            lines.append(f"  {verdict}  {rule['rule']} (x{_fmt(rule['value'], '.3f')})")
        lines.append(f"  overall: {'PASS' if c['pass'] else 'FAIL'}")
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    try:
        texts = load_texts(args.texts)
        reference = None
        if args.reference:
            try:
                reference = json.loads(Path(args.reference).read_text())
            except json.JSONDecodeError as exc:
                raise EvaluateError(
                    f"{args.reference}: not an `actclient evaluate` result (not JSON: {exc})"
                ) from None
            if not isinstance(reference, dict) or reference.get("schema") != RESULT_SCHEMA:
                raise EvaluateError(f"{args.reference}: not an `actclient evaluate` result")
        result = evaluate(
            args.server,
            texts,
            api_key=api_key_from(args.api_key),
            model=args.model,
            concurrency=args.concurrency,
            reference=reference,
            progress=False if args.no_progress else None,
        )
    except (EvaluateError, OSError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    result["texts_path"] = str(args.texts)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(format_report(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `evaluate` to the top-level `actclient` parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="teacher-forced surprisal of reference texts on a vLLM server (dense or pruned)",
        description="Score reference texts through the server's /v1/completions "
        "prompt_logprobs: perplexity per text, surprisal on factual tokens, catastrophic "
        "cases; with --reference (a dense model's result) the ratios and the pass rules.",
    )
    p.add_argument("--server", required=True, help="server URL, e.g. http://localhost:8000")
    p.add_argument(
        "--texts",
        default=str(DEFAULT_TEXTS),
        metavar="PATH",
        help="JSONL of {id, text} (default: the shipped held-out tour texts)",
    )
    p.add_argument("--model", help="served model name (default: the server's first model)")
    p.add_argument("--api-key", help="API key (default: $VLLM_ACTIVATIONS_API_KEY)")
    p.add_argument("-o", "--out", metavar="PATH", help="write the result JSON here")
    p.add_argument(
        "--reference", metavar="PATH", help="a dense model's result JSON: adds ratios and verdict"
    )
    p.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a TTY")
    p.set_defaults(func=_evaluate)
