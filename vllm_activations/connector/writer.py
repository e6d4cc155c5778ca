"""Shard writer: threads that check a finished request's rows and statistics, off the step
loop, and hand its shard to a writer process (`writer_process`; one per thread,
$VLLM_ACTIVATIONS_SHARD_WRITERS of them, default 2), which writes it atomically; or write
`<capture_id>.error.json` saying what is missing. Requests that finish in the same step are
written side by side."""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_activations.announce import announce
from vllm_activations.connector.protocol import FinishedCapture, NewCapture, error_path, shard_path
from vllm_activations.connector.row_store import NUMPY_STORAGE, RowStore
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.plugin import DEFAULT_SHARD_WRITERS, SHARD_WRITERS_ENV
from vllm_activations.writer_process import encode_frame

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


class WriterProcess:
    """The shard writer process (`writer_process`): started on first use, and again after it
    died; `call` sends one job and waits for its reply (the wait releases the GIL)."""

    def __init__(self, tokenizer: str, revision: str | None, trust_remote_code: bool) -> None:
        self._argv = [sys.executable, "-m", "vllm_activations.writer_process"]
        self._argv += [tokenizer, revision or ""]
        if trust_remote_code:
            self._argv.append("--trust-remote-code")
        self._proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
            )
        return self._proc

    def call(self, job: dict[str, Any]) -> None:
        """Run one job; raises RuntimeError with the child's error, or if it died."""
        proc = self.start()
        try:
            for chunk in encode_frame(job):
                view = memoryview(chunk).cast("B")
                while view:  # a raw pipe write may take part of a large chunk
                    view = view[proc.stdin.write(view) :]
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            line, problem = b"", exc
        else:
            problem = None
        if not line:
            rc = proc.wait(timeout=30)
            self._proc = None
            raise RuntimeError(f"the shard writer process exited (status {rc}): {problem or ''}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()  # end of input: the child finishes and exits
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def shard_writers() -> int:
    """How many writer processes to run ($VLLM_ACTIVATIONS_SHARD_WRITERS, at least 1)."""
    raw = os.environ.get(SHARD_WRITERS_ENV, "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_SHARD_WRITERS
    except ValueError:
        raise ValueError(f"${SHARD_WRITERS_ENV} must be a whole number, not {raw!r}") from None


class ShardWriterThread:
    """Checks finished requests and hands their shards to the writer processes, off the
    engine's step loop: `writers` threads take submitted requests in order, each with its own
    process, so shards of requests that finish together are written side by side."""

    def __init__(self, vllm_config, model_attrs: dict[str, Any], writers: int | None = None):
        self._queue: queue.Queue = queue.Queue()
        self._model_attrs = model_attrs
        model_config = vllm_config.model_config
        self._children = [
            WriterProcess(
                model_config.tokenizer,
                model_config.tokenizer_revision,
                model_config.trust_remote_code,
            )
            for _ in range(writers or shard_writers())
        ]
        # Special token ids the summary's `content` population left out (recorded per shard).
        self.special_ids: list[int] = []
        self._threads = [
            threading.Thread(
                target=self._run, args=(child,), name=f"vllm-activations-writer-{i}", daemon=True
            )
            for i, child in enumerate(self._children)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, shard_dir: Path, state: WorkerRequest, fin: FinishedCapture) -> None:
        self._queue.put((shard_dir, state, fin))

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        for child in self._children:
            child.close()

    def _run(self, child: WriterProcess) -> None:
        child.start()
        while True:
            item = self._queue.get()
            if item is None:
                return
            shard_dir, state, fin = item
            try:
                self._write(child, shard_dir, state, fin)
            except Exception as exc:  # noqa: BLE001 - reported to the client via the error file
                logger.exception("vllm-activations: shard %s failed", state.new.capture_id)
                _write_error(shard_dir, state.new.capture_id, f"shard write failed: {exc}")

    def _write(
        self, child: WriterProcess, shard_dir: Path, state: WorkerRequest, fin: FinishedCapture
    ) -> None:
        from vllm_activations.contract.shard import staged_shard_path

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
        extra_attrs: dict[str, dict[str, Any]] = {}
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
        job = {
            # Teacher logprobs exist only in the API response: the sidecar adds them to the
            # staged (hidden) shard and renames it to `final` (shard.publish_with_teacher).
            "path": str(staged_shard_path(final) if spec.teacher_logprobs else final),
            "decode": {"prompt": new.prompt_token_ids, "completion": fin.output_token_ids},
            "write_shard": dict(
                input_tokens=new.prompt_token_ids,
                output_tokens=fin.output_token_ids,
                positions=expected,
                layers=new.layers,
                layer_outputs=outputs,
                dtype=spec.dtype,
                attrs=attrs,
                extra=extra or None,
                extra_attrs=extra_attrs,
            ),
        }
        child.call(job)


def _write_error(shard_dir: Path, capture_id: str, message: str) -> None:
    path = error_path(shard_dir, capture_id)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"capture_id": capture_id, "error": message}))
    os.replace(tmp, path)
    announce(path)


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
