"""The activation shard: one HDF5 file per request. Schema, atomic writer and float32 reader.

The single definition of the on-disk contract, imported by the vLLM connector (writer), the
sidecar (serving files) and the client (reader, analyzer). It needs only numpy and h5py, never
vllm or torch, so a laptop can read shards.

Layout (schema version 1):
    input_tokens                 int32 [P]
    output_tokens                int32 [G]
    positions                    int32 [T]   absolute positions captured, ascending
    layers                       int32 [L]   decoder layer indices, ascending
    layer_outputs/post_attention [L, T, H]   residual after the attention add
    layer_outputs/post_mlp       [L, T, H]   residual after the MLP add (the layer's output)
    teacher/topk_ids             int32 [T, K]   (with teacher_logprobs) the served model's
    teacher/topk_logprobs        float32 [T, K] top-K next-token ids and logprobs at each
    teacher/next_logprob         float32 [T]    captured position, and the logprob of the
                                                token that followed (token positions[t] + 1)
HDF5 has no bfloat16: bf16 is stored as its raw bits in uint16 with attribute dtype="bfloat16"
(float16 would overflow on massive activations). Files are written under a hidden temporary
name, fsynced, then renamed, so a reader never sees a partial shard. A shard that gets teacher
data is first published under a hidden staging name (`staged_shard_path`); whoever holds the
logprobs (the sidecar) adds `teacher/` in place and renames it to its final name
(`publish_with_teacher`), so the final name never shows a shard without its teacher data.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vllm_activations.contract.files import publish
from vllm_activations.contract.spec import SITES

# 2: optional `summary/` group (summary capture), `layer_outputs/` may be empty (tensors off).
# 3: summary site-pair sums stored as one triangle (attribute `packed`).
SCHEMA_VERSION = 3
SHARD_SUFFIX = ".h5"
_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
_JSON_START = ("{", "[", '"')
_REQUIRED = ("input_tokens", "output_tokens", "positions", "layers")
TEACHER_GROUP = "teacher"
SUMMARY_GROUP = "summary"
_COMPRESS_BYTES = 4 << 10
# Stored: `content`, `rest` (the other kept tokens) and `last`; `all` is content + rest.
# Schema 2 stored `all`, `content` and `last`.
SUMMARY_POPULATIONS = ("all", "content", "last")
_STAGED_SUFFIX = ".teacher-pending"


class ShardError(ValueError):
    """A file that is not a complete, valid activation shard."""


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and return the raw bits as uint16."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float activations to the stored representation of `dtype`."""
    if dtype == "bfloat16":
        return float32_to_bf16_bits(x)
    return np.asarray(x, dtype=_STORAGE[dtype])


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Convert a stored array back to float32."""
    if dtype == "bfloat16":
        return bf16_bits_to_float32(x)
    return np.asarray(x, dtype=np.float32)


@dataclass
class TeacherData:
    """The teacher's next-token distribution at T captured positions, top K per position.

    Row t describes the distribution computed at position positions[t], i.e. over the token at
    positions[t] + 1: `topk_ids` int32 [T, K] and `topk_logprobs` float32 [T, K] in vLLM's
    rank order, `next_logprob` float32 [T] the logprob of the token that actually followed.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    next_logprob: np.ndarray

    def __post_init__(self) -> None:
        self.topk_ids = np.asarray(self.topk_ids, dtype=np.int32)
        self.topk_logprobs = np.asarray(self.topk_logprobs, dtype=np.float32)
        self.next_logprob = np.asarray(self.next_logprob, dtype=np.float32)
        t = len(self.next_logprob)
        if (
            self.topk_ids.ndim != 2
            or self.topk_ids.shape[0] != t
            or self.topk_logprobs.shape != self.topk_ids.shape
            or self.next_logprob.ndim != 1
        ):
            raise ShardError(
                f"teacher data shapes disagree: topk_ids {self.topk_ids.shape}, topk_logprobs "
                f"{self.topk_logprobs.shape}, next_logprob {self.next_logprob.shape}"
            )

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])


@dataclass
class Shard:
    """A shard read into memory; activations are float32 [L, T, H] keyed by site."""

    path: Path
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    positions: np.ndarray
    layers: np.ndarray
    layer_outputs: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherData | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The token id at every captured position."""
        return np.concatenate([self.input_tokens, self.output_tokens])[self.positions]


def write_shard(
    path: str | os.PathLike[str],
    *,
    input_tokens: Sequence[int] | np.ndarray,
    output_tokens: Sequence[int] | np.ndarray,
    positions: Sequence[int] | np.ndarray,
    layers: Sequence[int] | np.ndarray,
    layer_outputs: Mapping[str, np.ndarray],
    dtype: str,
    attrs: Mapping[str, Any] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    extra_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a shard atomically and return its final path.

    `layer_outputs[site]` is [L, T, H], either float32 (converted here) or already in the
    storage representation of `dtype` (uint16 bits for bfloat16); it may be a view whose
    layers are contiguous [T, H] blocks (written layer by layer, without a full copy).
    `attrs` values that are not HDF5 scalars or strings are stored as JSON. `extra` holds
    further named datasets (e.g. per-channel statistics) written as given (gzip-compressed,
    losslessly, from 4 KiB), `extra_attrs` attributes for some of them.
    """
    path = Path(path)
    positions = np.asarray(positions, dtype=np.int32)
    layers = np.asarray(layers, dtype=np.int32)
    if dtype not in _STORAGE:
        raise ShardError(f"dtype {dtype!r} is not one of {list(_STORAGE)}")
    # A staged shard gets its teacher data next (publish_with_teacher): it may hold no more yet.
    if not layer_outputs and not extra and not path.name.endswith(_STAGED_SUFFIX):
        raise ShardError("layer_outputs is empty and nothing else is recorded")
    for site, arr in layer_outputs.items():
        if site not in SITES:
            raise ShardError(f"unknown site {site!r}; allowed: {list(SITES)}")
        if arr.ndim != 3 or arr.shape[:2] != (len(layers), len(positions)):
            raise ShardError(
                f"layer_outputs/{site} has shape {arr.shape}, expected "
                f"[{len(layers)}, {len(positions)}, H]"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:  # compact metadata
            f.create_dataset("input_tokens", data=np.asarray(input_tokens, dtype=np.int32))
            f.create_dataset("output_tokens", data=np.asarray(output_tokens, dtype=np.int32))
            f.create_dataset("positions", data=positions)
            f.create_dataset("layers", data=layers)
            group = f.create_group("layer_outputs")
            for site in SITES:
                if site not in layer_outputs:
                    continue
                arr = layer_outputs[site]
                stored = arr if arr.dtype == _STORAGE[dtype] else to_storage(arr, dtype)
                if stored.flags.c_contiguous:
                    ds = group.create_dataset(site, data=stored)
                else:
                    # A view of a larger buffer (the connector's row store): write layer by
                    # layer, each a contiguous block, instead of copying the whole array.
                    ds = group.create_dataset(site, shape=stored.shape, dtype=stored.dtype)
                    for index in range(stored.shape[0]):
                        ds[index] = np.ascontiguousarray(stored[index])
                ds.attrs["dtype"] = dtype
            for name, arr in (extra or {}).items():
                arr = np.asarray(arr)
                if arr.nbytes >= _COMPRESS_BYTES:  # lossless; statistics are mostly regular
                    ds = f.create_dataset(
                        name, data=arr, compression="gzip", compression_opts=4, shuffle=True
                    )
                else:
                    ds = f.create_dataset(name, data=arr)
                for key, value in (extra_attrs or {}).get(name, {}).items():
                    ds.attrs[key] = value
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["dtype"] = dtype
            f.attrs.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            for key, value in (attrs or {}).items():
                f.attrs[key] = _attr_value(value)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def staged_shard_path(path: str | os.PathLike[str]) -> Path:
    """The hidden name a shard waits under until its teacher data is added (never listed by
    `iter_shard_paths`, never served)."""
    path = Path(path)
    return path.with_name(f".{path.name}{_STAGED_SUFFIX}")


def publish_with_teacher(
    staged: str | os.PathLike[str],
    final: str | os.PathLike[str],
    teacher: TeacherData,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Add `teacher/` to a staged shard, fsync it and rename it to its final name.

    The row count must equal the shard's `positions`. On any error the staged file is left
    as it was or half-extended, but still hidden: the final name only ever names a shard
    that has all its data.
    """
    staged, final = Path(staged), Path(final)
    with h5py.File(staged, "r+") as f:
        count = f["positions"].shape[0]
        if len(teacher.next_logprob) != count:
            raise ShardError(
                f"{staged}: teacher data has {len(teacher.next_logprob)} rows, the shard "
                f"{count} positions"
            )
        if TEACHER_GROUP in f:
            raise ShardError(f"{staged}: already has teacher data")
        group = f.create_group(TEACHER_GROUP)
        group.create_dataset("topk_ids", data=teacher.topk_ids)
        group.create_dataset("topk_logprobs", data=teacher.topk_logprobs)
        group.create_dataset("next_logprob", data=teacher.next_logprob)
        group.attrs["k"] = teacher.k
        for key, value in (attrs or {}).items():
            group.attrs[key] = _attr_value(value)
    publish(staged, final)
    return final


def read_shard(
    path: str | os.PathLike[str],
    *,
    sites: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> Shard:
    """Read a shard (optionally only some sites and layer indices) as float32 arrays."""
    with ShardReader(path) as reader:
        stored = reader.sites if reader.has_tensors else []
        wanted_sites = list(sites) if sites is not None else stored
        rows = reader.layer_rows(layers)
        outputs = {site: reader.read(site, rows) for site in wanted_sites}
        return Shard(
            path=reader.path,
            input_tokens=reader.input_tokens,
            output_tokens=reader.output_tokens,
            positions=reader.positions,
            layers=reader.layers[rows],
            layer_outputs=outputs,
            attrs=reader.attrs,
            teacher=reader.teacher(),
        )


class ShardReader:
    """Streaming access to one shard: metadata up front, activations one layer at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ShardError(f"{self.path}: not a readable HDF5 shard ({exc})") from exc
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self) -> None:
        f = self._file
        version = f.attrs.get("schema_version")
        if version is None:
            raise ShardError(f"{self.path}: no schema_version attribute; not an activation shard")
        if int(version) > SCHEMA_VERSION:
            raise ShardError(
                f"{self.path}: schema version {version} is newer than this reader "
                f"({SCHEMA_VERSION}); upgrade vllm-activations"
            )
        missing = [name for name in _REQUIRED if name not in f]
        if "layer_outputs" not in f:
            missing.append("layer_outputs")
        if missing:
            raise ShardError(f"{self.path}: missing datasets {missing}")
        self.input_tokens = f["input_tokens"][()].astype(np.int64)
        self.output_tokens = f["output_tokens"][()].astype(np.int64)
        self.positions = f["positions"][()].astype(np.int64)
        self.layers = f["layers"][()].astype(np.int64)
        stored = [s for s in SITES if s in f["layer_outputs"]]
        for site in stored:
            shape = f["layer_outputs"][site].shape
            if shape[:2] != (len(self.layers), len(self.positions)):
                raise ShardError(f"{self.path}: layer_outputs/{site} has shape {shape}")
        self.attrs = {key: _decode_attr(value) for key, value in f.attrs.items()}
        # Without raw tensors (`tensors: false`) the sites are the capture spec's.
        self.has_tensors = bool(stored)
        spec = (
            self.attrs.get("capture_spec")
            if isinstance(self.attrs.get("capture_spec"), dict)
            else {}
        )
        self.sites = stored or [s for s in SITES if s in (spec.get("sites") or ())]
        if TEACHER_GROUP in f:
            group = f[TEACHER_GROUP]
            t = len(self.positions)
            shapes = {name: group[name].shape for name in group}
            k = shapes.get("topk_ids", (0, 0))[-1]
            if shapes != {"topk_ids": (t, k), "topk_logprobs": (t, k), "next_logprob": (t,)}:
                raise ShardError(f"{self.path}: teacher datasets have shapes {shapes}, T={t}")

    @property
    def has_summary(self) -> bool:
        return SUMMARY_GROUP in self._file

    def summary(self) -> dict[str, dict[str, np.ndarray]]:
        """Per population (`all`, `content`, `last`, and `rest` as stored since schema 3), the
        token sums of summary capture over this shard's sites: `embedding` then each captured
        layer's sites (vllm_activations/summary.py says what each sum is)."""
        if SUMMARY_GROUP not in self._file:
            raise ShardError(f"{self.path}: no summary (captured without `summary: true`)")
        group = self._file[SUMMARY_GROUP]
        out = {}
        for population in group:
            out[population] = {}
            for name, ds in group[population].items():
                stored = _decode_attr(ds.attrs.get("dtype", ""))
                value = from_storage(ds[()], stored) if stored else ds[()]
                packed = _decode_attr(ds.attrs.get("packed", ""))
                out[population][name] = _unpack(value, packed, name) if packed else value
        if "all" not in out:
            out["all"] = merged_summary(out["content"], out["rest"])
        return out

    def teacher(self) -> TeacherData | None:
        """The teacher's top-K next-token data aligned with `positions`, if recorded."""
        if TEACHER_GROUP not in self._file:
            return None
        group = self._file[TEACHER_GROUP]
        return TeacherData(
            topk_ids=group["topk_ids"][()],
            topk_logprobs=group["topk_logprobs"][()],
            next_logprob=group["next_logprob"][()],
        )

    @property
    def hidden_size(self) -> int:
        if not self.has_tensors:  # tensors off: the model's width from the attributes
            return int(self.attrs["hidden_size"])
        return int(self._file["layer_outputs"][self.sites[0]].shape[2])

    def layer_rows(self, layers: Sequence[int] | None) -> np.ndarray:
        """Row indices into [L] for the requested absolute layer indices."""
        if layers is None:
            return np.arange(len(self.layers))
        index = {int(x): i for i, x in enumerate(self.layers)}
        missing = [x for x in layers if int(x) not in index]
        if missing:
            raise ShardError(
                f"{self.path}: layers {missing} were not captured (has {self.layers.tolist()})"
            )
        return np.array([index[int(x)] for x in layers], dtype=np.int64)

    def read(self, site: str, rows: np.ndarray | int | None = None) -> np.ndarray:
        """float32 activations of `site` for layer rows (all when None)."""
        if site not in self.sites:
            raise ShardError(f"{self.path}: site {site!r} not captured (has {self.sites})")
        ds = self._file["layer_outputs"][site]
        dtype = _decode_attr(ds.attrs.get("dtype", "float32"))
        if rows is None:
            data = ds[()]
        elif isinstance(rows, (int, np.integer)):
            data = ds[int(rows)]
        else:
            rows = np.asarray(rows)
            # h5py fancy indexing needs increasing indices.
            order = np.argsort(rows)
            data = ds[rows[order].tolist()] if len(rows) else ds[0:0]
            data = data[np.argsort(order)]
        return from_storage(data, dtype)

    def dataset(self, name: str) -> np.ndarray:
        return self._file[name][()]

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_shard_paths(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Complete shard files in a directory, sorted by name (temporary files are hidden)."""
    for path in sorted(Path(directory).glob(f"*{SHARD_SUFFIX}")):
        if not path.name.startswith("."):
            yield path


def _attr_value(value: Any) -> Any:
    # Strings that could be mistaken for JSON, or hold NULs (HDF5 strings cannot), are stored
    # JSON-encoded; _decode_attr undoes exactly that.
    if isinstance(value, str) and not (value[:1] in _JSON_START or "\x00" in value):
        return value
    if isinstance(value, (int, float, bool, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True)


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in _JSON_START:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# A summary's per-channel moments (channel_mean, channel_m2) keep this many of float32's 23
# mantissa bits, rounded to nearest: a relative error of at most 2^-11 (4.9e-4), 4x below the
# rounding of the bf16 activations they summarise (2^-9). The dropped bits are zero, which
# gzip after byte shuffling stores almost for free; the datasets say it (`mantissa_bits`).
MOMENT_MANTISSA_BITS = 10


def round_mantissa(values: np.ndarray, bits: int = MOMENT_MANTISSA_BITS) -> np.ndarray:
    """float32 `values` rounded to nearest (ties away from zero) with `bits` mantissa bits;
    values that are not finite, or would round past float32's range, stay as they are."""
    out = np.array(values, dtype=np.float32)  # a copy
    drop = 23 - bits
    if drop <= 0:
        return out
    word = out.view(np.uint32)
    mask = np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    rounded = ((word + np.uint32(1 << (drop - 1))) & mask).view(np.float32)
    keep = np.isfinite(out) & np.isfinite(rounded)
    out[keep] = rounded[keep]
    return out


# Site-pair sums stored as one triangle: cosines (symmetric) with the diagonal, angles (held
# in the upper triangle only) without it. Unpacked by ShardReader.summary.
_PACKED = {"cos_sum": 0, "cos_sq_sum": 0, "angle_sum": 1}


def _unpack(value: np.ndarray, packed: str, name: str) -> np.ndarray:
    offset = int(packed.split(":")[1])
    n = int(round((np.sqrt(8 * len(value) + 1) - 1) / 2)) + offset  # len = m(m+1)/2, m = n - offset
    full = np.zeros((n, n), dtype=value.dtype)
    rows, cols = np.triu_indices(n, offset)
    full[rows, cols] = value
    if name != "angle_sum":  # symmetric
        full[cols, rows] = value
    return full


def merged_summary(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The summary of two disjoint token sets: sums add, maxima take the larger, and the
    per-channel mean and M2 combine by Chan et al.'s formula (float64)."""
    na, nb = int(a["count"]), int(b["count"])
    n = na + nb
    out = {}
    for name, value in a.items():
        if name == "absmax":
            out[name] = np.maximum(value, b[name])
        elif name not in ("channel_mean", "channel_m2"):
            out[name] = value + b[name]
    mean_a = np.asarray(a["channel_mean"], np.float64)
    delta = np.asarray(b["channel_mean"], np.float64) - mean_a
    out["channel_mean"] = mean_a + delta * (nb / n) if n else mean_a
    m2 = np.asarray(a["channel_m2"], np.float64) + np.asarray(b["channel_m2"], np.float64)
    out["channel_m2"] = m2 + delta * delta * (na * nb / n) if n else m2
    return out


def summary_datasets(
    result: Mapping[str, Mapping[str, np.ndarray]], dtype: str
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """`summary/{population}/{name}` datasets for write_shard's `extra`, compact: per-channel
    moments as float32 mean and M2 (from float64 sums, `MOMENT_MANTISSA_BITS` kept), max |x|
    and the `last` token's own vector in the shard's activation dtype, site-pair sums as
    float32, and the rest as given.
    The `last` population is one token: its vector `x` replaces its per-channel sums.
    Returns (datasets, their attributes): activation-dtype datasets carry `dtype`."""
    out: dict[str, np.ndarray] = {}
    stored_as: dict[str, dict[str, Any]] = {}
    for population, sums in result.items():
        prefix = f"{SUMMARY_GROUP}/{population}/"
        count = int(sums["count"])
        for name, value in sums.items():
            if name in ("x_sum", "x_sq_sum", "absmax", "massive_count") and population == "last":
                continue
            if name in ("x_sum", "x_sq_sum"):
                continue
            if name in ("cos_sum", "cos_sq_sum", "angle_sum", "update_ratio_sum"):
                value = np.asarray(value, dtype=np.float32)
            if name in _PACKED:  # symmetric (cosines) or upper-only (angles): one triangle
                offset = _PACKED[name]
                value = value[np.triu_indices(len(value), offset)]
                stored_as[prefix + name] = {"packed": f"triu:{offset}"}
            if name == "absmax":
                value = to_storage(np.asarray(value, dtype=np.float32), dtype)
                stored_as[prefix + name] = {"dtype": dtype}
            out[prefix + name] = np.asarray(value)
        if population == "last":
            x = np.asarray(sums["x_sum"], dtype=np.float32)  # one token: its own vector
            out[prefix + "x"] = to_storage(x, dtype)
            stored_as[prefix + "x"] = {"dtype": dtype}
            continue
        mean = sums["x_sum"] / max(count, 1)
        m2 = np.maximum(sums["x_sq_sum"] - count * mean * mean, 0.0)
        for name, value in (("channel_mean", mean), ("channel_m2", m2)):
            out[prefix + name] = round_mantissa(value)
            stored_as[prefix + name] = {"mantissa_bits": MOMENT_MANTISSA_BITS}
    return out, stored_as
