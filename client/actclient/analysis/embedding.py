"""Read a Hugging Face model directory without torch: safetensors tensors, config, special tokens.

safetensors is parsed by hand (8-byte little-endian header length, JSON header, raw bytes) and
memory-mapped, so gathering a few embedding rows or one weight matrix from a 60 GB checkpoint
reads only those bytes. bfloat16 widens to float32 exactly by a 16-bit shift. The embedding
output (layer 0's input) is `embed_tokens.weight[token_id]`: Llama, Qwen2 and Qwen3 do not scale
it; models that do (Gemma) are refused rather than rebuilt wrongly.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_activations.contract.tokens import special_token_ids  # noqa: F401 - part of this API

_DTYPES = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
}
_SCALED_EMBEDDINGS = ("gemma",)


class ModelFilesError(ValueError):
    """A model directory that lacks what the analyzer needs from it."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_metadata(path: str | Path) -> tuple[dict[str, TensorInfo], dict | None]:
    """Tensor name -> TensorInfo for one .safetensors file, and its `__metadata__`."""
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ModelFilesError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        header = json.loads(fh.read(length))
    start = 8 + length
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = TensorInfo(
            path, meta["dtype"], tuple(meta["shape"]), start + begin, end - begin
        )
    return out, header.get("__metadata__")


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one .safetensors file."""
    return read_safetensors_metadata(path)[0]


class Checkpoint:
    """The safetensors tensors of a model directory (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise ModelFilesError(
                f"{self.model_dir}: no *.safetensors files; pass the directory of a Hugging "
                "Face checkpoint saved with safetensors"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            self.tensors.update(read_safetensors_header(path))

    def find(self, suffix: str) -> str:
        """The unique tensor name ending with `suffix` (e.g. 'embed_tokens.weight')."""
        hits = [n for n in self.tensors if n == suffix or n.endswith("." + suffix)]
        if len(hits) != 1:
            raise ModelFilesError(
                f"{self.model_dir}: expected one tensor named *{suffix}, found {hits or 'none'}"
            )
        return hits[0]

    def _raw(self, name: str) -> np.memmap:
        info = self.tensors[name]
        if info.dtype not in _DTYPES:
            raise ModelFilesError(f"{name}: dtype {info.dtype} is not supported")
        return np.memmap(
            info.file, dtype=_DTYPES[info.dtype], mode="r", offset=info.offset, shape=info.shape
        )

    def rows(self, name: str, index: np.ndarray | slice) -> np.ndarray:
        """float32 rows of a 2-D tensor (reads only those rows)."""
        return _to_float32(np.asarray(self._raw(name)[index]), self.tensors[name].dtype)

    def tensor(self, name: str) -> np.ndarray:
        return self.rows(name, slice(None))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape


def _to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    (on the pod, HF_HOME is /workspace/hf)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def resolve_model_dir(value: str | Path) -> Path:
    """A model directory, or a hub id (`Qwen/Qwen3-32B-FP8`) found in the local Hugging Face
    cache: its `main` snapshot, else the newest one. Nothing is downloaded. Every reader here
    resolves its argument, so `analyze --model` and `plan --model` both take a hub id."""
    path = Path(value)
    if path.is_dir():
        return path
    text = str(value)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        snapshots = hf_hub_cache() / f"models--{text.replace('/', '--')}" / "snapshots"
        ref = snapshots.parent / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        found = sorted(snapshots.glob("*/"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise ModelFilesError(
            f"{text}: not a directory, and no snapshot of it in the Hugging Face cache "
            f"{hf_hub_cache()} (pass the model's folder, or `hf download {text}` first)"
        )
    raise ModelFilesError(f"{text}: no such model directory")


def load_config(model_dir: str | Path) -> dict:
    path = resolve_model_dir(model_dir) / "config.json"
    if not path.is_file():
        raise ModelFilesError(f"{model_dir}: no config.json")
    return json.loads(path.read_text())


class EmbeddingTable:
    """Rebuilds the embedding output (layer 0's input) from `embed_tokens.weight`."""

    def __init__(self, model_dir: str | Path) -> None:
        config = load_config(model_dir)
        model_type = str(config.get("model_type", ""))
        if model_type.startswith(_SCALED_EMBEDDINGS):
            raise ModelFilesError(
                f"{model_dir}: {model_type} scales its embeddings; rebuilding them is not "
                "supported, so layer 0 gets no input site"
            )
        self.checkpoint = Checkpoint(model_dir)
        self.name = self.checkpoint.find("embed_tokens.weight")
        self.vocab_size, self.hidden_size = self.checkpoint.shape(self.name)

    def __call__(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ModelFilesError(
                f"token id {int(ids.max())} is outside the embedding table ({self.vocab_size} "
                "rows): the shards come from another model"
            )
        unique, inverse = np.unique(ids, return_inverse=True)
        return self.checkpoint.rows(self.name, unique)[inverse]
