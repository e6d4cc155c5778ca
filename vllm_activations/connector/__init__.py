"""The KV connector vLLM loads (`kv_connector_module_path="vllm_activations.connector"`): one
class, built once per role, that delegates to that role's module.

Modules, by role (vLLM's own connectors split the same way, with small dataclasses crossing
the process boundary):
- `protocol`: the per-step metadata the scheduler sends to the workers, and shard file names;
- `scheduler`: the scheduler side, in the engine core process;
- `worker`: the worker side, in every worker process (TP rank 0 writes);
- `row_store`: one request's rows in host memory, already in shard layout;
- `writer`: the shard writer thread.

Why a KV connector: it is vLLM's public per-step extension point on both sides of the process
boundary, called in every runner and CUDA-graph mode, with no monkey-patching.
- Scheduler side (engine core): `on_new_request` reads the capture spec from the request's
  `kv_transfer_params["capture"]`, validates it, and, when the spec needs prompt positions,
  turns off prefix-cache READS for that request (cached blocks are never recomputed, so their
  activations would be missing; the request still populates the cache for others). Specs for
  `generated` or `last` positions keep their cache hits: vLLM recomputes the last prompt
  token and every generated one. `build_connector_meta` ships, each step, the
  token range every scheduled capture request computes, the KV blocks those tokens go to (one
  per request on a decode step, not its whole table) and the requests that finished.
  `request_finished` returns the shard path to the client as `kv_transfer_params`.
- Worker side (TP rank 0 only; the residual stream is replicated across TP ranks):
  `wait_for_save` runs after each forward. It needs no forward context (Model Runner V2 calls
  it after the context has closed, and in FULL CUDA-graph mode there never is one): the
  capture op itself records each batch row's absolute position and KV slot (capture.py). A
  row belongs to the scheduled capture request whose block table holds the row's block at
  index `position // block_size` (the shipped blocks start at index `start // block_size`)
  AND whose tokens scheduled this step (computed-token offset .. + scheduled count, shipped by
  the scheduler) include the position: a block two requests share (a prefix-cache hit) is
  computed by one of them only, so ownership is unique by construction, under any batch
  order, chunked prefill and preemption (rows are keyed by position, so a recomputed row
  replaces the old one). One vectorized pass over the rows finds their owners (no loop over
  requests). Rows at or past a finished request's
  last forwarded position P+G-2 (async scheduling forwards one more token after an EOS) are
  dropped. Finished requests are handed to a writer thread that checks every expected
  position is present and writes the shard atomically, or writes `<capture_id>.error.json`
  saying what is missing.
- Channel statistics (`channel_stats: true`): the scheduler gives the request one of the
  model's statistics slots (capture.py), or rejects it when all are taken. Every TP rank, in
  `bind_connector_metadata` (before the forward), points the KV blocks of scheduled requests
  at their slots, zeroes the slot of a request recomputed after preemption, and reads out
  (all-gathering the TP shards of the channels) and frees the slots of finished requests; a
  token forwarded past the request's end is taken out of the sums first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from vllm_activations.connector.protocol import (
    CAPTURE_ID_KEY,
    CAPTURE_KEY,
    DEFAULT_SHARD_DIR,
    CaptureStepMetadata,
    FinishedCapture,
    NewCapture,
    error_path,
    shard_path,
)
from vllm_activations.connector.scheduler import CaptureScheduler
from vllm_activations.connector.worker import CaptureWorker

__all__ = [
    "CAPTURE_ID_KEY",
    "CAPTURE_KEY",
    "ActivationCaptureConnector",
    "CaptureStepMetadata",
    "FinishedCapture",
    "NewCapture",
    "error_path",
    "shard_path",
]


class ActivationCaptureConnector(KVConnectorBase_V1):
    """Maps captured residual-stream rows to requests and writes one shard per request."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.shard_dir = Path(extra.get("shard_dir", DEFAULT_SHARD_DIR)).resolve()
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) != 1:
            raise ValueError(
                f"vllm-activations supports models with one KV cache group, got {len(groups)}"
            )
        block_size = groups[0].kv_cache_spec.block_size
        num_layers = vllm_config.model_config.hf_config.num_hidden_layers
        self.scheduler: CaptureScheduler | None = None
        self.worker: CaptureWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = CaptureScheduler(vllm_config, self.shard_dir, num_layers, block_size)
        else:
            self.worker = CaptureWorker(
                vllm_config, kv_cache_config, self.shard_dir, block_size, num_layers
            )

    # ---------------------------------------------------------------- scheduler side

    def on_new_request(self, request) -> None:
        """Validate the capture spec and turn off prefix-cache reads where it needs them."""
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> CaptureStepMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids: list[int]):
        """Tell the client where its shard will be; the worker writes it next step."""
        return self.scheduler.request_finished(request)

    # ---------------------------------------------------------------- worker side

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before the forward: whether this step captures at all, and the device slots."""
        super().bind_connector_metadata(connector_metadata)
        meta = connector_metadata if isinstance(connector_metadata, CaptureStepMetadata) else None
        self.worker.bind(meta)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Model Runner V2 passes the unpadded batch size: rows past it are padding."""
        self.worker.start_load_kv(kwargs.get("num_tokens"))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        """After the forward (inside a forward context on V1, outside on V2): copy this step's
        capture rows out, then hand finished requests to the writer."""
        if not self.worker.is_writer or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, CaptureStepMetadata)
        self.worker.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]):
        return None, None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
