"""`actclient prune`: write a pruned Hugging Face checkpoint from a pruning plan, without torch.

Layer deletion copies every kept tensor as raw bytes from the source safetensors files (the
8-byte header length, the JSON header, then byte ranges), so kept weights are byte-identical
to the source for any dtype, bfloat16 and FP8 included. `...layers.{i}.` is renamed to the
kept layer's new index; the sharding of the source (model.safetensors.index.json) is kept.
The config gets the new `num_hidden_layers`, per-layer lists (`layer_types`, ...) filtered to
the kept layers, `max_window_layers` remapped, and the provenance under `actclient_pruning`.

Optional MLP neuron pruning (`--neurons`, from the plan's neuron section) keeps the rows of
gate_proj/up_proj and the columns of down_proj of the kept neurons: a slice of the raw
element bits (bf16 as uint16), so every kept element is still bit-identical; the width must be
the same in every layer so the result is a standard config with a new `intermediate_size`.

Optional FLAP bias compensation (`--bias-compensation`, An et al. 2024): a removed input
channel j of down_proj (an MLP neuron) or o_proj (a head's channels) contributed
W[:, j] * x_j to the output; its mean over the recorded tokens, W[:, removed] @ mean(x[removed]),
is added to that projection's bias. The means are sum / count of the analysis's channel
statistics (`mlp_intermediate`, `attn_heads`), computed in float64 from the stored weights and
written in the weight's dtype. Only Llama takes it: its config's `mlp_bias` / `attention_bias`
add the biases (also on gate/up and q/k/v, written as zeros), and vLLM's Llama builds them too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from actclient import __version__
from actclient.analysis.budget import BUDGET_STRATEGIES
from actclient.analysis.embedding import (
    Checkpoint,
    ModelFilesError,
    TensorInfo,
    load_config,
    read_safetensors_metadata,
)
from actclient.analysis.params import ModelShape, ParamCountError
from actclient.analysis.plan import LAYER_STRATEGIES
from actclient.progress import Progress

PROVENANCE_KEY = "actclient_pruning"
INDEX_NAME = "model.safetensors.index.json"
# Files that are weights in another format: not copied (the pruned model is safetensors only).
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx", ".ckpt")
_LAYER_NAME = re.compile(r"^((?:.*\.)?layers\.)(\d+)(\..+)$")
# Config lists that name layer indices (remapped), as opposed to per-layer lists (filtered).
_INDEX_LISTS = ("mlp_only_layers",)
_MLP_ROWS = ("mlp.gate_proj", "mlp.up_proj")  # [intermediate, hidden]: keep rows
_MLP_COLS = ("mlp.down_proj",)  # [hidden, intermediate]: keep columns
_ITEM_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_ITEMSIZE = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_COPY_CHUNK = 64 * 2**20
# Why each architecture other than Llama cannot take FLAP's output-projection biases.
_NO_BIAS_COMPENSATION = {
    "qwen3": "Qwen3 has no MLP bias option, and vLLM's Qwen3 builds o_proj without a bias "
    "(transformers' attention_bias would add one that vLLM does not load)",
    "qwen2": "Qwen2 has biases on q/k/v only: no config option adds one to o_proj or down_proj",
    "mistral": "Mistral has no bias option on o_proj or the MLP",
}
# output projection -> (the channel statistic of its input, the Llama config key, the modules
# the key gives a bias)
_COMPENSATED = {
    "down_proj": ("mlp_intermediate", "mlp_bias", ("gate_proj", "up_proj", "down_proj")),
    "o_proj": ("attn_heads", "attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj")),
}
_FLOAT_DTYPES = {"BF16", "F16", "F32"}
_MEAN_PARTS = ("layers", "sum", "count")


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message says what to change."""


@dataclass
class LayerSelection:
    """Which source layers are dropped, and where the choice came from."""

    dropped: list[int]
    source: dict = field(default_factory=dict)  # provenance: plan path, strategy, scores


@dataclass
class NeuronSelection:
    """MLP neurons kept per source layer (uniform count), from a plan's neuron section."""

    kept: dict[int, np.ndarray]
    source: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return len(next(iter(self.kept.values())))


@dataclass
class WidthSelection:
    """Every width cut of a budget plan: kept MLP neurons and query heads per source layer,
    kept hidden channels (one set for the whole model); None where an axis is not cut."""

    mlp: dict[int, np.ndarray] | None
    heads: dict[int, np.ndarray] | None  # kept query-head indices, in source order
    hidden: np.ndarray | None
    widths: dict[str, int]
    source: dict = field(default_factory=dict)

    def cuts(
        self, name: str, layer: int | None, shape: tuple[int, ...]
    ) -> list[tuple[int, np.ndarray]]:
        """(axis, kept indices) pairs for tensor `name` of source layer `layer`."""
        parts = name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
        if kind not in ("weight", "bias"):
            raise PruneError(f"{name}: cannot prune the width of a quantized tensor")
        out: list[tuple[int, np.ndarray]] = []
        hidden_axis = _HIDDEN_AXIS.get((module, kind))
        if self.hidden is not None:
            if hidden_axis is not None:
                out.append((hidden_axis, self.hidden))
            elif module not in _NO_HIDDEN_AXIS:
                raise PruneError(
                    f"{name} (shape {list(shape)}): hidden-size pruning does not know this "
                    "tensor; refusing rather than leaving it at the old width"
                )
        if layer is not None and self.mlp is not None:
            if module in ("gate_proj", "up_proj"):
                out.append((0, self.mlp[layer]))
            elif module == "down_proj" and kind == "weight":
                out.append((1, self.mlp[layer]))
        if layer is not None and self.heads is not None and module in ("q_proj", "o_proj"):
            d = self.widths["head_dim"]
            channels = (self.heads[layer][:, None] * d + np.arange(d)).ravel()
            if module == "q_proj":
                out.append((0, channels))
            elif kind == "weight":
                out.append((1, channels))
        return out


@dataclass
class ChannelMeans:
    """Per-layer mean of each input channel of down_proj and o_proj over the recorded tokens."""

    mean: dict[str, dict[int, np.ndarray]]  # channel kind -> source layer -> [channels]
    source: dict = field(default_factory=dict)

    @classmethod
    def load(cls, analysis_dir: str | Path) -> ChannelMeans:
        """sum / count of an analysis's channel statistics (arrays/channel_stats_*)."""
        arrays = Path(analysis_dir) / "arrays"
        mean: dict[str, dict[int, np.ndarray]] = {}
        tokens = {}
        for kind, _, _ in _COMPENSATED.values():
            parts = {p: arrays / f"channel_stats_{kind}_{p}.npy" for p in _MEAN_PARTS}
            if not all(path.is_file() for path in parts.values()):
                continue
            layers, total, count = (np.load(path) for path in parts.values())
            if (count == 0).any():
                raise PruneError(f"{arrays}: channel_stats_{kind} counts no token in some layer")
            mean[kind] = {int(k): total[i] / count[i] for i, k in enumerate(layers)}
            tokens[kind] = int(count[0])
        if not mean:
            raise PruneError(
                f"{arrays}: no channel statistics for bias compensation (record with "
                "channel_stats and analyze the shards)"
            )
        return cls(mean, {"analysis": str(analysis_dir), "tokens": tokens})


# (module, weight|bias) -> the axis of length hidden_size
_HIDDEN_AXIS = {
    ("embed_tokens", "weight"): 1,
    ("lm_head", "weight"): 1,
    ("norm", "weight"): 0,
    ("input_layernorm", "weight"): 0,
    ("post_attention_layernorm", "weight"): 0,
    ("q_proj", "weight"): 1,
    ("k_proj", "weight"): 1,
    ("v_proj", "weight"): 1,
    ("o_proj", "weight"): 0,
    ("o_proj", "bias"): 0,
    ("gate_proj", "weight"): 1,
    ("up_proj", "weight"): 1,
    ("down_proj", "weight"): 0,
    ("down_proj", "bias"): 0,
}
# tensors without a hidden-size axis: head_dim norms, q/k/v and gate/up biases
_NO_HIDDEN_AXIS = ("q_norm", "k_norm", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def budget_strategy(
    plan: dict, strategy: str, plan_path: str | Path | None = None
) -> tuple[LayerSelection, WidthSelection]:
    """The layers and widths of one strategy of a budget plan (`plan --target-params`)."""
    strategies = plan.get("budget", {}).get("strategies")
    if not strategies:
        raise PruneError("the plan has no budget section (make it with plan --target-params)")
    if strategy not in strategies:
        raise PruneError(
            f"the plan has no budget strategy {strategy!r}; it has {sorted(strategies)}"
        )
    entry = strategies[strategy]
    if "skipped" in entry:
        raise PruneError(f"the plan skipped budget strategy {strategy!r}: {entry['skipped']}")
    source = {
        "plan": str(plan_path) if plan_path is not None else None,
        "analysis": plan.get("analysis"),
        "budget_strategy": strategy,
        "rule": entry.get("rule"),
        "target_params": plan["budget"].get("target_params"),
        "params": entry.get("params"),
    }
    widths = entry["widths"]
    before = plan["budget"]["source_shape"]

    def kept(section: dict | None, size: int) -> dict[int, np.ndarray] | None:
        if not section:
            return None
        return {
            int(e["layer"]): np.setdiff1d(np.arange(size), np.asarray(e["pruned"], dtype=np.int64))
            for e in section["layers"]
        }

    hidden = entry.get("hidden")
    selection = WidthSelection(
        mlp=kept(entry.get("mlp"), before["intermediate_size"]),
        heads=kept(entry.get("heads"), before["num_attention_heads"]),
        hidden=(
            np.setdiff1d(np.arange(before["hidden_size"]), np.asarray(hidden["pruned"], np.int64))
            if hidden
            else None
        ),
        widths=dict(widths),
        source=source,
    )
    return LayerSelection(sorted(entry["dropped_layers"]), dict(source)), selection


def load_plan(path: str | Path) -> dict:
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PruneError(f"{path}: cannot read the plan ({exc})") from exc
    if "strategies" not in plan.get("layers", {}) and "strategies" not in plan.get("budget", {}):
        raise PruneError(f"{path}: not a plan from `actclient plan` (no strategies)")
    return plan


def layers_from_plan(
    plan: dict, strategy: str, plan_path: str | Path | None = None
) -> LayerSelection:
    """The dropped layers of one strategy of a plan, with its rule and scores as provenance."""
    strategies = plan["layers"]["strategies"]
    if strategy not in strategies:
        raise PruneError(f"the plan has no strategy {strategy!r}; it has {sorted(strategies)}")
    entry = strategies[strategy]
    if "skipped" in entry:
        raise PruneError(f"the plan skipped strategy {strategy!r}: {entry['skipped']}")
    return LayerSelection(
        dropped=sorted(int(d["layer"]) for d in entry["dropped"]),
        source={
            "plan": str(plan_path) if plan_path is not None else None,
            "analysis": plan.get("analysis"),
            "strategy": strategy,
            "rule": entry.get("rule"),
            "tokens": plan["layers"].get("tokens"),
            "dropped_scores": entry["dropped"],
            **({"block": entry["block"]} if "block" in entry else {}),
            **(
                {"angular_distance": entry["angular_distance"]}
                if "angular_distance" in entry
                else {}
            ),
        },
    )


def neurons_from_plan(plan: dict, plan_path: str | Path | None = None) -> NeuronSelection:
    """The MLP neurons to keep per layer from the plan's neuron section."""
    mlp = plan.get("neurons", {}).get("mlp")
    if not mlp:
        why = plan.get("neurons", {}).get("skipped", "the plan has no neurons.mlp section")
        raise PruneError(f"no MLP neuron plan: {why}")
    before = int(mlp["intermediate_size_before"])
    kept = {
        int(e["layer"]): np.setdiff1d(np.arange(before), np.asarray(e["pruned"], dtype=np.int64))
        for e in mlp["layers"]
    }
    widths = {len(v) for v in kept.values()}
    if len(widths) != 1:
        raise PruneError(f"the neuron plan keeps different widths per layer ({sorted(widths)})")
    return NeuronSelection(
        kept=kept,
        source={
            "plan": str(plan_path) if plan_path is not None else None,
            "score": mlp.get("score"),
            "fraction": mlp.get("fraction"),
            "intermediate_size_before": before,
            "intermediate_size_after": widths.pop(),
        },
    )


def pruned_config(config: dict, kept: list[int], provenance: dict) -> dict:
    """The config for a model that keeps source layers `kept` (in order)."""
    total = int(config["num_hidden_layers"])
    out = dict(config)
    out["num_hidden_layers"] = len(kept)
    for key, value in config.items():
        if key in _INDEX_LISTS and isinstance(value, list):
            new = {old: k for k, old in enumerate(kept)}
            out[key] = [new[i] for i in value if i in new]
        elif "layer" in key and isinstance(value, list) and len(value) == total:
            out[key] = [value[i] for i in kept]
    if isinstance(config.get("max_window_layers"), int):
        # Layers below this index use full attention; keep that boundary between the same layers.
        out["max_window_layers"] = sum(1 for i in kept if i < config["max_window_layers"])
    out[PROVENANCE_KEY] = provenance
    return out


def _rename(name: str, new_index: dict[int, int]) -> str | None:
    """The tensor's name in the pruned model, or None when its layer is dropped."""
    match = _LAYER_NAME.match(name)
    if not match:
        return name
    layer = int(match.group(2))
    if layer not in new_index:
        return None
    return f"{match.group(1)}{new_index[layer]}{match.group(3)}"


@dataclass
class _OutTensor:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    write: Callable[[BinaryIO], None]  # writes exactly nbytes


def _copied(info: TensorInfo) -> Callable[[BinaryIO], None]:
    """Writer of a tensor's bytes exactly as they are in the source file."""

    def write(out: BinaryIO) -> None:
        with open(info.file, "rb") as fh:
            fh.seek(info.offset)
            left = info.nbytes
            while left:
                chunk = fh.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise PruneError(f"{info.file}: truncated tensor data")
                out.write(chunk)
                left -= len(chunk)

    return write


def _sliced(
    info: TensorInfo, cuts: list[tuple[int, np.ndarray]]
) -> tuple[list[int], int, Callable[[BinaryIO], None]]:
    """Shape, size and writer of a tensor keeping indices `keep` along each `axis` (raw bits)."""
    if info.dtype not in _ITEMSIZE:
        raise PruneError(f"{info.file}: cannot slice dtype {info.dtype}")
    bits = _ITEM_BITS[_ITEMSIZE[info.dtype]]
    shape = list(info.shape)
    for axis, keep in cuts:
        if keep.size and int(keep.max()) >= shape[axis]:
            raise PruneError(f"index {int(keep.max())} is outside a tensor of shape {shape}")
        shape[axis] = len(keep)
    nbytes = int(np.prod(shape)) * _ITEMSIZE[info.dtype]

    def write(out: BinaryIO) -> None:
        raw = np.memmap(info.file, dtype=bits, mode="r", offset=info.offset, shape=info.shape)
        part: np.ndarray = raw
        for axis, keep in cuts:
            part = np.take(part, keep, axis=axis)
        out.write(np.ascontiguousarray(part).tobytes())

    return shape, nbytes, write


def _write_safetensors(path: Path, tensors: list[_OutTensor], metadata: dict | None) -> int:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": t.shape,
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors:
            start = fh.tell()
            t.write(fh)
            if fh.tell() - start != t.nbytes:
                raise PruneError(f"{t.name}: wrote {fh.tell() - start} bytes, expected {t.nbytes}")
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def _neuron_slice(
    name: str, layer: int | None, neurons: NeuronSelection | None
) -> tuple[int, np.ndarray] | None:
    """(axis, kept indices) when tensor `name` of source layer `layer` loses MLP neurons."""
    if neurons is None or layer is None:
        return None
    for module in _MLP_ROWS + _MLP_COLS:
        if f".{module}." not in f".{name}":
            continue
        if not (name.endswith(".weight") or name.endswith(".bias")):
            raise PruneError(f"{name}: cannot prune neurons of a quantized MLP (scales present)")
        if layer not in neurons.kept:
            raise PruneError(f"the neuron plan has no entry for layer {layer}")
        if module in _MLP_COLS:
            return (1, neurons.kept[layer]) if name.endswith(".weight") else None
        return 0, neurons.kept[layer]
    return None


@dataclass
class _Biases:
    """The biases bias compensation writes, at source width (the cuts apply on writing)."""

    values: dict[str, np.ndarray]  # source bias name -> float64 value (replaces the source's)
    created: dict[str, str]  # source weight name -> its new bias, written right after it
    config: dict[str, bool]  # Llama config keys turned on
    provenance: dict


def check_bias_compensation(config: dict) -> None:
    """Refuse, naming the model type and why, an architecture that cannot take FLAP's biases."""
    model_type = config.get("model_type")
    if model_type != "llama":
        why = _NO_BIAS_COMPENSATION.get(
            str(model_type), "only Llama's config (mlp_bias, attention_bias) is known to add them"
        )
        raise PruneError(f"--bias-compensation: model_type {model_type!r}: {why}")


def _bias_compensation(
    config: dict,
    checkpoint: Checkpoint,
    kept_layers: list[int],
    kept_inputs: dict[str, dict[int, np.ndarray] | None],
    means: ChannelMeans,
) -> _Biases:
    """FLAP: for every kept layer, bias(proj) += W[:, removed] @ mean(x[removed]) for the output
    projections whose inputs lose channels (`kept_inputs`: proj -> layer -> kept channels)."""
    check_bias_compensation(config)
    if all(v is None for v in kept_inputs.values()):
        raise PruneError(
            "--bias-compensation: the plan removes no MLP neuron or attention head, so there "
            "is nothing to compensate (hidden-size and layer cuts have no bias to fold into)"
        )
    out = _Biases({}, {}, {}, {**means.source, "rule": "bias += W[:, removed] @ mean(x[removed])"})
    kept_set = set(kept_layers)
    for proj, kept_by_layer in kept_inputs.items():
        if kept_by_layer is None:
            continue
        kind, key, modules = _COMPENSATED[proj]
        if kind not in means.mean:
            raise PruneError(f"--bias-compensation: the analysis has no {kind} statistics")
        missing = sorted(kept_set - set(means.mean[kind]))
        if missing:
            raise PruneError(f"--bias-compensation: no {kind} statistics for layers {missing}")
        out.config[key] = True
        out.provenance.setdefault("projections", []).append(proj)
        for name, info in checkpoint.tensors.items():
            match = _LAYER_NAME.match(name)
            parts = name.split(".")
            if not match or int(match.group(2)) not in kept_set or parts[-1] != "weight":
                continue
            if parts[-2] not in modules:
                continue
            if info.dtype not in _FLOAT_DTYPES:
                raise PruneError(f"{name}: cannot write a bias for dtype {info.dtype}")
            layer, bias = int(match.group(2)), name[: -len("weight")] + "bias"
            if bias in checkpoint.tensors:
                value = checkpoint.tensor(bias).astype(np.float64)
            else:
                out.created[name] = bias
                value = np.zeros(info.shape[0])
            if parts[-2] == proj and layer in kept_by_layer:
                mean = means.mean[kind][layer]
                if len(mean) != info.shape[1]:
                    raise PruneError(
                        f"{name}: {info.shape[1]} input channels, the analysis's {kind} has "
                        f"{len(mean)}: another model?"
                    )
                removed = np.setdiff1d(np.arange(info.shape[1]), kept_by_layer[layer])
                weight = checkpoint.tensor(name).astype(np.float64)
                value = value + weight[:, removed] @ mean[removed]
            if parts[-2] == proj or name in out.created:
                out.values[bias] = value
    return out


def _encoded(
    value: np.ndarray, dtype: str, cuts: list[tuple[int, np.ndarray]]
) -> tuple[list[int], int, Callable[[BinaryIO], None]]:
    """Shape, size and writer of a float64 array cut like a source tensor, in `dtype`
    (float64 -> float32 -> the dtype, bfloat16 rounded to nearest even as torch does)."""
    for axis, keep in cuts:
        value = np.take(value, keep, axis=axis)
    x = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "BF16":
        bits = x.view(np.uint32)
        data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    elif dtype == "F16":
        data = x.astype("<f2").tobytes()
    else:
        data = x.astype("<f4").tobytes()
    return list(value.shape), len(data), lambda out: out.write(data)


def prune_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    layers: LayerSelection,
    neurons: NeuronSelection | None = None,
    progress: bool | None = None,
    widths: WidthSelection | None = None,
    bias_compensation: ChannelMeans | None = None,
) -> dict:
    """Write the pruned checkpoint to `out_dir` (created; must not exist or be empty), with a
    progress bar over the source's safetensors files (`progress`: None: only on a terminal).
    `bias_compensation`: fold the removed MLP neurons' and heads' means into biases (FLAP).

    Returns the provenance written into the config. The output is built in a temporary
    sibling directory and renamed into place, so a failed run leaves nothing half-written.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    total = int(config["num_hidden_layers"])
    bad = [i for i in layers.dropped if not 0 <= i < total]
    if bad or len(set(layers.dropped)) != len(layers.dropped):
        raise PruneError(f"layers to drop {layers.dropped} must be distinct and in 0..{total - 1}")
    kept = [i for i in range(total) if i not in set(layers.dropped)]
    if not kept:
        raise PruneError("the plan drops every layer")
    if neurons is not None and widths is not None:
        raise PruneError("give a neuron plan or a budget strategy, not both")
    if (neurons is not None or widths is not None) and config.get("quantization_config"):
        raise PruneError("width pruning of a quantized checkpoint is not supported")
    if widths is not None:
        _check_widths(config, kept, widths)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PruneError(f"{model_dir}: no *.safetensors files (convert the checkpoint first)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PruneError(f"{out_dir} exists and is not empty; choose another --out")

    biases = None
    if bias_compensation is not None:
        heads = None
        if widths is not None and widths.heads is not None:
            d = widths.widths["head_dim"]
            heads = {k: (v[:, None] * d + np.arange(d)).ravel() for k, v in widths.heads.items()}
        mlp = neurons.kept if neurons is not None else widths.mlp if widths is not None else None
        biases = _bias_compensation(
            config,
            Checkpoint(model_dir),
            kept,
            {"down_proj": mlp, "o_proj": heads},
            bias_compensation,
        )

    def cuts_for(name: str, layer: int | None, shape: tuple[int, ...]) -> list:
        if widths is not None:
            return widths.cuts(name, layer, shape)
        cut = _neuron_slice(name, layer, neurons)
        return [cut] if cut is not None else []

    new_index = {old: new for new, old in enumerate(kept)}
    provenance = {
        "tool": f"actclient {__version__}",
        "source_model": str(model_dir.resolve()),
        "source_num_hidden_layers": total,
        "dropped_layers": sorted(layers.dropped),
        "kept_layers": kept,
        "layers": layers.source,
    }
    new_config = pruned_config(config, kept, provenance)
    if neurons is not None:
        provenance["neurons"] = neurons.source
        new_config["intermediate_size"] = neurons.width
    if widths is not None:
        provenance["widths"] = {**widths.source, "widths": widths.widths}
        for key in ("intermediate_size", "num_attention_heads", "hidden_size", "head_dim"):
            new_config[key] = int(widths.widths[key])
    if biases is not None:
        provenance["bias_compensation"] = biases.provenance
        new_config.update(biases.config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.pruning-", dir=out_dir.parent))
    bar = Progress(len(files), desc="prune", unit="file", enabled=progress)
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for path in files:
            infos, metadata = read_safetensors_metadata(path)
            tensors = []
            for name in sorted(infos, key=lambda n: infos[n].offset):
                new_name = _rename(name, new_index)
                if new_name is None:
                    continue
                info = infos[name]
                match = _LAYER_NAME.match(name)
                layer = int(match.group(2)) if match else None
                cuts = cuts_for(name, layer, info.shape)
                if biases is not None and name in biases.values:
                    shape, nbytes, write = _encoded(biases.values[name], info.dtype, cuts)
                elif not cuts:
                    shape, nbytes, write = list(info.shape), info.nbytes, _copied(info)
                else:
                    shape, nbytes, write = _sliced(info, cuts)
                tensors.append(_OutTensor(new_name, info.dtype, shape, nbytes, write))
                if biases is not None and name in biases.created:
                    bias = biases.created[name]
                    value = biases.values[bias]
                    encoded = _encoded(value, info.dtype, cuts_for(bias, layer, value.shape))
                    tensors.append(_OutTensor(_rename(bias, new_index), info.dtype, *encoded))
            if tensors:
                total_size += _write_safetensors(tmp / path.name, tensors, metadata)
                weight_map.update({t.name: path.name for t in tensors})
            bar.update(1, file=path.name)
        if (model_dir / INDEX_NAME).is_file():
            index = json.loads((model_dir / INDEX_NAME).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": total_size}
            index["weight_map"] = dict(sorted(weight_map.items()))
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        elif len(files) > 1:
            raise PruneError(f"{model_dir}: several safetensors files but no {INDEX_NAME}")
        for src in model_dir.iterdir():
            if (
                src.is_file()
                and not src.name.startswith(".")
                and src.suffix != ".safetensors"
                and src.name not in (INDEX_NAME, "config.json")
                and not src.name.endswith(_OTHER_WEIGHTS)
            ):
                shutil.copy2(src, tmp / src.name)  # tokenizer, chat template, generation config
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return provenance


def _check_widths(config: dict, kept: list[int], widths: WidthSelection) -> None:
    """Refuse, naming the reason, a width plan this checkpoint cannot take."""
    try:
        shape = ModelShape.from_config(config)
    except ParamCountError as exc:
        raise PruneError(f"width pruning: {exc}") from None
    w = widths.widths
    if w["num_key_value_heads"] != shape.num_key_value_heads or w["head_dim"] != shape.head_dim:
        raise PruneError("the plan changes KV heads or head_dim, which prune does not apply")
    for axis, per_layer, width in (
        ("mlp", widths.mlp, w["intermediate_size"]),
        ("heads", widths.heads, w["num_attention_heads"]),
    ):
        if per_layer is None:
            continue
        missing = [k for k in kept if k not in per_layer]
        if missing:
            raise PruneError(f"the plan's {axis} section has no entry for kept layers {missing}")
        sizes = {len(per_layer[k]) * (shape.head_dim if axis == "heads" else 1) for k in kept}
        expect = width * (shape.head_dim if axis == "heads" else 1)
        if sizes != {expect}:
            raise PruneError(f"the plan's {axis} section keeps {sorted(sizes)}, not {expect}")
    if widths.heads is not None:
        group = shape.num_attention_heads // shape.num_key_value_heads
        for k in kept:
            per_group = np.bincount(widths.heads[k] // group, minlength=shape.num_key_value_heads)
            if len(set(per_group.tolist())) != 1:
                raise PruneError(f"layer {k}: the kept heads are not the same count per KV group")
    if widths.hidden is not None and len(widths.hidden) != w["hidden_size"]:
        raise PruneError("the plan's hidden section does not match its hidden_size")


def _layer_list(value: str) -> list[int]:
    try:
        return sorted(int(x) for x in value.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--drop-layers takes comma-separated layer indices, got {value!r}"
        ) from exc


def _prune(args: argparse.Namespace) -> int:
    try:
        plan = load_plan(args.plan) if args.plan else None
        widths = None
        if args.budget_strategy is not None:
            if plan is None or args.drop_layers is not None or args.neurons:
                raise PruneError(
                    "--budget-strategy takes a budget PLAN, without --drop-layers or --neurons"
                )
            layers, widths = budget_strategy(plan, args.budget_strategy, args.plan)
        elif args.drop_layers is not None:
            layers = LayerSelection(args.drop_layers, {"rule": "explicit --drop-layers"})
            if plan is not None:
                layers.source["plan"] = str(args.plan)
        elif plan is not None:
            layers = layers_from_plan(plan, args.strategy, args.plan)
        else:
            raise PruneError("give a PLAN (from `actclient plan`) or --drop-layers")
        model_layers = load_config(Path(args.model_dir))["num_hidden_layers"]
        planned = (
            plan.get("budget", {}).get("source_shape") or plan.get("layers", {}) if plan else {}
        )
        planned_layers = planned.get("num_hidden_layers", planned.get("num_layers", model_layers))
        if planned_layers != model_layers:
            raise PruneError(
                f"the plan is for {planned_layers} layers, the model has "
                f"{model_layers}: it was made for another model"
            )
        neurons = None
        if args.neurons:
            if plan is None:
                raise PruneError("--neurons needs a PLAN with a neuron section")
            neurons = neurons_from_plan(plan, args.plan)
            if plan["neurons"].get("heads"):
                print("prune: the plan's attention-head pruning is not applied", file=sys.stderr)
        means = None
        if args.bias_compensation:
            if plan is None or not plan.get("analysis"):
                raise PruneError("--bias-compensation needs a PLAN that names its analysis")
            check_bias_compensation(load_config(Path(args.model_dir)))
            means = ChannelMeans.load(plan["analysis"])
        provenance = prune_checkpoint(
            args.model_dir,
            args.out,
            layers,
            neurons,
            progress=False if args.no_progress else None,
            widths=widths,
            bias_compensation=means,
        )
    except (PruneError, ModelFilesError, OSError, KeyError) as exc:
        print(f"prune: {exc}", file=sys.stderr)
        return 2
    width = f", intermediate_size {neurons.width}" if neurons is not None else ""
    if widths is not None:
        width = ", " + ", ".join(
            f"{key} {widths.widths[key]}"
            for key in ("intermediate_size", "num_attention_heads", "hidden_size")
        )
    if "bias_compensation" in provenance:
        compensated = provenance["bias_compensation"]["projections"]
        width += f"; biases compensated on {', '.join(compensated)}"
    print(
        f"prune: dropped layers {provenance['dropped_layers']} "
        f"({provenance['source_num_hidden_layers']} -> {len(provenance['kept_layers'])}{width}); "
        f"wrote {args.out}",
        file=sys.stderr,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `prune` to the top-level `actclient` parser."""
    p = subparsers.add_parser(
        "prune",
        help="write a pruned checkpoint (layers, MLP neurons, heads, hidden size) from a plan",
        description="Copy a safetensors checkpoint without the plan's dropped layers (kept "
        "layers renumbered, weights byte-identical), optionally with the plan's narrower "
        "widths (--neurons, --budget-strategy; kept elements bit-identical) and FLAP biases "
        "(--bias-compensation), with tokenizer files and a config that records where the plan "
        "came from. Exit status 2 on bad input.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="source Hugging Face model directory")
    p.add_argument("plan", metavar="PLAN", nargs="?", help="plan JSON from `actclient plan`")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="new model directory")
    p.add_argument(
        "--strategy",
        choices=LAYER_STRATEGIES,
        default="block_influence",
        help="which of the plan's layer strategies to apply (default %(default)s)",
    )
    p.add_argument(
        "--drop-layers",
        type=_layer_list,
        metavar="I,J,...",
        help="drop these layers instead of a plan strategy (e.g. a random baseline)",
    )
    p.add_argument(
        "--neurons",
        action="store_true",
        help="also prune MLP neurons by the plan's neuron section (intermediate_size changes)",
    )
    p.add_argument(
        "--budget-strategy",
        choices=BUDGET_STRATEGIES,
        metavar="NAME",
        help="apply every dimension (layers, MLP width, heads, hidden size) of this strategy "
        f"of a budget plan (`plan --target-params`): one of {', '.join(BUDGET_STRATEGIES)}",
    )
    p.add_argument(
        "--bias-compensation",
        action="store_true",
        help="FLAP: add W[:, removed] @ mean(x[removed]) to the bias of down_proj (removed MLP "
        "neurons) and o_proj (removed heads), the means from the channel statistics of the "
        "analysis the plan names; Llama only (sets mlp_bias / attention_bias, zero biases on "
        "gate/up and q/k/v); Qwen2, Qwen3 and Mistral are refused (no such bias in vLLM)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a TTY")
    p.set_defaults(func=_prune)


def kept_tensor_names(names: Iterable[str], dropped: Iterable[int]) -> dict[str, str]:
    """Source name -> pruned name for every tensor a layer deletion keeps."""
    total = 1 + max((int(m.group(2)) for n in names if (m := _LAYER_NAME.match(n))), default=-1)
    gone = set(dropped)
    new_index = {old: new for new, old in enumerate(i for i in range(total) if i not in gone)}
    return {n: r for n in names if (r := _rename(n, new_index)) is not None}
