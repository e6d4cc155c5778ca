"""Shard writer: a thread that checks a finished request's rows and statistics and writes its
shard atomically (or `<capture_id>.error.json` saying what is missing), off the step loop."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_activations.connector.protocol import FinishedCapture, NewCapture, error_path, shard_path
from vllm_activations.connector.row_store import NUMPY_STORAGE, RowStore
from vllm_activations.contract.spec import CaptureSpec

logger = logging.getLogger("vllm_activations.connector")


@dataclass
class WorkerRequest:
    """Rows captured so far for one request."""

    new: NewCapture
    spec: CaptureSpec
    store: RowStore | None = None
    channel_stats: dict[str, np.ndarray] | None = None
    summary: dict[str, dict[str, np.ndarray]] | None = None
    # Set when the rows or statistics cannot be trusted; the writer reports it.
    error: str | None = None


class ShardWriterThread:
    """Assembles and writes shards off the engine's step loop, in submission order."""

    def __init__(self, vllm_config, model_attrs: dict[str, Any]) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._model_attrs = model_attrs
        self._tokenizer_name = vllm_config.model_config.tokenizer
        self._tokenizer_revision = vllm_config.model_config.tokenizer_revision
        self._trust_remote_code = vllm_config.model_config.trust_remote_code
        self._tokenizer = None
        # Special token ids the summary's `content` population left out (recorded per shard).
        self.special_ids: list[int] = []
        self._thread = threading.Thread(target=self._run, name="vllm-activations-writer")
        self._thread.daemon = True
        self._thread.start()

    def submit(self, shard_dir: Path, state: WorkerRequest, fin: FinishedCapture) -> None:
        self._queue.put((shard_dir, state, fin))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            shard_dir, state, fin = item
            try:
                self._write(shard_dir, state, fin)
            except Exception as exc:  # noqa: BLE001 - reported to the client via the error file
                logger.exception("vllm-activations: shard %s failed", state.new.capture_id)
                _write_error(shard_dir, state.new.capture_id, f"shard write failed: {exc}")

    def _decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._tokenizer_name,
                revision=self._tokenizer_revision,
                trust_remote_code=self._trust_remote_code,
            )
        return self._tokenizer.decode(token_ids)

    def _write(self, shard_dir: Path, state: WorkerRequest, fin: FinishedCapture) -> None:
        from vllm_activations.contract.shard import staged_shard_path, write_shard

        new, spec = state.new, state.spec
        if state.error is not None:
            _write_error(shard_dir, new.capture_id, state.error)
            return
        expected = spec.expected_positions(len(new.prompt_token_ids), len(fin.output_token_ids))
        missing = state.store.missing(expected) if state.store is not None else expected
        if missing and spec.tensors:
            _write_error(
                shard_dir,
                new.capture_id,
                f"incomplete capture (finish_reason={fin.finish_reason}): "
                f"{len(missing)} of {len(expected)} positions missing, first {missing[:8]}",
            )
            return
        if spec.channel_stats and not state.channel_stats:
            _write_error(
                shard_dir,
                new.capture_id,
                "channel statistics were requested but none were recorded for this request",
            )
            return
        if spec.summary and state.summary is None:
            _write_error(shard_dir, new.capture_id, "a summary was requested but none was recorded")
            return
        if not spec.tensors:
            outputs: dict[str, np.ndarray] = {}
        elif state.store is not None:
            outputs = state.store.layer_outputs(expected)
        else:  # nothing to keep (e.g. `generated` of a request that generated one token)
            shape = (len(new.layers), 0, self._model_attrs["hidden_size"])
            outputs = {site: np.zeros(shape, NUMPY_STORAGE[spec.dtype]) for site in spec.sites}
        extra = dict(state.channel_stats or {})
        extra_attrs: dict[str, dict[str, str]] = {}
        if state.summary is not None:
            from vllm_activations.contract.shard import summary_datasets

            datasets, extra_attrs = summary_datasets(state.summary, spec.dtype)
            extra.update(datasets)
        attrs = dict(self._model_attrs)
        attrs.update(
            capture_id=new.capture_id,
            capture_spec=spec.to_dict(),
            sampling_params=new.sampling_params,
            finish_reason=fin.finish_reason or "",
            prompt=self._decode(new.prompt_token_ids),
            completion=self._decode(fin.output_token_ids),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        if state.summary is not None:
            from vllm_activations.summary import MASSIVE_RATIO, MASSIVE_THRESHOLD

            attrs["summary"] = {
                "special_ids": self.special_ids,
                "massive_threshold": MASSIVE_THRESHOLD,
                "massive_ratio": MASSIVE_RATIO,
                "has_embedding": True,
            }
        final = shard_path(shard_dir, new.capture_id)
        write_shard(
            # Teacher logprobs exist only in the API response: the sidecar adds them to the
            # staged (hidden) shard and renames it to `final` (shard.publish_with_teacher).
            staged_shard_path(final) if spec.teacher_logprobs else final,
            input_tokens=new.prompt_token_ids,
            output_tokens=fin.output_token_ids,
            positions=expected,
            layers=new.layers,
            layer_outputs=outputs,
            dtype=spec.dtype,
            attrs=attrs,
            extra=extra or None,
            extra_attrs=extra_attrs,
        )


def _write_error(shard_dir: Path, capture_id: str, message: str) -> None:
    path = error_path(shard_dir, capture_id)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"capture_id": capture_id, "error": message}))
    os.replace(tmp, path)


def model_attrs(vllm_config) -> dict[str, Any]:
    import vllm

    from vllm_activations import __version__

    model_config = vllm_config.model_config
    hf = model_config.hf_config
    config = {
        key: getattr(hf, key, None)
        for key in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "tie_word_embeddings",
            "rms_norm_eps",
        )
    }
    original = getattr(hf, "architectures", None) or []
    return {
        "model": _served_name(model_config),
        "model_path": model_config.model,
        "model_revision": model_config.revision or "",
        "architectures": list(original),
        "model_config": config,
        "num_hidden_layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "model_dtype": str(model_config.dtype).replace("torch.", ""),
        "vllm_version": vllm.__version__,
        "engine": _engine_attrs(vllm_config),
        "package_version": __version__,
    }


def _engine_attrs(vllm_config) -> dict[str, Any]:
    """How the engine runs (the selftest checks the runner and graph mode it asked for)."""
    scheduler = vllm_config.scheduler_config
    mode = vllm_config.compilation_config.cudagraph_mode
    return {
        "model_runner": "v2" if vllm_config.use_v2_model_runner else "v1",
        "async_scheduling": bool(scheduler.async_scheduling),
        "cudagraph_mode": getattr(mode, "name", str(mode)),
        "enforce_eager": bool(vllm_config.model_config.enforce_eager),
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
    }


def _served_name(model_config) -> str:
    name = model_config.served_model_name or model_config.model
    return name[0] if isinstance(name, (list, tuple)) else str(name)
