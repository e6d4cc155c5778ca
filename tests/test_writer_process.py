"""The shard writer process: frames carry the arrays out of band and intact, the shard it
writes is the one `write_shard` writes in-process, errors come back as messages, and a dead
child is replaced for the next shard."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pytest

from vllm_activations.connector.writer import WriterProcess
from vllm_activations.contract.shard import read_shard, write_shard
from vllm_activations.writer_process import encode_frame, read_frame

MODEL = "tiny-qwen3-tied"


def job_for(path, rng, layers=3, tokens=5, hidden=8):
    # A strided view, as the row store hands over (the first `tokens` of a larger capacity).
    store = rng.integers(0, 2**16, (layers, 2 * tokens, hidden), dtype=np.uint16)[:, :tokens]
    return {
        "path": str(path),
        "decode": {"prompt": [1, 2, 3], "completion": [4, 5]},
        "write_shard": dict(
            input_tokens=[1, 2, 3],
            output_tokens=[4, 5],
            positions=list(range(tokens)),
            layers=list(range(layers)),
            layer_outputs={"post_attention": store, "post_mlp": np.ascontiguousarray(store)},
            dtype="bfloat16",
            attrs={"model": "m", "capture_id": path.stem},
            extra={"channel_stats/mlp_intermediate/sum": rng.random((layers, 4))},
            extra_attrs={},
        ),
    }


def test_a_frame_round_trips_arrays_out_of_band(tmp_path):
    rng = np.random.default_rng(0)
    job = job_for(tmp_path / "a.h5", rng)
    chunks = encode_frame(job)
    # The contiguous array travels as its own buffer, not inside the pickle.
    contiguous = job["write_shard"]["layer_outputs"]["post_mlp"]
    assert any(isinstance(c, memoryview) and c.nbytes == contiguous.nbytes for c in chunks)
    stream = io.BytesIO(b"".join(bytes(c) for c in chunks) * 2)
    for _ in range(2):
        back = read_frame(stream)
        for site, array in job["write_shard"]["layer_outputs"].items():
            np.testing.assert_array_equal(back["write_shard"]["layer_outputs"][site], array)
        assert back["decode"] == job["decode"]
    assert read_frame(stream) is None  # end of input
    truncated = io.BytesIO(b"".join(bytes(c) for c in chunks)[:-3])
    assert read_frame(truncated) is None


def test_the_child_writes_what_write_shard_writes_and_reports_errors(tmp_path, embedded_models):
    rng = np.random.default_rng(1)
    child = WriterProcess(str(embedded_models[MODEL]), None, False)
    try:
        job = job_for(tmp_path / "child.h5", rng)
        child.call(job)
        kwargs = dict(job["write_shard"])
        attrs = dict(kwargs.pop("attrs"), prompt="x", completion="y")
        write_shard(tmp_path / "here.h5", attrs=attrs, **kwargs)
        a, b = read_shard(tmp_path / "child.h5"), read_shard(tmp_path / "here.h5")
        for site in a.layer_outputs:
            np.testing.assert_array_equal(a.layer_outputs[site], b.layer_outputs[site])
        assert a.input_tokens.tolist() == [1, 2, 3] and a.output_tokens.tolist() == [4, 5]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(embedded_models[MODEL])
        assert a.attrs["prompt"] == tokenizer.decode([1, 2, 3])
        assert a.attrs["completion"] == tokenizer.decode([4, 5])

        bad = job_for(tmp_path / "bad.h5", rng)
        bad["write_shard"]["positions"] = [0]  # 5 rows captured, 1 position named
        with pytest.raises(RuntimeError) as info:
            child.call(bad)
        assert "position" in str(info.value).lower() or "shape" in str(info.value).lower()
        assert not (tmp_path / "bad.h5").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

        # A killed child is replaced for the next shard.
        dead = child.start()
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        child.call(job_for(tmp_path / "after.h5", rng))
        assert read_shard(tmp_path / "after.h5").layers.tolist() == [0, 1, 2]
        assert child.start().pid != dead.pid
    finally:
        child.close()


def test_writer_threads_write_side_by_side_each_with_its_own_process(tmp_path, embedded_models):
    """`ShardWriterThread` with two writers: every submitted request's shard is written, by
    two distinct child processes (shards of requests finishing together go side by side), and
    close() ends them all; the writer count comes from $VLLM_ACTIVATIONS_SHARD_WRITERS."""
    from types import SimpleNamespace

    from vllm_activations.connector.protocol import FinishedCapture, NewCapture, shard_path
    from vllm_activations.connector.writer import ShardWriterThread, WorkerRequest
    from vllm_activations.contract.spec import CaptureSpec

    model_config = SimpleNamespace(
        tokenizer=str(embedded_models[MODEL]), tokenizer_revision=None, trust_remote_code=False
    )
    writer = ShardWriterThread(
        SimpleNamespace(model_config=model_config), {"hidden_size": 8}, writers=2
    )
    spec = CaptureSpec(positions="generated")  # one generated token: no rows to keep
    ids = [f"req{i}" for i in range(8)]
    try:
        for capture_id in ids:
            new = NewCapture(capture_id, spec.to_dict(), [0, 1], [1, 2, 3], {"max_tokens": 1})
            writer.submit(tmp_path, WorkerRequest(new, spec), FinishedCapture([4], "length"))
        pids = set()
        for child in writer._children:  # noqa: SLF001 - the pool's processes
            pids.add(child.start().pid)
    finally:
        writer.close()
    assert len(pids) == 2
    for capture_id in ids:
        shard = read_shard(shard_path(tmp_path, capture_id))
        assert shard.input_tokens.tolist() == [1, 2, 3] and shard.layers.tolist() == [0, 1]


def test_shard_writer_count_from_the_environment(monkeypatch):
    from vllm_activations.connector.writer import shard_writers
    from vllm_activations.plugin import DEFAULT_SHARD_WRITERS, SHARD_WRITERS_ENV

    monkeypatch.delenv(SHARD_WRITERS_ENV, raising=False)
    assert shard_writers() == DEFAULT_SHARD_WRITERS
    monkeypatch.setenv(SHARD_WRITERS_ENV, "3")
    assert shard_writers() == 3
    monkeypatch.setenv(SHARD_WRITERS_ENV, "0")
    assert shard_writers() == 1
    monkeypatch.setenv(SHARD_WRITERS_ENV, "two")
    with pytest.raises(ValueError, match=SHARD_WRITERS_ENV):
        shard_writers()
