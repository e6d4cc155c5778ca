"""The sidecar's own tokenizer: the served model's, checked against vLLM's before it is used.

Every capture request needs its exact prompt token ids before anything runs (the token and
capture-byte limits, teacher forcing's `text_start`). vLLM's `/tokenize` answers that, but a
round trip to vLLM's API server waits behind whatever that server is doing: 64 concurrent
captures on a 2-core machine waited 0.2-0.9 s each (`bench/bench_capture.py` run H), where
the same chat template and tokenizer take about 1 ms in this process. So the sidecar loads
the model's Hugging Face tokenizer and uses it, but only:

- when `serve` left tokenization to the model's own files (no vLLM flag that changes the
  tokenizer or the chat template: `cli.TOKENIZER_FLAGS`);
- after it produced exactly vLLM's ids for every probe of `PROBES` (a prompt with special
  characters and a special token's text, a teacher-forced text, and system, user and
  assistant turns through the chat template), asked of vLLM's `/tokenize` once vLLM is up;
  any difference, or any error, and the sidecar keeps asking vLLM;
- for the request shapes the probes cover: a string prompt, or messages that are all
  `{role, content}` with string content (anything else, such as content parts or tool
  calls, goes to vLLM, whose chat parser normalises it);
- and a local error (a template that raises) falls back to vLLM, so errors keep vLLM's words.

It renders messages as vLLM does for a model without a chat-template flag: the template in
the tokenizer's files with `add_generation_prompt`, then encodes the text without adding
special tokens (the template has them); a prompt is encoded with them, a `text` without.
"""

from __future__ import annotations

from typing import Any

PROBE_TEXT = "Tour stop 8FVC9G8F+6W: the harbour, 1887. Ünïcode, 你好, tabs\tand  spaces!\n"
PROBES: tuple[dict[str, Any], ...] = (
    {"prompt": PROBE_TEXT, "add_special_tokens": True},
    {"prompt": " and the bridge <|im_end|> after it.", "add_special_tokens": False},
    {
        "messages": [
            {"role": "system", "content": "You are a tour guide."},
            {"role": "user", "content": PROBE_TEXT},
            {"role": "assistant", "content": "The harbour opened in 1887."},
            {"role": "user", "content": "And the bridge?"},
        ],
        "add_generation_prompt": True,
    },
    {"messages": [{"role": "user", "content": "Hello"}], "add_generation_prompt": True},
)


def local_shape(payload: dict[str, Any]) -> bool:
    """Whether a /tokenize payload is one the probes cover (else vLLM answers it)."""
    if "prompt" in payload:
        return isinstance(payload["prompt"], str)
    messages = payload.get("messages")
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and isinstance(m["role"], str)
            and isinstance(m["content"], str)
            for m in messages
        )
    )


class LocalTokenizer:
    """The served model's Hugging Face tokenizer, answering /tokenize payloads."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, model: str, revision: str | None = None) -> LocalTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model, revision=revision))

    def encode(self, payload: dict[str, Any]) -> list[int]:
        """Token ids of a /tokenize payload (`prompt` + `add_special_tokens`, or `messages` +
        `add_generation_prompt`) as vLLM's /tokenize gives them."""
        tok = self.tokenizer
        if "messages" in payload:
            text = tok.apply_chat_template(
                payload["messages"],
                add_generation_prompt=bool(payload.get("add_generation_prompt", True)),
                tokenize=False,
            )
            return list(tok.encode(text, add_special_tokens=False))
        special = bool(payload.get("add_special_tokens", True))
        return list(tok.encode(payload["prompt"], add_special_tokens=special))


def disagreements(local: LocalTokenizer, answers: list[list[int] | None]) -> list[str]:
    """The probes (by index, with the first differing position) where `local` does not give
    vLLM's ids `answers` (None: vLLM refused the probe)."""
    out = []
    for index, (probe, remote) in enumerate(zip(PROBES, answers, strict=True)):
        if remote is None:
            out.append(f"probe {index}: vLLM refused it")
            continue
        try:
            mine = local.encode(probe)
        except Exception as exc:  # a template that raises: vLLM's answer is the truth
            out.append(f"probe {index}: {type(exc).__name__}: {exc}")
            continue
        if mine != remote:
            at = next(
                (i for i, (a, b) in enumerate(zip(mine, remote, strict=False)) if a != b),
                min(len(mine), len(remote)),
            )
            out.append(f"probe {index}: ids differ from position {at}")
    return out
