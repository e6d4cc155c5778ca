"""The teacher's next-token distribution, taken from vLLM's own logprobs, aligned with a shard.

Why from the API response: vLLM computes prompt_logprobs and sampled-token logprobs in its
sampler from the raw logits (`--logprobs-mode raw_logprobs`, the default: before temperature,
top-p and penalties) and hands them only to the API server, never to a KV connector. So the
capture request asks vLLM for them (`teacher_request_fields`), the connector writes the shard
under a hidden staging name, and whoever holds the response (the sidecar, or a direct
/v1/completions caller) adds them with `finish_teacher_shard`, which publishes the shard.

Alignment: position p's activation row is the residual after reading token p, so its teacher
row is the distribution computed at p, over token p+1. vLLM's prompt_logprobs[q] (q >= 1) is
the distribution that predicted prompt token q, computed at q-1: teacher[p] =
prompt_logprobs[p+1] for p <= P-2. The generated logprobs[j] was computed at P-1+j:
teacher[P-1+j] = logprobs[j], up to the last forwarded position P+G-2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vllm_activations.contract.shard import (
    ShardReader,
    TeacherData,
    publish_with_teacher,
    staged_shard_path,
)
from vllm_activations.contract.spec import CaptureSpec

TOKEN_ID_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` rendering
# (top-K ids, top-K logprobs, logprob of the token that followed) at one position.
_Row = tuple[list[int], list[float], float]


class TeacherDataError(ValueError):
    """A completion response whose logprobs do not cover the shard's positions."""


def teacher_request_fields(spec: CaptureSpec) -> dict[str, Any]:
    """The /v1/completions fields that make vLLM return the logprobs the spec needs.

    Generated-token logprobs are always asked for (the last prompt position's distribution
    is the first sampled token's); prompt_logprobs only when prompt positions before the last
    are captured (vLLM then also skips prefix-cache reads, as capture of them must anyway).
    """
    k = spec.teacher_logprobs
    if not k:
        return {}
    fields: dict[str, Any] = {"logprobs": k, "return_tokens_as_token_ids": True}
    if spec.needs_prompt_positions:
        fields["prompt_logprobs"] = k
    return fields


def _token_id(key: str) -> int:
    if key.startswith(TOKEN_ID_PREFIX):
        return int(key[len(TOKEN_ID_PREFIX) :])
    raise TeacherDataError(
        f"logprob token {key!r} is not rendered as 'token_id:N' (the request must set "
        "return_tokens_as_token_ids)"
    )


def _prompt_row(
    entry: Mapping[str, Any], token: int, k: int
) -> tuple[list[int], list[float], float]:
    """One prompt_logprobs entry: {id: {logprob, rank, ...}} holding the top K (ranks 1..K)
    and the actual token (one more entry when it is outside the top K)."""
    items = [(int(key), value) for key, value in entry.items()]
    actual = next((v for i, v in items if i == token), None)
    if actual is None:
        raise TeacherDataError(f"prompt_logprobs entry has no logprob for token {token}")
    if len(items) == k + 1:
        items = [(i, v) for i, v in items if i != token]
    if len(items) != k:
        raise TeacherDataError(f"prompt_logprobs entry has {len(items)} tokens, expected {k}")
    items.sort(key=lambda item: item[1]["rank"])
    return [i for i, _ in items], [float(v["logprob"]) for _, v in items], float(actual["logprob"])


def _sampled_row(
    entry: Mapping[str, float], token: int, k: int
) -> tuple[list[int], list[float], float]:
    """One generated-token top_logprobs entry: {"token_id:N": logprob}, the sampled token
    first, then the top K in rank order (the sampled token once, if it is among them)."""
    items = [(_token_id(key), float(value)) for key, value in entry.items()]
    actual = next((lp for i, lp in items if i == token), None)
    if actual is None:
        raise TeacherDataError(f"logprobs entry has no logprob for sampled token {token}")
    if len(items) == k + 1:
        items = items[1:] if items[0][0] == token else [x for x in items if x[0] != token]
    if len(items) != k:
        raise TeacherDataError(f"logprobs entry has {len(items)} tokens, expected {k}")
    # No ranks in this format: order by logprob, keeping vLLM's order among ties.
    items.sort(key=lambda item: -item[1])
    return [i for i, _ in items], [lp for _, lp in items], actual


def teacher_from_choice(
    choice: Mapping[str, Any],
    input_tokens: Sequence[int],
    output_tokens: Sequence[int],
    positions: Sequence[int],
    k: int,
) -> TeacherData:
    """Teacher rows for `positions` from one /v1/completions choice (see the module doc).

    Checks that the logprobs are of the shard's own tokens (prompt and sampled), so a
    response that does not belong to the shard cannot be attached to it.
    """
    num_prompt = len(input_tokens)
    prompt_lp = choice.get("prompt_logprobs")
    sampled = choice.get("logprobs") or {}
    top = sampled.get("top_logprobs") or []
    tokens = [_token_id(t) for t in sampled.get("tokens") or []]
    if tokens != list(output_tokens)[: len(tokens)]:
        raise TeacherDataError(
            f"the response's generated tokens {tokens[:8]} are not the shard's "
            f"{list(output_tokens)[:8]}"
        )
    t, ids, lps, nxt = len(positions), [], [], []
    for p in positions:
        p = int(p)
        if p <= num_prompt - 2:
            if prompt_lp is None or len(prompt_lp) != num_prompt or prompt_lp[p + 1] is None:
                raise TeacherDataError(
                    f"position {p} needs prompt_logprobs[{p + 1}]; the response has "
                    f"{'none' if prompt_lp is None else len(prompt_lp)}"
                )
            row = _prompt_row(prompt_lp[p + 1], int(input_tokens[p + 1]), k)
        else:
            j = p - (num_prompt - 1)
            if j >= len(top) or top[j] is None:
                raise TeacherDataError(
                    f"position {p} needs the logprobs of generated token {j}; the response "
                    f"has {len(top)}"
                )
            row = _sampled_row(top[j], int(output_tokens[j]), k)
        ids.append(row[0])
        lps.append(row[1])
        nxt.append(row[2])
    shape = (t, k)
    return TeacherData(
        topk_ids=np.asarray(ids, dtype=np.int32).reshape(shape),
        topk_logprobs=np.asarray(lps, dtype=np.float32).reshape(shape),
        next_logprob=np.asarray(nxt, dtype=np.float32),
    )


def finish_teacher_shard(
    shard_path: str | os.PathLike[str], completion: Mapping[str, Any], k: int
) -> Path:
    """Add the teacher data of `completion` to the staged shard whose final name is
    `shard_path`, and publish it there (blocking file work: run it in a thread).

    The staged file must exist (the connector writes it one engine step after the response).
    """
    final = Path(shard_path)
    staged = staged_shard_path(final)
    with ShardReader(staged) as reader:
        input_tokens = reader.input_tokens.tolist()
        output_tokens = reader.output_tokens.tolist()
        positions = reader.positions.tolist()
    try:
        teacher = teacher_from_choice(
            completion["choices"][0], input_tokens, output_tokens, positions, k
        )
    except (KeyError, IndexError, TypeError) as exc:
        raise TeacherDataError(f"the completion response has no usable logprobs: {exc!r}") from exc
    return publish_with_teacher(
        staged, final, teacher, attrs={"source": "vllm prompt_logprobs / logprobs"}
    )
