"""Shard writer process: HDF5 encoding, tokenizer decoding and fsync run here, in their own
process, so none of it holds the engine worker's GIL.

The worker's writer thread (`connector.writer.ShardWriterThread`) sends one job per finished request
over this process's stdin and reads one reply line from its stdout. A frame is the job
pickled with protocol 5 plus its large arrays as out-of-band buffers (no pickle copy of the
activations; the pipe write releases the GIL):

    u64 payload length | u32 buffer count | payload | (u64 length | bytes) per buffer

A job is `{"path", "decode": {attr: token ids}, "write_shard": kwargs}`: decode each attr
with the served model's tokenizer, then `contract.shard.write_shard(path, **kwargs)`, which
publishes the shard atomically (staged, fsynced, renamed, folder fsynced), then announces it
to the sidecar (`vllm_activations.announce`). The reply is one
JSON line, `{"ok": true}` or `{"error": "..."}`. End of input ends the process after the job
in hand. Only numpy, h5py and the tokenizer are imported here: no torch, no vllm.

    python -m vllm_activations.writer_process TOKENIZER [REVISION] [--trust-remote-code]
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from typing import Any, BinaryIO

_HEAD = struct.Struct("<QI")
_LEN = struct.Struct("<Q")


def encode_frame(job: dict[str, Any]) -> list[bytes | memoryview]:
    """The frame of one job, as a list of byte chunks to write in order."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(job, protocol=5, buffer_callback=buffers.append)
    chunks: list[bytes | memoryview] = [_HEAD.pack(len(payload), len(buffers)), payload]
    for buffer in buffers:
        raw = buffer.raw()
        chunks += [_LEN.pack(raw.nbytes), raw]
    return chunks


def _read_exact(stream: BinaryIO, n: int) -> bytearray | None:
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return data


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    """The next job, or None at end of input."""
    head = _read_exact(stream, _HEAD.size)
    if head is None:
        return None
    length, count = _HEAD.unpack(head)
    payload = _read_exact(stream, length)
    if payload is None:
        return None
    buffers = []
    for _ in range(count):
        size = _read_exact(stream, _LEN.size)
        data = _read_exact(stream, _LEN.unpack(size)[0]) if size is not None else None
        if data is None:
            return None
        buffers.append(data)
    return pickle.loads(payload, buffers=buffers)


class _Tokenizer:
    def __init__(self, name: str, revision: str | None, trust_remote_code: bool) -> None:
        self.name, self.revision, self.trust = name, revision, trust_remote_code
        self._tokenizer = None

    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.name, revision=self.revision or None, trust_remote_code=self.trust
            )
        return self._tokenizer.decode(ids)


def run_job(job: dict[str, Any], tokenizer: _Tokenizer) -> None:
    from vllm_activations.announce import announce
    from vllm_activations.contract.shard import write_shard

    kwargs = dict(job["write_shard"])
    attrs = dict(kwargs.pop("attrs"))
    for attr, ids in job.get("decode", {}).items():
        attrs[attr] = tokenizer.decode(ids)
    announce(write_shard(job["path"], attrs=attrs, **kwargs))


def main(argv: list[str]) -> int:
    trust = "--trust-remote-code" in argv
    args = [a for a in argv if a != "--trust-remote-code"]
    tokenizer = _Tokenizer(args[0], args[1] if len(args) > 1 else None, trust)
    # Replies go to the original stdout; anything a library prints goes to stderr instead.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    try:  # ready before the first shard (loading a tokenizer takes seconds)
        tokenizer.decode([0])
    except Exception as exc:  # noqa: BLE001 - reported with the first shard that needs it
        print(f"vllm-activations writer: tokenizer {args[0]!r}: {exc}", file=sys.stderr)
    while True:
        job = read_frame(stdin)
        if job is None:
            return 0
        try:
            run_job(job, tokenizer)
        except Exception as exc:  # noqa: BLE001 - the reply carries it to the error file
            reply.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        else:
            reply.write('{"ok": true}\n')


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
