"""The GPU runners' call protocols, replayed on CPU against the real connector.

A CUDA pod runs vLLM's Model Runner V2 with async scheduling and CUDA graphs; the CPU build
cannot. These tests drive the real `ActivationCaptureConnector` (scheduler and worker roles,
built by vLLM's own KV-transfer factory from a real `VllmConfig`) through each runner's exact
call sequence, with vLLM's own data classes (`Request`, `SchedulerOutput`, `NewRequestData`,
`CachedRequestData`) and vLLM's own runner-side wrappers:

- V1 (`KVConnectorModelRunnerMixin._get_kv_connector_output`): bind, start_load_kv and
  wait_for_save inside the forward context.
- V2 PIECEWISE / eager (`v1/worker/gpu/kv_connector.ActiveKVConnector`): bind inside the
  forward context, then `start_load_kv(**V2 kwargs)` and `wait_for_save` after it closed.
- V2 FULL CUDA graphs: bind outside any context, the graph replays the capture ops (they read
  the runner's persistent slot-mapping buffer, as here), `wait_for_save` outside any context.
- A step with no tokens (the one that delivers finished requests when nothing else runs): each
  runner's no-forward path (V1 `kv_connector_no_forward`, V2 `ActiveKVConnector.no_forward`).

Every step also checks the calls the connector received against that runner's protocol, read
from vLLM's source (`v1/worker/gpu/model_runner.py`, `v1/worker/gpu/kv_connector.py`,
`v1/worker/kv_connector_model_runner_mixin.py`): order, whether a forward context was open,
and the keyword arguments of `start_load_kv` (V2: `scheduler_output`, `request_state_indices`,
`request_ids`, `num_tokens` = the unpadded batch size, plus `attn_metadata` in FULL mode).

The "model" is the real capture ops on a real capture buffer: each layer's residual is a code
for (request, position, layer), so every shard row can be checked to be the right
(request, position). Also replayed: async scheduling's extra forward after an EOS, and two
requests scheduled together whose block tables share blocks (a prefix-cache hit).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from server import free_port  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import KVTransferConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed.kv_transfer import kv_transfer_state  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.forward_context import (  # noqa: E402
    is_forward_context_available,
    set_forward_context,
)
from vllm.v1.core.sched.output import (  # noqa: E402
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.worker.gpu.kv_connector import ActiveKVConnector  # noqa: E402
from vllm.v1.worker.kv_connector_model_runner_mixin import (  # noqa: E402
    KVConnectorModelRunnerMixin,
)

from vllm_activations import capture, summary  # noqa: E402
from vllm_activations.connector import ActivationCaptureConnector  # noqa: E402
from vllm_activations.contract.shard import ShardReader, read_shard  # noqa: E402
from vllm_activations.contract.spec import CHANNEL_KINDS  # noqa: E402
from vllm_activations.residual_copy import accumulate_channels, record_rows  # noqa: E402

BLOCK = 16
ROWS = 96  # the capture buffer's rows (max_num_batched_tokens)
NUM_BLOCKS = 64
SLOTS = 4
WIDTH = 8  # channels of each statistics kind in this replay
LAYOUTS = ("v1", "v2-piecewise", "v2-full")


def code(req: int, position: int, layer: int) -> float:
    """The residual the replayed model writes for (request, position, layer)."""
    return 1000.0 * (req + 1) + position + layer / 64


def channel_code(req: int, position: int) -> float:
    return (req + 1) + position / 100


def residual_row(req: int, position: int, layer: int, hidden: int) -> np.ndarray:
    """The post-attention residual the replayed model writes: the code, plus a direction
    that changes with the request, position and layer (so summaries have real angles)."""
    h = np.arange(hidden)
    wave = np.cos(0.05 * h * (1 + layer) + position + 3 * req).astype(np.float32)
    return np.float32(code(req, position, layer)) * np.float32(1e-3) + wave


def embedding_row(req: int, position: int, hidden: int) -> np.ndarray:
    return np.sin(0.07 * np.arange(hidden) + position + req).astype(np.float32)


def input_token(sim, position: int) -> int:
    prompt = sim.request.prompt_token_ids
    return prompt[position] if position < len(prompt) else 100 + position - len(prompt)


SPECIAL = 5  # a special token id of the replay (the prompt's token at position 2)


@pytest.fixture(scope="module")
def protocol_env(embedded_models, tmp_path_factory):
    """A real VllmConfig for tiny Qwen3 with the capture connector, vLLM's distributed state
    for one rank, the capture buffers, and both connector roles."""
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    shard_dir = tmp_path_factory.mktemp("protocol-shards")
    config = EngineArgs(
        model=str(embedded_models["tiny-qwen3-tied"]),
        dtype="float32",
        max_model_len=512,
        max_num_batched_tokens=ROWS,
        kv_transfer_config=KVTransferConfig(
            kv_connector="ActivationCaptureConnector",
            kv_connector_module_path="vllm_activations.connector",
            kv_role="kv_producer",
            kv_connector_extra_config={"shard_dir": str(shard_dir)},
        ),
        additional_config={
            "vllm_activations": {
                "channel_stats_slots": SLOTS,
                "summary_slots": SLOTS,
                "last_token_slots": SLOTS,
            }  # fmt: skip
        },
    ).create_engine_config()
    hf = config.model_config.hf_config
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                layer_names=[f"model.layers.{i}.self_attn.attn" for i in range(4)],
                kv_cache_spec=FullAttentionSpec(
                    block_size=BLOCK,
                    num_kv_heads=hf.num_key_value_heads,
                    head_size=hf.head_dim,
                    dtype=torch.float32,
                ),
            )
        ],
    )
    with set_current_vllm_config(config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            local_rank=0,
            backend="gloo",
        )
        ensure_model_parallel_initialized(1, 1)
        stats = capture.allocate_channel_stats(
            hf.num_hidden_layers,
            SLOTS,
            dict.fromkeys(CHANNEL_KINDS, WIDTH),
            "cpu",
        )
        state = capture.allocate_capture_state(
            hf.num_hidden_layers, hf.hidden_size, ROWS, torch.float32, stats=stats
        )
        state.summary = summary.SummaryState.allocate(
            SLOTS, hf.num_hidden_layers, hf.hidden_size, ROWS, torch.float32,
            vocab_size=hf.vocab_size, special_ids=[SPECIAL],
        )  # fmt: skip
        state.last_rows = torch.zeros(2 * SLOTS, 2 * hf.num_hidden_layers, hf.hidden_size)
        capture.set_capture_state(state)
        kv_transfer_state.ensure_kv_transfer_initialized(config, kv_cache_config)
        worker = kv_transfer_state.get_kv_transfer_group()
        assert isinstance(worker, ActivationCaptureConnector)
        scheduler = ActivationCaptureConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config)
        calls = _spy_on_connector_calls(worker)
        yield SimpleNamespace(
            calls=calls,
            config=config,
            worker=worker,
            scheduler=scheduler,
            state=state,
            shard_dir=shard_dir,
            num_layers=hf.num_hidden_layers,
            hidden=hf.hidden_size,
        )
        kv_transfer_state.ensure_kv_transfer_shutdown()
        capture.set_capture_state(None)


SPIED = ("handle_preemptions", "bind_connector_metadata", "start_load_kv", "wait_for_save")


def _spy_on_connector_calls(worker: ActivationCaptureConnector) -> list[tuple]:
    """Record (method, forward context open?, keyword names, num_tokens) of every call the
    runners make to the worker connector's per-step methods."""
    calls: list[tuple] = []
    for name in SPIED:
        method = getattr(worker, name)

        def spy(*args, _name=name, _method=method, **kwargs):
            calls.append(
                (_name, is_forward_context_available(), frozenset(kwargs), kwargs.get("num_tokens"))
            )
            return _method(*args, **kwargs)

        setattr(worker, name, spy)
    return calls


V2_LOAD_KWARGS = frozenset(
    {"scheduler_output", "request_state_indices", "request_ids", "num_tokens"}
)


def expected_calls(layout: str, num_tokens: int) -> list[tuple]:
    """The connector calls of one step under `layout`, as vLLM 0.32's runners make them."""
    if layout == "v1":
        # _get_kv_connector_output, inside set_forward_context (no-forward steps open one too)
        return [
            ("bind_connector_metadata", True, frozenset(), None),
            ("start_load_kv", True, frozenset(), None),
            ("wait_for_save", True, frozenset(), None),
        ]
    if num_tokens == 0:  # ActiveKVConnector.no_forward: no input batch, so no load kwargs
        return [
            ("handle_preemptions", False, frozenset(), None),
            ("bind_connector_metadata", False, frozenset(), None),
            ("start_load_kv", True, frozenset(), None),
            ("wait_for_save", False, frozenset(), None),
        ]
    full = layout == "v2-full"
    load = V2_LOAD_KWARGS | ({"attn_metadata"} if full else set())
    return [
        ("handle_preemptions", not full, frozenset(), None),
        ("bind_connector_metadata", not full, frozenset(), None),
        # post_forward: start_load_kv under set_forward_context(None, ...) when none is open
        ("start_load_kv", True, frozenset(load), num_tokens),
        ("wait_for_save", False, frozenset(), None),
    ]


@dataclass(eq=False)
class Sim:
    """One replayed request: its vLLM Request, blocks, and how far it has been computed."""

    index: int
    request: Request
    blocks: list[int]
    computed: int = 0
    announced: bool = False
    new_blocks: list[int] = field(default_factory=list)


class Replay:
    """Drives scheduler connector -> SchedulerOutput -> runner protocol -> worker connector."""

    def __init__(self, env, layout: str) -> None:
        self.env = env
        self.layout = layout
        self.sims: dict[str, Sim] = {}
        self.next_block = 0
        # vLLM's own V2 wrapper, built as the V2 runner builds it (it registers the KV caches
        # and takes the connector from the KV-transfer group).
        self.v2 = ActiveKVConnector(env.config, {})
        assert self.v2.kv_connector is env.worker
        self.forwarded: dict[str, list[int]] = {}

    def add(self, name: str, prompt_len: int, spec: dict, *, max_tokens: int = 64,
            shared_blocks: list[int] | None = None, cached_tokens: int = 0) -> Sim:  # fmt: skip
        spec = {"dtype": "float32", **spec}  # the codes need float32 to round-trip exactly
        params = SamplingParams(
            max_tokens=max_tokens,
            extra_args={"kv_transfer_params": {"capture": spec, "capture_id": name}},
        )
        request = Request(
            request_id=f"{name}-0a1b", prompt_token_ids=list(range(3, 3 + prompt_len)),
            sampling_params=params, pooling_params=None,
        )  # fmt: skip
        self.env.scheduler.on_new_request(request)
        sim = Sim(len(self.sims), request, list(shared_blocks or []), computed=cached_tokens)
        self.sims[request.request_id] = sim
        return sim

    def _allocate(self, sim: Sim, upto: int) -> None:
        while len(sim.blocks) * BLOCK < upto:
            sim.blocks.append(self.next_block)
            sim.new_blocks.append(self.next_block)
            self.next_block += 1

    def step(
        self, plan: dict[Sim, int], *, padded: int | None = None,
        stale: list[tuple[Sim, int]] = (),
    ) -> None:  # fmt: skip
        """One engine step: `plan` maps each scheduled request to its token count. `stale`:
        padded rows that still hold an earlier step's (request, position) and its KV slot,
        as a runner's persistent input buffers would without a reset to -1."""
        new_reqs, cached_ids, cached_blocks, cached_computed = [], [], [], []
        num_scheduled, layout = {}, []
        for sim, count in plan.items():
            req = sim.request
            self._allocate(sim, sim.computed + count)
            req.num_computed_tokens = sim.computed
            if not sim.announced:
                new_reqs.append(NewRequestData.from_request(req, (list(sim.blocks),)))
                sim.announced = True
            else:
                cached_ids.append(req.request_id)
                cached_blocks.append((list(sim.new_blocks),) if sim.new_blocks else None)
                cached_computed.append(sim.computed)
            sim.new_blocks = []
            num_scheduled[req.request_id] = count
            for p in range(sim.computed, sim.computed + count):
                layout.append((sim, p, sim.blocks[p // BLOCK] * BLOCK + p % BLOCK))
            self.forwarded.setdefault(req.request_id, []).extend(
                range(sim.computed, sim.computed + count)
            )
            sim.computed += count
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=CachedRequestData(
                req_ids=cached_ids, resumed_req_ids=set(), new_token_ids=[],
                all_token_ids={}, new_block_ids=cached_blocks,
                num_computed_tokens=cached_computed,
                num_output_tokens=[0] * len(cached_ids),
            ),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
            finished_req_ids=set(), free_encoder_mm_hashes=[],
        )  # fmt: skip
        output.kv_connector_metadata = self.env.scheduler.build_connector_meta(output)
        extra = [(sim, p, sim.blocks[p // BLOCK] * BLOCK + p % BLOCK) for sim, p in stale]
        padded = max(padded or len(layout), len(layout) + len(extra))
        self._run(output, layout, padded, extra)

    def _forward(self, layout, padded: int, *, graph: bool, extra=()) -> None:
        """The capture ops of every layer, as the compiled model (or its graph) runs them;
        `extra` rows follow the batch's in the padding."""
        env, n = self.env, len(layout)
        layout = [*layout, *extra]
        positions = torch.zeros(padded, dtype=torch.long)
        slots = torch.full((padded,), -1, dtype=torch.long)
        values = torch.zeros(padded, env.num_layers, env.hidden)
        embedding = torch.zeros(padded, env.hidden)
        tokens = torch.zeros(padded, dtype=torch.long)
        channels = torch.zeros(padded, WIDTH)
        for t, (sim, p, slot) in enumerate(layout):
            positions[t], slots[t] = p, slot
            for layer in range(env.num_layers):
                values[t, layer] = torch.from_numpy(residual_row(sim.index, p, layer, env.hidden))
            embedding[t] = torch.from_numpy(embedding_row(sim.index, p, env.hidden))
            tokens[t] = input_token(sim, p)
            channels[t] = channel_code(sim.index, p)
        state, stats = env.state, env.state.channel_stats
        summ = state.summary
        if graph:  # a replayed graph runs every recorded kernel, reading persistent buffers
            record_rows(positions, slots, state.row_positions, state.row_slots)
            summ.tokens[:padded].copy_(tokens)
            summ.embedding[:padded].copy_(embedding)
        else:
            torch.ops.vllm_activations.record_tokens(tokens, summ.tokens)
            torch.ops.vllm_activations.record_rows(positions, state.row_positions, state.row_slots)
            torch.ops.vllm_activations.record_embedding(embedding, summ.embedding)
        for layer in range(env.num_layers):
            for kind_index, kind in enumerate(stats.sums):
                args = (stats.sums[kind][layer], stats.sum_sqs[kind][layer])
                count = stats.counts if layer == 0 and kind_index == 0 else None
                if graph:
                    accumulate_channels(
                        channels, slots, stats.block_owner, stats.block_size, *args, count,
                        stats.lasts[kind][layer], stats.abs_sums[kind][layer],
                    )  # fmt: skip
                else:
                    torch.ops.vllm_activations.channel_stats(
                        channels, stats.sums[kind], stats.sum_sqs[kind], stats.lasts[kind],
                        stats.abs_sums[kind], stats.counts, layer, layer == 0 and kind_index == 0,
                    )  # fmt: skip
            residual = values[:, layer].contiguous()
            hidden = torch.full_like(residual, 0.25)
            if graph:
                from vllm_activations.residual_copy import copy_residuals

                copy_residuals(hidden, residual, state.buffer, 2 * layer)
            else:
                torch.ops.vllm_activations.capture_residuals(
                    hidden, residual, state.buffer, 2 * layer
                )
        assert n <= padded  # the summary's arithmetic follows, in the connector's wait_for_save

    def _run(self, output: SchedulerOutput, layout, padded: int, extra=()) -> None:
        env = self.env
        env.calls.clear()
        self._run_protocol(output, layout, padded, extra)
        assert env.calls == expected_calls(self.layout, len(layout)), env.calls

    def _run_protocol(self, output: SchedulerOutput, layout, padded: int, extra=()) -> None:
        env = self.env
        if output.total_num_scheduled_tokens == 0:  # the runners' no-forward paths
            if self.layout == "v1":
                KVConnectorModelRunnerMixin.kv_connector_no_forward(output, env.config)
            else:
                self.v2.no_forward(output)
            return
        rows = [s for _, _, s in [*layout, *extra]]
        slot_tensor = torch.tensor(rows + [-1] * (padded - len(rows)), dtype=torch.long)
        context = {"slot_mapping": {"model.layers.0.self_attn.attn": slot_tensor}}
        req_ids = [sim.request.request_id for sim in dict.fromkeys(s for s, _, _ in layout)]
        batch = SimpleNamespace(  # the InputBatch fields ActiveKVConnector reads
            req_ids=req_ids,
            idx_mapping=torch.arange(len(req_ids), dtype=torch.int32),
            num_tokens=len(layout),  # unpadded; the forward runs `padded` rows
            num_tokens_after_padding=padded,
        )
        if self.layout == "v1":
            with set_forward_context(None, env.config, **context):
                with KVConnectorModelRunnerMixin._get_kv_connector_output(output):
                    self._forward(layout, padded, graph=False, extra=extra)
        elif self.layout == "v2-piecewise":
            with set_forward_context(None, env.config, **context):
                self.v2.pre_forward(output, batch)
                self._forward(layout, padded, graph=False, extra=extra)
            self.v2.finish_forward()
            self.v2.post_forward(output.finished_req_ids)
        else:
            self.v2.pre_forward(output, batch, attn_metadata={})
            self._forward(layout, padded, graph=True, extra=extra)
            self.v2.finish_forward()
            self.v2.post_forward(output.finished_req_ids)

    def finish(self, sim: Sim, generated: int) -> dict:
        """The request ends (EOS) with `generated` output tokens; returns what the client gets."""
        req = sim.request
        req.append_output_token_ids(list(range(100, 100 + generated)))
        req.status = RequestStatus.FINISHED_STOPPED
        _, params = self.env.scheduler.request_finished(req, list(sim.blocks))
        return params

    def idle_step(self) -> None:
        self.step({})


def wait_for(path: Path, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    error = path.with_name(path.name.replace(".h5", ".error.json"))
    while time.monotonic() < deadline:
        if path.exists():
            return path
        if error.exists():
            raise AssertionError(json.loads(error.read_text())["error"])
        time.sleep(0.05)
    raise AssertionError(f"no shard {path.name}")


def check_shard(env, sim: Sim, name: str, prompt_len: int, generated: int) -> None:
    """Every row is (this request, its position); statistics cover exactly 0..P+G-2."""
    shard = read_shard(wait_for(env.shard_dir / f"{name}.h5"))
    spec = shard.attrs["capture_spec"]
    forwarded = prompt_len + generated - 1
    positions = shard.positions.tolist()
    mode = spec["positions"]
    expected = {
        "all": list(range(forwarded)),
        "generated": list(range(prompt_len, forwarded)),
        "last": [forwarded - 1],
        "every:4": list(range(0, forwarded, 4)),
    }[mode]
    assert positions == expected, (name, mode)
    for li, layer in enumerate(shard.layers.tolist()):
        want = np.stack([residual_row(sim.index, p, layer, env.hidden) for p in positions])
        for site, shift in (("post_attention", 0.0), ("post_mlp", 0.25)):
            if site in shard.layer_outputs:
                got = shard.layer_outputs[site][li]
                np.testing.assert_allclose(got, want + np.float32(shift), rtol=1e-6, atol=1e-6)
    if spec["summary"]:
        check_summary(env, sim, shard, expected)
    with ShardReader(shard.path) as reader:
        if not spec["channel_stats"]:
            assert "channel_stats" not in reader
            return
        values = np.array([channel_code(sim.index, p) for p in range(forwarded)])
        for kind in CHANNEL_KINDS:
            abs_sum = reader.dataset(f"channel_stats/{kind}/abs_sum")
            np.testing.assert_allclose(abs_sum, np.abs(values).sum(), rtol=1e-5)
            count = reader.dataset(f"channel_stats/{kind}/count")
            assert count.tolist() == [forwarded] * len(shard.layers)
            sums = reader.dataset(f"channel_stats/{kind}/sum")
            np.testing.assert_allclose(sums, values.sum(), rtol=1e-5)
            sum_sq = reader.dataset(f"channel_stats/{kind}/sum_sq")
            np.testing.assert_allclose(sum_sq, (values**2).sum(), rtol=1e-5)


def check_summary(env, sim: Sim, shard, kept: list[int]) -> None:
    """The shard's summary equals the analyzer's formulas over exactly the kept positions."""
    layers = env.num_layers
    x = np.zeros((len(kept), summary.num_sites(layers), env.hidden), dtype=np.float32)
    for t, p in enumerate(kept):
        x[t, 0] = embedding_row(sim.index, p, env.hidden)
        for layer in range(layers):
            row = residual_row(sim.index, p, layer, env.hidden)
            x[t, 1 + 2 * layer], x[t, 2 + 2 * layer] = row, row + np.float32(0.25)
    q = summary.token_quantities(torch.from_numpy(x).double(), torch.arange(layers + 1) * 2)
    content = np.array([p != 0 and input_token(sim, p) != SPECIAL for p in kept])
    masks = {
        "all": np.ones(len(kept), bool),
        "content": content,
        "last": np.arange(len(kept)) == len(kept) - 1,
    }
    with ShardReader(shard.path) as reader:
        assert reader.has_summary and reader.attrs["summary"]["special_ids"] == [SPECIAL]
        data = reader.summary()
    for population, mask in masks.items():
        got = data[population]
        assert int(got["count"]) == int(mask.sum()), population
        np.testing.assert_allclose(got["cos_sum"], q["cos"].numpy()[mask].sum(0), atol=1e-4)
        np.testing.assert_allclose(got["angle_sum"], q["angle"].numpy()[mask].sum(0), atol=1e-4)
        norms = q["norms"].numpy()[mask].sum(0)
        np.testing.assert_allclose(got["norm_sum"], norms, rtol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_summary_over_the_gpu_protocols_drops_the_extra_forward(protocol_env, layout):
    """Summary capture through each runner's protocol: chunked prefill, a padded decode
    batch, async scheduling's forward past the EOS; and a tensors-free shard."""
    env, replay = protocol_env, Replay(protocol_env, layout)
    a = replay.add(f"sum-a-{layout}", 30, {"summary": True, "tensors": False})
    b = replay.add(f"sum-b-{layout}", 21, {"summary": True, "positions": "every:4"})
    replay.step({a: 24, b: 21})
    replay.step({a: 6, b: 1})
    for _ in range(3):
        replay.step({b: 1, a: 1}, padded=4)
    replay.finish(a, 3)  # a: EOS at its 3rd token; one more forward had already run
    replay.step({b: 1})
    replay.finish(b, 5)
    replay.idle_step()
    check_shard(env, a, f"sum-a-{layout}", 30, 3)
    check_shard(env, b, f"sum-b-{layout}", 21, 5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_rows_with_an_earlier_position_and_kv_slot_join_no_capture(protocol_env, layout):
    """Padded rows that still hold an earlier step's position and KV slot of a running
    capture (V1 has no unpadded count; its rows are told apart by position alone): neither
    the raw rows nor the summary take them, so the summary counts each position once and
    equals the shard's rows (in CI a summary once counted a row its raw capture had not)."""
    env, replay = protocol_env, Replay(protocol_env, layout)
    a = replay.add(f"stale-a-{layout}", 20, {"summary": True})
    b = replay.add(f"stale-b-{layout}", 9, {"summary": True, "positions": "every:4"})
    replay.step({a: 20, b: 9})
    replay.step({a: 1, b: 1}, padded=4, stale=[(a, 19), (b, 4)])
    replay.step({a: 1, b: 1}, padded=8, stale=[(a, 5), (a, 20), (b, 8), (b, 0)])
    replay.finish(a, 3)
    replay.finish(b, 3)
    replay.idle_step()
    check_shard(env, a, f"stale-a-{layout}", 20, 3)
    check_shard(env, b, f"stale-b-{layout}", 9, 3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_prefill_and_decode_rows_land_at_their_request_and_position(protocol_env, layout):
    """Two requests interleaved with chunked prefill and a CUDA-graph-padded decode batch."""
    env, replay = protocol_env, Replay(protocol_env, layout)
    all_spec = {"positions": "all", "channel_stats": True}
    a = replay.add(f"chunk-a-{layout}", 40, all_spec)
    b = replay.add(f"chunk-b-{layout}", 20, {"positions": "generated", "layers": [0, 2]})
    replay.step({a: 32, b: 20})  # a's first chunk, b's whole prompt
    replay.step({b: 1, a: 8})  # b decodes first in the batch (V2 orders as it likes)
    for _ in range(4):
        replay.step({a: 1, b: 1}, padded=8)  # decode batch padded to a graph size
    params = {sim: replay.finish(sim, g) for sim, g in ((a, 5), (b, 6))}
    replay.idle_step()
    assert all("capture_error" not in p for p in params.values())
    check_shard(env, a, f"chunk-a-{layout}", 40, 5)
    check_shard(env, b, f"chunk-b-{layout}", 20, 6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("positions", ["last", "all"])
def test_async_scheduling_extra_step_after_eos_is_dropped(protocol_env, layout, positions):
    """Async scheduling schedules step N+1 before step N's EOS is seen: one more forward at
    P+G-1. The shard and the statistics must not hold it."""
    env, replay = protocol_env, Replay(protocol_env, layout)
    name = f"async-{positions}-{layout}"
    sim = replay.add(name, 24, {"positions": positions, "channel_stats": True})
    replay.step({sim: 24})  # prefill: samples output token 1
    replay.step({sim: 1})  # position 24: samples token 2 (EOS)
    replay.step({sim: 1})  # position 25, scheduled before the EOS was seen
    assert replay.forwarded[sim.request.request_id][-1] == 24 + 2 - 1
    replay.finish(sim, 2)  # only now does the scheduler learn of the EOS
    replay.idle_step()
    check_shard(env, sim, name, 24, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_last_token_rows_on_the_device_and_through_the_host(protocol_env, layout):
    """More `last` requests than device slots: the first SLOTS keep their two newest rows on
    the device, the rest go through the host as before, all with async scheduling's extra
    forward and a stale padded row; a request that takes a finished one's slot in the very
    step that finished one is read out does not overwrite it first."""
    env, replay = protocol_env, Replay(protocol_env, layout)
    pool = env.scheduler.scheduler._requests
    sims = [replay.add(f"last{i}-{layout}", 10 + i, {"positions": "last"}) for i in range(6)]
    slots = [pool[s.request.request_id].last_slot for s in sims]
    assert sorted(slots[:SLOTS]) == list(range(SLOTS)) and slots[SLOTS:] == [None, None]
    replay.step({s: 10 + i for i, s in enumerate(sims)})  # prefills: output token 1
    replay.step(dict.fromkeys(sims, 1))  # first decode: token 2, EOS for sims[0]
    replay.step(dict.fromkeys(sims, 1), stale=[(sims[0], 3)])  # sims[0]'s extra forward
    replay.finish(sims[0], 2)
    late = replay.add(f"last-late-{layout}", 12, {"positions": "last"})
    assert pool[late.request.request_id].last_slot == slots[0]  # the finished one's slot
    replay.step({late: 12, **dict.fromkeys(sims[1:], 1)})  # sims[0] read out, late written
    replay.step({late: 1, **dict.fromkeys(sims[1:], 1)})
    for sim in [late, *sims[1:]]:  # forwarded up to P+G-2: no extra forward for these
        replay.finish(sim, 5 if sim is not late else 2)
    replay.idle_step()
    check_shard(env, sims[0], f"last0-{layout}", 10, 2)
    for i, sim in enumerate(sims[1:], start=1):
        check_shard(env, sim, f"last{i}-{layout}", 10 + i, 5)
    check_shard(env, late, f"last-late-{layout}", 12, 2)
    assert env.worker.worker._last_slots == {}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_prefix_blocks_belong_to_the_request_that_computes_them(protocol_env, layout):
    """b's table starts with a's first two blocks (a prefix-cache hit on blocks a is
    computing in the same step): those rows are a's, whichever table is read last."""
    env, replay = protocol_env, Replay(protocol_env, layout)
    a = replay.add(f"shared-a-{layout}", 40, {"positions": "all"})
    replay._allocate(a, 40)
    a.new_blocks = list(a.blocks)
    b = replay.add(
        f"shared-b-{layout}", 40, {"positions": "generated"},
        shared_blocks=a.blocks[:2], cached_tokens=2 * BLOCK,
    )  # fmt: skip
    replay.step({a: 40, b: 40 - 2 * BLOCK})
    replay.step({a: 1, b: 1})
    replay.step({b: 1, a: 1})
    replay.finish(a, 3)
    replay.finish(b, 3)
    replay.idle_step()
    check_shard(env, a, f"shared-a-{layout}", 40, 3)
    check_shard(env, b, f"shared-b-{layout}", 40, 3)


def test_rows_of_requests_that_do_not_capture_are_ignored(protocol_env):
    """A request without capture shares the batch (its own blocks, never in the capture
    metadata); its rows never reach a shard."""
    env, replay = protocol_env, Replay(protocol_env, "v2-full")
    a = replay.add("plain-neighbour-a", 20, {"positions": "all"})
    request = Request(
        request_id="plain-1", prompt_token_ids=list(range(20)),
        sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
    )  # fmt: skip
    env.scheduler.on_new_request(request)
    plain = Sim(99, request, [])
    replay.step({plain: 20, a: 20})
    replay.step({a: 1, plain: 1}, padded=4)
    replay.finish(a, 2)
    replay.idle_step()
    check_shard(env, a, "plain-neighbour-a", 20, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_steps_without_a_summary_request_do_no_summary_work(protocol_env, layout):
    """The summary's arithmetic runs in `wait_for_save`, which every step calls (idle ones
    too, after no forward), and only for a step that forwarded a summary request's tokens:
    raw capture, a padded graph batch and an idle step leave every summary accumulator and
    ring entry as it was, the trash slot included."""
    env, replay = protocol_env, Replay(protocol_env, layout)
    summ = env.state.summary
    state = [t.clone() for p in summ.sums.values() for t in p.tensors()]
    state += [t.clone() for t in (summ.ring_x, summ.ring_valid, summ.ring_position)]
    sim = replay.add(f"no-summary-{layout}", 20, {"positions": "all"})
    replay.step({sim: 20})
    replay.step({sim: 1}, padded=4)
    replay.finish(sim, 2)
    replay.idle_step()
    check_shard(env, sim, f"no-summary-{layout}", 20, 2)
    after = [t for p in summ.sums.values() for t in p.tensors()]
    after += [summ.ring_x, summ.ring_valid, summ.ring_position]
    assert all(torch.equal(a, b) for a, b in zip(state, after, strict=True))


def test_a_capture_id_stays_taken_until_its_shard_is_written(protocol_env):
    """Between a request's end and its shard's publication (the worker writes at the next
    step), a second request with the same capture id is refused instead of replacing the
    shard; once the shard exists the id is still taken; once only an error file exists it
    is free again."""
    env, replay = protocol_env, Replay(protocol_env, "v1")
    first = replay.add("reused-id", 12, {"positions": "all"})
    replay.step({first: 12})
    assert "capture_error" not in replay.finish(first, 1)
    second = replay.add("reused-id", 6, {"positions": "all"})  # before the shard is written
    _, refused = env.scheduler.request_finished(second.request, [])
    assert refused == {"capture_error": "capture.capture_id: 'reused-id' is already in use"}
    replay.idle_step()
    shard = wait_for(env.shard_dir / "reused-id.h5")
    check_shard(env, first, "reused-id", 12, 1)
    third = replay.add("reused-id", 6, {"positions": "all"})
    assert "capture_error" in env.scheduler.request_finished(third.request, [])[1]
    shard.unlink()
    shard.with_name("reused-id.error.json").write_text("{}")  # a failed capture's trace
    fourth = replay.add("reused-id", 6, {"positions": "all"})
    replay.step({fourth: 6})
    assert "capture_error" not in replay.finish(fourth, 1)
    replay.idle_step()
    deadline = time.monotonic() + 30
    while not shard.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    check_shard(env, fourth, "reused-id", 6, 1)


def test_rows_cross_bounded_staging_chunks(protocol_env, monkeypatch):
    """Staging smaller than a step: rows arrive over several gathers and still land right
    (a layer subset gathers fewer columns, so more rows fit per chunk)."""
    env, replay = protocol_env, Replay(protocol_env, "v2-piecewise")
    staging = env.state.host_staging
    monkeypatch.setattr(env.state, "host_staging", torch.empty_like(staging[:3]))
    a = replay.add("staged-a", 37, {"positions": "all"})
    subset = {"positions": "every:4", "layers": [1, 3], "sites": ["post_mlp"]}
    b = replay.add("staged-b", 30, subset)
    replay.step({a: 37, b: 30})
    replay.step({b: 1, a: 1})
    replay.finish(a, 2)
    replay.finish(b, 2)
    replay.idle_step()
    check_shard(env, a, "staged-a", 37, 2)
    check_shard(env, b, "staged-b", 30, 2)
