"""Request and response models of the sidecar API; they are also its OpenAPI schema.

The capture fields mirror `vllm_activations.contract.spec.CaptureSpec` (the one definition of what a
spec means); these models only describe the JSON shape, the spec class does the validation.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from vllm_activations.contract.spec import DTYPES, POSITION_MODES, SITES

# The `positions` grammar of CaptureSpec (K a positive integer, leading zeros allowed).
POSITIONS_PATTERN = r"^(all|prompt|generated|last|every:0*[1-9][0-9]*)$"
assert {m.split(":")[0] for m in POSITION_MODES} == {"all", "prompt", "generated", "last", "every"}
# Inside torch.Generator's range, and exact as a JSON number (OpenAPI tools read floats).
SEED_MIN, SEED_MAX = -(2**53), 2**53
# vLLM's own limit on stop strings (`VLLM_MAX_STOP_STRINGS`, default 4, read the same way), and
# it refuses an empty one; stated here so the schema matches what the engine accepts.
MAX_STOP_STRINGS = int(os.environ.get("VLLM_MAX_STOP_STRINGS", "4"))
StopString = Annotated[str, Field(min_length=1)]


def _not_a_bool(value: Any) -> Any:
    # JSON true/false are not numbers (pydantic would read them as 1/0); 3.0 still is.
    if isinstance(value, bool):
        raise ValueError("an integer is needed, not true/false")
    return value


def _integral_float_as_int(value: Any) -> Any:
    # JSON Schema's integer includes 13.0; CaptureSpec's checks want an int.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_not_a_bool)]
LayerIndex = Integer
Site = Literal["post_attention", "post_mlp"]
Dtype = Literal["bfloat16", "float16", "float32"]
assert set(Site.__args__) == set(SITES) and set(Dtype.__args__) == set(DTYPES)


class CaptureRequest(BaseModel):
    """What to record; see CaptureSpec. Omitted fields: all layers, both sites, all
    positions, bfloat16, no channel statistics."""

    model_config = ConfigDict(extra="forbid")

    layers: list[LayerIndex] | None = Field(
        None,
        min_length=1,
        description="decoder layer indices (negative count from the end); null = all",
        json_schema_extra={"uniqueItems": True},  # CaptureSpec refuses duplicates (400)
    )
    sites: list[Site] | None = Field(
        None,
        min_length=1,
        description="residual-stream sites per layer",
        json_schema_extra={"uniqueItems": True},
    )
    positions: str | None = Field(
        None,
        description="'all', 'prompt', 'generated', 'last' or 'every:K' (K >= 1)",
        # Stated, not checked here: CaptureSpec answers a bad value with the allowed ones.
        json_schema_extra={"pattern": POSITIONS_PATTERN},
        examples=["all", "every:4"],
    )
    dtype: Dtype | None = Field(None, description="storage dtype of the shard")
    channel_stats: StrictBool | None = Field(
        None,
        description="also record per-channel count/sum/sum of squares of the down_proj and "
        "o_proj inputs (width-pruning statistics) for every captured layer",
    )
    # Any: CaptureSpec checks it, so 0, 2.5 or "3" get one 400 that names the server's limit.
    teacher_logprobs: Annotated[Any, BeforeValidator(_integral_float_as_int)] = Field(
        None,
        description="K: also keep, at every captured position, the served model's top-K "
        "next-token ids and logprobs and the logprob of the token that followed (vLLM's own "
        "prompt_logprobs / logprobs); K from 1 to the server's --max-logprobs",
        json_schema_extra={"type": "integer", "minimum": 1},
    )
    summary: StrictBool | None = Field(
        None,
        description="also accumulate on the device every token sum the layer analysis needs "
        "(the shard's summary/ group: megabytes whatever the length)",
    )
    tensors: StrictBool | None = Field(
        None,
        description="store the raw layer outputs (default true); false with summary, "
        "channel_stats or teacher_logprobs keeps only those",
    )


class TextPart(BaseModel):
    """One part of a message's content (the served models read text only)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart]


class GenerateRequest(BaseModel):
    """Exactly one of `prompt` (raw text) or `messages` (chat template applied); add `text`
    to teacher-force: capture over the prompt followed by `text`, generating nothing (the
    sampling fields are then ignored)."""

    # Stated for generated clients and fuzzers; the server checks it in `check_inputs` (400).
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )

    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    text: str | None = Field(
        None, min_length=1, description="continuation to teacher-force after the prompt"
    )
    max_tokens: Integer = Field(
        16, ge=1, description="the server's `--max-tokens-limit` is stated as the maximum"
    )
    temperature: Annotated[float, Field(ge=0, le=2), BeforeValidator(_not_a_bool)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1), BeforeValidator(_not_a_bool)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX), BeforeValidator(_not_a_bool)] | None = (
        None
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = (
        Field(None, description="stop strings (vLLM's VLLM_MAX_STOP_STRINGS bounds the list)")
    )
    ignore_eos: StrictBool = Field(False, description="keep generating past end-of-sequence")
    capture: CaptureRequest = Field(default_factory=CaptureRequest)
    wait: StrictBool = Field(
        True, description="false: answer 202 at once with a job URL (for long requests)"
    )

    @property
    def mode(self) -> str:
        if self.text is not None:
            return "teacher_forced"
        return "chat" if self.messages is not None else "generate"


class ShardInfo(BaseModel):
    id: str
    url: str = Field(description="GET it to download the HDF5 file (Range supported)")
    bytes: int
    sha256: str
    layers: list[int]
    positions: list[int] = Field(description="absolute token positions captured")
    sites: list[Site]
    dtype: Dtype
    teacher_logprobs: int | None = Field(
        None, description="K of the shard's teacher/ datasets; null when not recorded"
    )


class Timings(BaseModel):
    tokenize_s: float
    generate_s: float
    shard_wait_s: float
    sha256_s: float
    total_s: float


class GenerateResponse(BaseModel):
    id: str = Field(description="the capture id, also the shard id and the job id")
    mode: Literal["generate", "chat", "teacher_forced"]
    text: str = Field(description="generated text")
    input_tokens: list[int] = Field(description="token ids forwarded as the prompt")
    output_tokens: list[int] = Field(
        description="generated token ids, as in the shard (teacher-forced: the one token "
        "sampled after `text`; it is never forwarded, so it has no activations)"
    )
    text_start: int | None = Field(
        None, description="teacher-forced: index in input_tokens where `text` begins"
    )
    finish_reason: str | None
    shard: ShardInfo
    timings: Timings


class ErrorDetail(BaseModel):
    status: int
    field: str | None = Field(description="the request field at fault, dotted")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobAccepted(BaseModel):
    id: str
    status: Literal["running"]
    job_url: str
    shard_url: str


class JobStatus(BaseModel):
    id: str
    status: Literal["running", "succeeded", "failed"]
    created: float
    finished: float | None = None
    result: GenerateResponse | None = None
    error: ErrorDetail | None = None


class ShardListItem(BaseModel):
    id: str
    url: str
    bytes: int
    modified: float = Field(description="modification time, seconds since the epoch")
    sha256: str | None = Field(None, description="known once computed (after capture)")


class ShardList(BaseModel):
    shards: list[ShardListItem]
    next_after: str | None = Field(description="pass as `after` for the next page; null at end")


class Health(BaseModel):
    status: Literal["ok", "starting"]
    vllm: str
    # Who tokenizes capture requests: the sidecar's own copy of the model's tokenizer
    # ("local", after it gave vLLM's ids for every probe), vLLM's /tokenize ("vllm"), or
    # not settled yet ("checking").
    tokenizer: Literal["local", "vllm", "checking"] = "vllm"
