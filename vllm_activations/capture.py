"""Model side of capture: a custom op that copies each decoder layer's residual stream into a
preallocated, fixed-address buffer, and capture variants of vLLM's Qwen3/Qwen2/Llama models.

Why a custom op: vLLM compiles the model with torch.compile (fullgraph) and, on GPU, replays it
as CUDA graphs, so Python forward hooks silently stop firing. An op registered with
`direct_register_custom_op(mutates_args=["buffer"])` is opaque to Inductor, runs in program
order and is recorded into graphs like any kernel. It copies right after a layer returns,
before the next layer's fused add+RMSNorm (in place on GPU) can overwrite `h` and `residual`.

Buffer layout: [max_num_batched_tokens, 2 * num_layers, hidden], token-major, model dtype.
Column 2*l holds layer l's post-attention residual; column 2*l+1 its post-MLP residual
(`h + residual`, the layer's output). Row i is the i-th token of the current forward batch;
the KV connector (connector.py) maps rows to requests and positions after each forward.

Channel statistics (width pruning): a second op on the inputs of every layer's down_proj (the
MLP intermediate activation) and o_proj (the attention heads' outputs) adds each token's
channels, and their squares, into the float32 slot of the request that owns the token, found
on the device from the token's KV slot and a block -> slot table the connector refreshes before
each forward. Raw tensors of these widths (25600 per layer for Qwen3-32B) are never stored.
Slots are few (`VLLM_ACTIVATIONS_CHANNEL_STATS_SLOTS`, default 16; 0 turns the op off).

Summary capture adds two copies to the forward (layer 0's input, the embedding, and the token
ids); its arithmetic runs after the forward, outside CUDA graphs, in the connector's
`wait_for_save` (summary.py), so steps without a summary request pay nothing for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.library import Library
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_activations.contract.spec import CHANNEL_KINDS
from vllm_activations.plugin import (
    CHANNEL_STATS_SLOTS_ENV,
    DEFAULT_CHANNEL_STATS_SLOTS,
    DEFAULT_LAST_TOKEN_SLOTS,
    DEFAULT_SUMMARY_SLOTS,
    LAST_TOKEN_SLOTS_ENV,
    PLUGIN_CONFIG_KEY,
    SUMMARY_SLOTS_ENV,
)
from vllm_activations.residual_copy import (
    accumulate_channels,
    copy_residuals,
    copy_residuals_fake,
    record_rows,
)
from vllm_activations.summary import SummaryState

_LIB = Library("vllm_activations", "FRAGMENT")
logger = logging.getLogger("vllm_activations.capture")
# Device-side gather and host staging of captured rows are bounded to this many bytes per
# chunk, allocated with the buffer (so vLLM's memory profiling counts them).
STAGING_BYTES = 256 * 2**20


def _graph_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _capture_residuals_op(
    hidden_states: torch.Tensor, residual: torch.Tensor, buffer: torch.Tensor, slot: int
) -> None:
    # Eager steps (CPU, --enforce-eager, batches beyond the CUDA-graph sizes) copy only the
    # layers some scheduled request captures; a CUDA graph records every copy unconditionally.
    if _STATE is not None and not _STATE.wanted[slot // 2] and not _graph_capturing():
        return
    copy_residuals(hidden_states, residual, buffer, slot)


direct_register_custom_op(
    op_name="capture_residuals",
    op_func=_capture_residuals_op,
    mutates_args=["buffer"],
    fake_impl=copy_residuals_fake,
    target_lib=_LIB,
)


def _forward_slot_mapping() -> torch.Tensor | None:
    """This forward's KV slot per token (one KV cache group), or None outside a forward."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    mapping = get_forward_context().slot_mapping
    if not mapping:
        return None
    if isinstance(mapping, list):
        raise RuntimeError("vllm-activations does not support micro-batching (--enable-dbo)")
    return next(iter(mapping.values()))


def _record_rows_op(
    positions: torch.Tensor, row_positions: torch.Tensor, row_slots: torch.Tensor
) -> None:
    # Always, captured or not: the connector attributes rows (and checks completeness) from
    # them. Under CUDA graphs the slot mapping read here is the runner's persistent buffer.
    record_rows(positions, _forward_slot_mapping(), row_positions, row_slots)


def _record_rows_fake(positions, row_positions, row_slots) -> None:
    return None


direct_register_custom_op(
    op_name="record_rows",
    op_func=_record_rows_op,
    mutates_args=["row_positions", "row_slots"],
    fake_impl=_record_rows_fake,
    target_lib=_LIB,
)


def _summary_running() -> SummaryState | None:
    summary = _STATE.summary if _STATE is not None else None
    if summary is None or not summary.bound:
        return None  # profiling and warm-up runs before the KV cache exists
    if not summary.active and not _graph_capturing():
        return None
    return summary


def _record_embedding_op(hidden_states: torch.Tensor, embedding: torch.Tensor) -> None:
    # Layer 0's input is the embedding output: the summary's first site.
    if _summary_running() is not None:
        embedding[: hidden_states.shape[0]].copy_(hidden_states)


def _record_tokens_op(input_ids: torch.Tensor, tokens: torch.Tensor) -> None:
    # Token ids decide the `content` population (special tokens are not content).
    if _summary_running() is not None:
        tokens[: input_ids.shape[0]].copy_(input_ids)


def _no_output(*args) -> None:
    return None


for _name, _func, _mutated in (
    ("record_embedding", _record_embedding_op, "embedding"),
    ("record_tokens", _record_tokens_op, "tokens"),
):
    direct_register_custom_op(
        op_name=_name,
        op_func=_func,
        mutates_args=[_mutated],
        fake_impl=_no_output,
        target_lib=_LIB,
    )


@dataclass
class ChannelStatsState:
    """Per-request channel statistics on the device: slot s < `slots` belongs to one running
    request, slot `slots` is the trash every other token is added to.

    sums/sum_sqs[kind]: [num_layers, slots + 1, channels of this TP rank] float32;
    abs_sums[kind]: the same shape, sums of |x|; lasts[kind]: each slot's most recent token
    (taken out again when async scheduling forwarded one token past the request's end);
    counts: [slots + 1] tokens added.
    `block_owner` ([num_blocks + 1] slot per KV block) is allocated by the connector once the
    KV cache exists; `active` says whether any scheduled request records statistics (eager
    steps skip the op otherwise).
    """

    slots: int
    sums: dict[str, torch.Tensor]
    sum_sqs: dict[str, torch.Tensor]
    lasts: dict[str, torch.Tensor]
    counts: torch.Tensor
    abs_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    block_owner: torch.Tensor | None = None
    block_size: int = 0
    active: bool = False
    widths: dict[str, int] = field(default_factory=dict)
    # Whether each rank holds a slice of the kind's channels (row-parallel inputs) or all of
    # them (the replicated norm outputs): only slices are all-gathered at read-out.
    sharded: dict[str, bool] = field(default_factory=dict)

    def bind_blocks(self, num_blocks: int, block_size: int) -> None:
        """Allocate the block -> slot table (all trash) for a KV cache of `num_blocks`."""
        self.block_owner = torch.full(
            (num_blocks + 1,), self.slots, dtype=torch.long, device=self.counts.device
        )
        self.block_size = block_size

    def zero_slot(self, slot: int) -> None:
        for kind in self.sums:
            self.sums[kind][:, slot].zero_()
            self.sum_sqs[kind][:, slot].zero_()
            self.abs_sums[kind][:, slot].zero_()
        self.counts[slot] = 0

    def remove_last_token(self, slot: int) -> None:
        """Take the slot's most recent token out of its sums (a forward past the request's
        end, which the shard does not hold)."""
        for kind in self.sums:
            last = self.lasts[kind][:, slot]
            self.sums[kind][:, slot] -= last
            self.sum_sqs[kind][:, slot] -= last * last
            self.abs_sums[kind][:, slot] -= last.abs()
        self.counts[slot] -= 1


def _slot_setting(vllm_config, key: str, env: str, default: int) -> int:  # noqa: ANN001
    """A slot count: the launcher's `additional_config` (part of vLLM's compile-cache key,
    since the slots shape the compiled graph), else the environment, else the default."""
    settings = plugin_settings(vllm_config)
    if key in settings:
        value, source = settings[key], f"additional_config.{PLUGIN_CONFIG_KEY}.{key}"
    else:
        value, source = os.environ.get(env, str(default)), env
    try:
        slots = int(value)
    except (TypeError, ValueError):
        slots = -1
    if slots < 0:
        raise ValueError(f"{source}={value!r}: expected an integer >= 0")
    return slots


def channel_stats_slots(vllm_config=None) -> int:  # noqa: ANN001 - vllm's VllmConfig
    """Requests that may record channel statistics at once."""
    return _slot_setting(
        vllm_config, "channel_stats_slots", CHANNEL_STATS_SLOTS_ENV, DEFAULT_CHANNEL_STATS_SLOTS
    )


def summary_slots(vllm_config=None) -> int:  # noqa: ANN001 - vllm's VllmConfig
    """Requests that may accumulate summaries at once."""
    return _slot_setting(vllm_config, "summary_slots", SUMMARY_SLOTS_ENV, DEFAULT_SUMMARY_SLOTS)


def last_token_slots(vllm_config=None) -> int:  # noqa: ANN001 - vllm's VllmConfig
    """`positions: "last"` requests that may keep their newest rows on the device at once."""
    return _slot_setting(
        vllm_config, "last_token_slots", LAST_TOKEN_SLOTS_ENV, DEFAULT_LAST_TOKEN_SLOTS
    )


def plugin_settings(vllm_config) -> dict:  # noqa: ANN001 - vllm's VllmConfig
    """The plugin's settings in vLLM's `additional_config` (empty when not launched by us)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    settings = extra.get(PLUGIN_CONFIG_KEY) if isinstance(extra, dict) else None
    return settings if isinstance(settings, dict) else {}


def _channel_stats_op(
    x: torch.Tensor,
    sums: torch.Tensor,
    sum_sqs: torch.Tensor,
    lasts: torch.Tensor,
    abs_sums: torch.Tensor,
    counts: torch.Tensor,
    layer: int,
    count_tokens: bool,
) -> None:
    stats = _STATE.channel_stats if _STATE is not None else None
    if stats is None or stats.block_owner is None:
        return  # profiling and warm-up runs before the KV cache exists
    if not stats.active and not _graph_capturing():
        return
    mapping = _forward_slot_mapping()
    if mapping is None:
        return
    accumulate_channels(
        x,
        mapping,
        stats.block_owner,
        stats.block_size,
        sums[layer],
        sum_sqs[layer],
        counts if count_tokens else None,
        lasts[layer],
        abs_sums[layer],
    )


def _channel_stats_fake(
    x, sums, sum_sqs, lasts, abs_sums, counts, layer: int, count_tokens: bool
) -> None:
    return None


direct_register_custom_op(
    op_name="channel_stats",
    op_func=_channel_stats_op,
    mutates_args=["sums", "sum_sqs", "lasts", "abs_sums", "counts"],
    fake_impl=_channel_stats_fake,
    target_lib=_LIB,
)


@dataclass
class CaptureState:
    """What the worker-side connector needs to read the buffers of this process's model."""

    buffer: torch.Tensor
    num_layers: int
    hidden_size: int
    # Per buffer row: absolute position and KV slot of that row's token (-1: no token).
    row_positions: torch.Tensor | None = None
    row_slots: torch.Tensor | None = None
    # Bounded gather target on the device and (pinned on CUDA) host staging, [rows, 2L, H].
    device_staging: torch.Tensor | None = None
    host_staging: torch.Tensor | None = None
    channel_stats: ChannelStatsState | None = None
    summary: SummaryState | None = None
    # [2 * slots, 2L, H]: per last-token slot the rows of its two newest positions (entry
    # 2 * slot + position % 2), written after each forward, read once when the request ends.
    last_rows: torch.Tensor | None = None
    # Per layer: whether a request scheduled this step captures it (set by the connector).
    wanted: list[bool] = field(default_factory=list)

    def describe(self) -> str:
        """Device memory this capture holds, for the start-up log."""
        rows = self.buffer.shape[0]
        row_bytes = self.buffer[0].numel() * self.buffer.element_size()
        stage_rows = self.host_staging.shape[0] if self.host_staging is not None else 0
        text = (
            f"capture buffer {rows} rows x {self.buffer.shape[1]} sites x {self.hidden_size} "
            f"= {rows * row_bytes / 2**30:.2f} GiB; staging {stage_rows} rows "
            f"({stage_rows * row_bytes / 2**20:.0f} MiB"
            f"{' on the device + pinned host' if self.device_staging is not None else ''})"
        )
        stats = self.channel_stats
        if stats is not None:
            nbytes = sum(
                t.numel() * t.element_size()
                for group in (stats.sums, stats.sum_sqs, stats.lasts, stats.abs_sums)
                for t in group.values()
            )
            text += f"; channel statistics {stats.slots} slots = {nbytes / 2**30:.2f} GiB"
        if self.last_rows is not None:
            nbytes = self.last_rows.numel() * self.last_rows.element_size()
            text += (
                f"; last-token rows {self.last_rows.shape[0] // 2} slots = {nbytes / 2**30:.2f} GiB"
            )
        if self.summary is not None:
            text += (
                f"; summaries {self.summary.slots} slots = {self.summary.nbytes() / 2**30:.2f} GiB"
            )
        return text

    def want_layers(self, layers) -> None:  # noqa: ANN001 - any iterable of ints
        wanted = [False] * self.num_layers
        for layer in layers:
            wanted[layer] = True
        self.wanted = wanted


_STATE: CaptureState | None = None


def capture_state() -> CaptureState:
    """The capture buffer of the model loaded in this process."""
    if _STATE is None:
        raise RuntimeError(
            "vllm-activations: the served model has no capture buffer. Load it with a capture "
            "architecture (`vllm-activations serve MODEL`, or vllm serve with "
            '--hf-overrides \'{"architectures": ["CaptureQwen3ForCausalLM"]}\').'
        )
    return _STATE


class CapturingDecoderLayer(nn.Module):
    """Mixin for a decoder layer: after the layer returns, copy its residuals into the buffer."""

    capture_slot: int

    def forward(self, positions, hidden_states, residual, *args, **kwargs):  # type: ignore[override]
        if self.capture_slot == 0:
            torch.ops.vllm_activations.record_rows(
                positions, self.capture_row_positions, self.capture_row_slots
            )
            if self.summary_embedding is not None:
                torch.ops.vllm_activations.record_embedding(hidden_states, self.summary_embedding)
        hidden_states, residual = super().forward(
            positions, hidden_states, residual, *args, **kwargs
        )
        torch.ops.vllm_activations.capture_residuals(
            hidden_states, residual, self.capture_buffer, self.capture_slot
        )
        return hidden_states, residual


class ChannelStatsLinear(nn.Module):
    """Mixin for a projection (row-parallel down_proj/o_proj, column-parallel
    gate_up_proj/qkv_proj): add its input's channels to the statistics."""

    def forward(self, input_, *args, **kwargs):  # type: ignore[override]
        torch.ops.vllm_activations.channel_stats(
            input_,
            self.stats_sums,
            self.stats_sum_sqs,
            self.stats_lasts,
            self.stats_abs_sums,
            self.stats_counts,
            self.stats_layer,
            self.stats_count_tokens,
        )
        return super().forward(input_, *args, **kwargs)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def capturing_layer_type(base: type) -> type:
    """The capturing subclass of a decoder layer class, for vLLM's construction hooks."""
    return _subclass(CapturingDecoderLayer, base)


def _subclass(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _SUBCLASSES:
        name = mixin.__name__.replace("Linear", "").replace("DecoderLayer", "")
        _SUBCLASSES[key] = type(f"{name}{base.__name__}", (mixin, base), {})
    return _SUBCLASSES[key]


# channel kind -> (submodule of the decoder layer, projection whose input is recorded)
_STAT_SITES = {
    "mlp_intermediate": ("mlp", "down_proj"),
    "attn_heads": ("self_attn", "o_proj"),
    "mlp_norm": ("mlp", "gate_up_proj"),
    "attn_norm": ("self_attn", "qkv_proj"),
}
_SHARDED_KINDS = ("mlp_intermediate", "attn_heads")  # row-parallel inputs: split over TP


def allocate_channel_stats(
    num_layers: int, slots: int, widths: dict[str, int], device
) -> ChannelStatsState:
    """Zeroed statistics for `slots` requests (plus the trash slot); widths per channel kind."""

    def zeros() -> dict[str, torch.Tensor]:
        return {
            k: torch.zeros(num_layers, slots + 1, w, dtype=torch.float32, device=device)
            for k, w in widths.items()
        }

    return ChannelStatsState(
        slots=slots,
        sums=zeros(),
        sum_sqs=zeros(),
        lasts=zeros(),
        abs_sums=zeros(),
        counts=torch.zeros(slots + 1, dtype=torch.long, device=device),
        widths=widths,
        sharded={k: k in _SHARDED_KINDS for k in widths},
    )


def allocate_capture_state(
    num_layers: int,
    hidden: int,
    rows: int,
    dtype: torch.dtype,
    device=None,  # noqa: ANN001 - torch device or None for the default device
    stats: ChannelStatsState | None = None,
) -> CaptureState:
    """The capture buffer ([rows, 2 * num_layers, hidden]), row bookkeeping and staging."""
    buffer = torch.zeros(rows, 2 * num_layers, hidden, dtype=dtype, device=device)
    row_bytes = buffer[0].numel() * buffer.element_size()
    stage_shape = (max(1, min(rows, STAGING_BYTES // row_bytes)), 2 * num_layers, hidden)
    on_cuda = buffer.device.type == "cuda"
    return CaptureState(
        buffer=buffer,
        num_layers=num_layers,
        hidden_size=hidden,
        row_positions=torch.full((rows,), -1, dtype=torch.long, device=buffer.device),
        row_slots=torch.full((rows,), -1, dtype=torch.long, device=buffer.device),
        device_staging=(
            torch.empty(stage_shape, dtype=dtype, device=buffer.device) if on_cuda else None
        ),
        # Pinned host memory lets the device-to-host copy run as a DMA, without a pageable
        # bounce buffer; on CPU the gather lands here directly.
        host_staging=torch.empty(stage_shape, dtype=dtype, pin_memory=on_cuda),
        channel_stats=stats,
        wanted=[False] * num_layers,
    )


def set_capture_state(state: CaptureState | None) -> None:
    """Make `state` the buffers of this process's model (install_capture does it)."""
    global _STATE
    _STATE = state


def _install_channel_stats(layers, num_layers: int, slots: int, device) -> ChannelStatsState:
    first = layers[0]
    widths = {
        kind: getattr(getattr(first, sub), proj).input_size_per_partition
        for kind, (sub, proj) in _STAT_SITES.items()
    }
    stats = allocate_channel_stats(num_layers, slots, widths, device)
    for index, layer in enumerate(layers):
        for kind in CHANNEL_KINDS:
            sub, proj = _STAT_SITES[kind]
            module = getattr(getattr(layer, sub), proj)
            module.__class__ = _subclass(ChannelStatsLinear, type(module))
            module.register_buffer("stats_sums", stats.sums[kind], persistent=False)
            module.register_buffer("stats_sum_sqs", stats.sum_sqs[kind], persistent=False)
            module.register_buffer("stats_lasts", stats.lasts[kind], persistent=False)
            module.register_buffer("stats_abs_sums", stats.abs_sums[kind], persistent=False)
            module.register_buffer("stats_counts", stats.counts, persistent=False)
            module.stats_layer = index
            module.stats_count_tokens = index == 0 and kind == CHANNEL_KINDS[0]
    return stats


def writes_shards() -> bool:
    """Whether this process is the tensor-parallel rank that reads rows out and writes shards
    (rank 0; the residual stream is replicated across ranks)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    try:
        return get_tensor_model_parallel_rank() == 0
    except AssertionError:  # no model-parallel state (a model built outside an engine)
        return True


def install_capture(model: nn.Module, vllm_config) -> CaptureState:
    """Allocate the buffer and turn every decoder layer of `model` into a capturing layer.

    Called from the model's __init__, so vLLM's memory profiling counts the buffer and the
    layers are capturing before torch.compile traces them. Parameter names are unchanged
    (the layer's class changes, not its place in the module tree), so weights load as usual.
    """
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("vllm-activations: pipeline parallelism is not supported; use TP")
    hf_config = vllm_config.model_config.hf_config
    num_layers = hf_config.num_hidden_layers
    rows = vllm_config.scheduler_config.max_num_batched_tokens
    layers = model.layers
    if len(layers) != num_layers:
        raise ValueError(
            f"vllm-activations: expected {num_layers} decoder layers in model.layers, "
            f"found {len(layers)}"
        )
    state = allocate_capture_state(
        num_layers, hf_config.hidden_size, rows, vllm_config.model_config.dtype
    )
    for index, layer in enumerate(layers):
        if not hasattr(layer, "post_attention_layernorm"):
            raise TypeError(
                f"vllm-activations: layer {index} ({type(layer).__name__}) is not a "
                "pre-norm decoder layer with post_attention_layernorm; supported: Qwen3, "
                "Qwen2, Llama"
            )
        if not isinstance(layer, CapturingDecoderLayer):  # no construction hook (Qwen2/3)
            layer.__class__ = _subclass(CapturingDecoderLayer, type(layer))
        layer.capture_slot = 2 * index
        layer.register_buffer("capture_buffer", state.buffer, persistent=False)
        layer.register_buffer("capture_row_positions", state.row_positions, persistent=False)
        layer.register_buffer("capture_row_slots", state.row_slots, persistent=False)
    slots = channel_stats_slots(vllm_config)
    if slots:
        state.channel_stats = _install_channel_stats(layers, num_layers, slots, state.buffer.device)
    slots = last_token_slots(vllm_config)
    if slots and writes_shards():
        state.last_rows = torch.zeros(
            (2 * slots, *state.buffer.shape[1:]), dtype=state.buffer.dtype,
            device=state.buffer.device,
        )  # fmt: skip
    slots = summary_slots(vllm_config)
    if slots:
        from vllm_activations.contract.tokens import special_token_ids_of

        state.summary = SummaryState.allocate(
            slots, num_layers, hf_config.hidden_size, rows, vllm_config.model_config.dtype,
            vocab_size=hf_config.vocab_size,
            special_ids=sorted(special_token_ids_of(vllm_config.model_config.tokenizer)),
            device=state.buffer.device,
        )  # fmt: skip
    summary = state.summary
    for index, layer in enumerate(layers):
        embedding = summary.embedding if summary is not None and index == 0 else None
        layer.register_buffer("summary_embedding", embedding, persistent=False)
    tokens = summary.tokens if summary is not None else None
    model.register_buffer("summary_tokens", tokens, persistent=False)
    set_capture_state(state)
    logger.info("vllm-activations: %s", state.describe())
    return state
