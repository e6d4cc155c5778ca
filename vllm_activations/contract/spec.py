"""The per-request capture spec: which layers, sites, positions and storage dtype to record,
and how many of the teacher's top next-token logprobs to keep per position.

One definition shared by the vLLM plugin (server side), the HTTP sidecar and the client. Pure
Python: it imports without vllm, torch or numpy. Every validation error names the field and the
values it allows, so an HTTP 400 can pass the message through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A capture id is also a shard file name: the connector and the sidecar check the same rule.
CAPTURE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

SITES: tuple[str, ...] = ("post_attention", "post_mlp")
DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
POSITION_MODES: tuple[str, ...] = ("all", "prompt", "generated", "last", "every:K")
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
SPEC_FIELDS: tuple[str, ...] = (
    "layers",
    "sites",
    "positions",
    "dtype",
    "channel_stats",
    "teacher_logprobs",
    "summary",
    "tensors",
)
# vLLM's default `--max-logprobs`: the largest teacher_logprobs a default server accepts.
DEFAULT_MAX_LOGPROBS = 20
# Shard bytes per captured position for teacher_logprobs K: K int32 ids + K float32 logprobs,
# plus the float32 logprob of the token that followed.
TEACHER_BYTES_PER_K = 8
TEACHER_BYTES_PER_POSITION = 4
# Channel statistics: the inputs of down_proj and o_proj (width pruning: Wanda, FLAP,
# Minitron neuron and head importance) and the outputs of both RMSNorms of each layer, i.e.
# the inputs of gate_up_proj and qkv_proj (Minitron hidden-size importance).
CHANNEL_KINDS: tuple[str, ...] = ("mlp_intermediate", "attn_heads", "mlp_norm", "attn_norm")

# Capture-spec field -> the `vllm-activations serve` flag that sizes its pool of device slots
# (allocated with the model). The connector hands the slots out; the sidecar counts them too,
# so a request beyond them is refused before it runs, in the same words.
SLOT_FLAGS: dict[str, str] = {
    "summary": "--summary-slots",
    "channel_stats": "--channel-stats-slots",
}
SLOTS_BUSY = "slots are in use"  # what marks the busy message as retryable (429)


def no_slots_message(kind: str) -> str:
    """Why a capture asking for `kind` cannot run on this server at all (400)."""
    return f"this server keeps no {kind} slots (started with {SLOT_FLAGS[kind]} 0)"


def busy_slots_message(kind: str, count: int) -> str:
    """Why a capture asking for `kind` cannot run now (429: all `count` slots are taken)."""
    return (
        f"all {count} {kind} {SLOTS_BUSY} by running captures; retry later (raise it with "
        f"`vllm-activations serve {SLOT_FLAGS[kind]}`; each slot holds device memory)"
    )


class CaptureSpecError(ValueError):
    """A capture spec that cannot be honoured; `field` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"capture.{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class CaptureSpec:
    """What to record for one request.

    layers: decoder layer indices (None = all layers of the model); negative indices count
        from the end, as in Python.
    sites: residual-stream sites per layer: `post_attention` (residual after the attention
        add) and/or `post_mlp` (residual after the MLP add, i.e. the layer output).
    positions: `all` forwarded positions, `prompt` positions, `generated` (forwarded positions
        of generated tokens), `last` forwarded position, or `every:K` (positions p with p % K == 0).
    dtype: storage dtype of the shard.
    channel_stats: also record per-channel statistics (count, sum, sum of squares over every
        token the request forwards) of the MLP intermediate activation (the input of
        down_proj) and the attention head outputs (the input of o_proj), for every captured
        layer: the inputs of width pruning. Turns off prefix-cache reads for the request.
    teacher_logprobs: K, or None for none: also keep, for every captured position, the
        served model's top-K next-token ids and logprobs and the logprob of the token that
        followed, as vLLM's own prompt_logprobs / logprobs return them (the `teacher/`
        datasets of the shard, filled in by the sidecar).
    summary: also accumulate, on the device, every token sum the layer analysis needs (site
        cosines and their squares, boundary angles, norms, update ratios, channel moments,
        massive activations; for all, content and last tokens) over the kept positions of
        the captured layers, into the shard's `summary/` group (vllm_activations/summary.py).
        Like channel_stats, turns off prefix-cache reads for the request.
    tensors: store the raw layer outputs (`layer_outputs/`); false keeps only what else was
        asked for (summary, channel statistics, teacher data): megabytes, not gigabytes.
    """

    layers: tuple[int, ...] | None = None
    sites: tuple[str, ...] = SITES
    positions: str = "all"
    dtype: str = "bfloat16"
    channel_stats: bool = False
    teacher_logprobs: int | None = None
    summary: bool = False
    tensors: bool = True
    every: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
                raise CaptureSpecError("layers", "must be a list of integers or null for all")
            layers = tuple(self.layers)
            if not layers:
                raise CaptureSpecError("layers", "must not be empty (use null for all layers)")
            for x in layers:
                if isinstance(x, bool) or not isinstance(x, int):
                    raise CaptureSpecError("layers", f"{x!r} is not an integer layer index")
            if len(set(layers)) != len(layers):
                raise CaptureSpecError("layers", "contains duplicates")
            object.__setattr__(self, "layers", layers)
        if isinstance(self.sites, str) or not isinstance(self.sites, Iterable):
            raise CaptureSpecError("sites", f"must be a list drawn from {list(SITES)}")
        sites = tuple(self.sites)
        if not sites:
            raise CaptureSpecError("sites", f"must not be empty; allowed: {list(SITES)}")
        for s in sites:
            if s not in SITES:
                raise CaptureSpecError("sites", f"{s!r} is not a site; allowed: {list(SITES)}")
        if len(set(sites)) != len(sites):
            raise CaptureSpecError("sites", "contains duplicates")
        # Canonical order, so shards from equal specs have equal layouts.
        object.__setattr__(self, "sites", tuple(s for s in SITES if s in sites))
        if self.dtype not in DTYPES:
            raise CaptureSpecError(
                "dtype", f"{self.dtype!r} is not allowed; allowed: {list(DTYPES)}"
            )
        object.__setattr__(self, "every", _parse_positions(self.positions))
        if not isinstance(self.channel_stats, bool):
            raise CaptureSpecError(
                "channel_stats", f"{self.channel_stats!r} is not allowed; allowed: true, false"
            )
        check_teacher_logprobs(self.teacher_logprobs)
        for name in ("summary", "tensors"):
            if not isinstance(getattr(self, name), bool):
                raise CaptureSpecError(
                    name, f"{getattr(self, name)!r} is not allowed; allowed: true, false"
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CaptureSpec:
        """Build a spec from JSON-like data, rejecting unknown fields by name."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise CaptureSpecError(
                "(spec)", "must be an object with fields " + ", ".join(SPEC_FIELDS)
            )
        unknown = sorted(set(data) - set(SPEC_FIELDS))
        if unknown:
            raise CaptureSpecError(
                unknown[0], f"unknown field; allowed fields: {', '.join(SPEC_FIELDS)}"
            )
        kwargs: dict[str, Any] = {}
        if data.get("layers") is not None:
            kwargs["layers"] = data["layers"]
        if data.get("sites") is not None:
            kwargs["sites"] = data["sites"]
        if data.get("positions") is not None:
            kwargs["positions"] = data["positions"]
        if data.get("dtype") is not None:
            kwargs["dtype"] = data["dtype"]
        if data.get("channel_stats") is not None:
            kwargs["channel_stats"] = data["channel_stats"]
        if data.get("teacher_logprobs") is not None:
            kwargs["teacher_logprobs"] = data["teacher_logprobs"]
        for name in ("summary", "tensors"):
            if data.get(name) is not None:
                kwargs[name] = data[name]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers) if self.layers is not None else None,
            "sites": list(self.sites),
            "positions": self.positions,
            "dtype": self.dtype,
            "channel_stats": self.channel_stats,
            "teacher_logprobs": self.teacher_logprobs,
            "summary": self.summary,
            "tensors": self.tensors,
        }

    def resolve_layers(self, num_layers: int) -> list[int]:
        """Absolute, ascending layer indices for a model with `num_layers` decoder layers."""
        if self.layers is None:
            return list(range(num_layers))
        out = []
        for x in self.layers:
            idx = x + num_layers if x < 0 else x
            if not 0 <= idx < num_layers:
                raise CaptureSpecError(
                    "layers",
                    f"{x} is out of range; this model has {num_layers} layers "
                    f"(allowed: 0..{num_layers - 1} or -{num_layers}..-1)",
                )
            out.append(idx)
        if len(set(out)) != len(out):
            raise CaptureSpecError("layers", "names the same layer twice")
        return sorted(out)

    @property
    def needs_prompt_positions(self) -> bool:
        """Whether the shard holds prompt positions other than the last one, i.e. positions a
        prefix-cache hit would never recompute (vLLM always recomputes the last prompt token).
        """
        return self.positions not in ("generated", "last")

    @property
    def skips_prefix_cache(self) -> bool:
        """Whether the request must recompute its whole prompt: prompt positions are recorded,
        or channel statistics, which are defined over every token of the request."""
        return self.needs_prompt_positions or self.channel_stats

    def keeps_position(self, position, num_prompt_tokens: int):
        """Whether a forwarded position is recorded (`last` is resolved when the request ends).

        `position` is an int or an integer numpy array (elementwise answer): the connector
        asks once per step for all of a request's rows.
        """
        mode = self.positions
        if mode == "prompt":
            return position < num_prompt_tokens
        if mode == "generated":
            return position >= num_prompt_tokens
        if self.every:
            return position % self.every == 0
        return position >= 0

    def expected_positions(self, num_prompt_tokens: int, num_output_tokens: int) -> list[int]:
        """The positions a complete shard holds: forwarded positions are 0..P+G-2."""
        forwarded = num_prompt_tokens + max(num_output_tokens, 1) - 1
        if self.positions == "last":
            return [forwarded - 1]
        return [p for p in range(forwarded) if self.keeps_position(p, num_prompt_tokens)]

    def estimate_bytes(
        self, num_prompt_tokens: int, max_new_tokens: int, num_layers: int, hidden_size: int
    ) -> int:
        """Upper bound of a shard's activation and teacher bytes, known before the request
        runs (what capture limits are checked against): every position `expected_positions`
        can hold."""
        positions = len(self.expected_positions(num_prompt_tokens, max_new_tokens))
        layers = len(self.resolve_layers(num_layers))
        activations = positions * layers * len(self.sites) * hidden_size * DTYPE_BYTES[self.dtype]
        if not self.tensors:
            activations = 0
        summary = self.summary_bytes(layers, hidden_size) if self.summary else 0
        return activations + summary + positions * self.teacher_bytes_per_position

    def summary_bytes(self, layers: int, hidden_size: int) -> int:
        """Bytes of the `summary/` group for `layers` captured layers, whatever the length:
        per population, 3 site-pair matrices and the boundary angles (float64), 4 per-site
        sums, and per (site, channel) sum, sum of squares (float64), max |x| (float32) and
        massive counts (int32)."""
        sites = 1 + layers * len(self.sites)
        boundaries = 1 + (layers if "post_mlp" in self.sites else 0)
        per_population = 8 * (3 * sites * sites + boundaries * boundaries + 4 * sites)
        per_population += sites * hidden_size * (8 + 8 + 4 + 4) + 8 * sites + 8
        return 3 * per_population

    @property
    def teacher_bytes_per_position(self) -> int:
        """Shard bytes of the `teacher/` datasets per captured position (0 without them)."""
        if not self.teacher_logprobs:
            return 0
        return self.teacher_logprobs * TEACHER_BYTES_PER_K + TEACHER_BYTES_PER_POSITION


def check_teacher_logprobs(value: object, max_logprobs: int | None = None) -> int | None:
    """Validate `teacher_logprobs`: None (off) or an integer K from 1 to `max_logprobs`, the
    server's `--max-logprobs` (None: not known here, so only K >= 1 is checked; -1: vLLM's
    "no limit"). The message names the limit, so the sidecar can answer it as a 400."""
    if value is None:
        return None
    if max_logprobs is None:
        allowed = "allowed: an integer from 1 to the server's --max-logprobs"
    elif max_logprobs < 0:
        allowed = "allowed: an integer from 1 (this server sets no --max-logprobs limit)"
    else:
        allowed = (
            f"allowed: an integer from 1 to {max_logprobs} (this server's --max-logprobs; "
            "raise it with `vllm-activations serve --max-logprobs N`)"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise CaptureSpecError("teacher_logprobs", f"{value!r} is not an integer; {allowed}")
    if value < 1 or (max_logprobs is not None and 0 <= max_logprobs < value):
        raise CaptureSpecError("teacher_logprobs", f"{value} is out of range; {allowed}")
    return value


def _parse_positions(value: object) -> int:
    """Validate `positions`; return K for `every:K`, else 0."""
    allowed = f"allowed: {list(POSITION_MODES)} with K a positive integer"
    if not isinstance(value, str):
        raise CaptureSpecError("positions", f"{value!r} is not a string; {allowed}")
    if value in ("all", "prompt", "generated", "last"):
        return 0
    if value.startswith("every:"):
        k = value.split(":", 1)[1]
        if k.isdigit() and int(k) > 0:
            return int(k)
    raise CaptureSpecError("positions", f"{value!r} is not allowed; {allowed}")


def validate_capture_id(capture_id: object) -> str:
    """A capture id is a file name stem: letters, digits, '.', '_', '-', at most 128 chars."""
    if not isinstance(capture_id, str) or not CAPTURE_ID_RE.fullmatch(capture_id):
        raise CaptureSpecError(
            "capture_id",
            f"{capture_id!r} is not allowed; use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit",
        )
    return capture_id
