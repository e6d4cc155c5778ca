"""`actclient prune` on synthetic safetensors checkpoints (no torch): bytes, names, config."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from actclient.cli import main as actclient
from actclient.prune import (
    PROVENANCE_KEY,
    LayerSelection,
    PruneError,
    kept_tensor_names,
    layers_from_plan,
    neurons_from_plan,
    prune_checkpoint,
)

LAYERS = 4
HIDDEN = 8
INTER = 12


def _write(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file written by hand (dtype name, raw array), independent of prune.py."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, array) in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _read(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {
        k: (
            v["dtype"],
            v["shape"],
            raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]],
        )
        for k, v in header.items()
    }


def _read_dir(model: Path) -> dict[str, tuple[str, list[int], bytes]]:
    out = {}
    for path in sorted(model.glob("*.safetensors")):
        out.update(_read(path))
    return out


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """4 layers, bf16 attention and float32 MLP weights, sharded in two files with an index."""
    rng = np.random.default_rng(0)
    model = tmp_path / "src"
    model.mkdir()
    bf16 = lambda *shape: ("BF16", rng.integers(0, 2**16, size=shape, dtype=np.uint16))  # noqa: E731
    f32 = lambda *shape: ("F32", rng.normal(size=shape).astype(np.float32))  # noqa: E731
    shards: list[dict] = [{"model.embed_tokens.weight": bf16(16, HIDDEN)}, {}]
    for layer in range(LAYERS):
        shard = shards[layer // 2]
        p = f"model.layers.{layer}."
        shard[p + "self_attn.q_proj.weight"] = bf16(HIDDEN, HIDDEN)
        shard[p + "input_layernorm.weight"] = bf16(HIDDEN)
        shard[p + "mlp.gate_proj.weight"] = f32(INTER, HIDDEN)
        shard[p + "mlp.up_proj.weight"] = f32(INTER, HIDDEN)
        shard[p + "mlp.down_proj.weight"] = f32(HIDDEN, INTER)
    shards[1]["model.norm.weight"] = bf16(HIDDEN)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-0000{k + 1}-of-00002.safetensors"
        _write(model / name, shard)
        weight_map.update({t: name for t in shard})
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "num_hidden_layers": LAYERS,
        "intermediate_size": INTER,
        "layer_types": [
            "full_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
        "max_window_layers": 3,
        "tie_word_embeddings": True,
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text('{"model": "tok"}')
    (model / "chat_template.jinja").write_text("{{ messages }}")
    (model / "generation_config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"old weights")
    (model / ".complete").write_text("{}")
    return model


def _plan(layers: int = LAYERS) -> dict:
    kept = [0, 3]
    mlp_layers = [
        {"layer": i, "pruned": [1, 5, 7] if i != 3 else [0, 2, 11]} for i in range(LAYERS)
    ]
    return {
        "schema": "actclient.plan/1",
        "analysis": "/a",
        "layers": {
            "tokens": "all",
            "num_layers": layers,
            "protected": [0, 3],
            "strategies": {
                "block_influence": {
                    "rule": "lowest BI",
                    "dropped": [
                        {"layer": 1, "block_influence": 0.1},
                        {"layer": 2, "block_influence": 0.2},
                    ],
                    "kept": kept,
                },
                "gromov": {"skipped": "no block"},
            },
        },
        "neurons": {
            "mlp": {
                "score": "Wanda-sp",
                "fraction": 0.25,
                "intermediate_size_before": INTER,
                "intermediate_size_after": INTER - 3,
                "layers": mlp_layers,
            }
        },
    }


def test_kept_tensors_are_byte_identical_and_renumbered(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prune_checkpoint(model_dir, out, LayerSelection([1, 2]))
    src, dst = _read_dir(model_dir), _read_dir(out)
    mapping = kept_tensor_names(src, [1, 2])
    assert sorted(dst) == sorted(mapping.values())
    assert (
        "model.layers.1.mlp.down_proj.weight" in dst
        and "model.layers.2.mlp.up_proj.weight" not in dst
    )
    for old, new in mapping.items():
        assert dst[new] == src[old], new
    assert (
        mapping["model.layers.3.self_attn.q_proj.weight"]
        == "model.layers.1.self_attn.q_proj.weight"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(dst)
    for name, file in index["weight_map"].items():
        assert name in _read(out / file)
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in dst.values())


def test_config_stays_consistent(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prune_checkpoint(model_dir, out, LayerSelection([1, 2], {"rule": "test"}))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["layer_types"] == ["full_attention", "sliding_attention"]
    assert config["max_window_layers"] == 1  # of kept [0, 3], only layer 0 was below 3
    assert config["intermediate_size"] == INTER
    prov = config[PROVENANCE_KEY]
    assert prov["dropped_layers"] == [1, 2] and prov["kept_layers"] == [0, 3]
    assert prov["source_model"] == str(model_dir.resolve()) and prov["layers"] == {"rule": "test"}
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json"} <= names
    assert "pytorch_model.bin" not in names and ".complete" not in names


def test_cli_applies_a_plan_strategy(model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan()))
    assert actclient(["prune", str(model_dir), str(plan), "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    prov = config[PROVENANCE_KEY]
    assert prov["dropped_layers"] == [1, 2]
    assert prov["layers"]["strategy"] == "block_influence" and prov["layers"]["plan"] == str(plan)
    assert prov["layers"]["dropped_scores"][0]["block_influence"] == 0.1
    # explicit layers (the random baseline), a skipped strategy, a plan for another model
    assert (
        actclient(["prune", str(model_dir), "--drop-layers", "2", "--out", str(tmp_path / "b")])
        == 0
    )
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 3
    bad = ["prune", str(model_dir), str(plan), "--strategy", "gromov", "--out", str(tmp_path / "c")]
    assert actclient(bad) == 2
    plan.write_text(json.dumps(_plan(layers=30)))
    assert actclient(["prune", str(model_dir), str(plan), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_refusals(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PruneError, match="distinct and in 0..3"):
        prune_checkpoint(model_dir, tmp_path / "x", LayerSelection([4]))
    with pytest.raises(PruneError, match="every layer"):
        prune_checkpoint(model_dir, tmp_path / "x", LayerSelection([0, 1, 2, 3]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(PruneError, match="not empty"):
        prune_checkpoint(model_dir, tmp_path / "full", LayerSelection([1]))
    with pytest.raises(PruneError, match="skipped"):
        layers_from_plan(_plan(), "gromov")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_neuron_pruning_slices_rows_and_columns(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = _plan()
    prune_checkpoint(
        model_dir, out, layers_from_plan(plan, "block_influence"), neurons_from_plan(plan)
    )
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == INTER - 3
    assert config[PROVENANCE_KEY]["neurons"]["intermediate_size_after"] == INTER - 3
    src, dst = _read_dir(model_dir), _read_dir(out)
    for old, new, pruned in ((0, 0, [1, 5, 7]), (3, 1, [0, 2, 11])):
        keep = np.setdiff1d(np.arange(INTER), pruned)

        def arr(d: dict, layer: int, module: str, shape: tuple[int, int]) -> np.ndarray:
            return np.frombuffer(
                d[f"model.layers.{layer}.mlp.{module}.weight"][2], np.float32
            ).reshape(shape)

        for module in ("gate_proj", "up_proj"):
            got = arr(dst, new, module, (len(keep), HIDDEN))
            assert np.array_equal(got, arr(src, old, module, (INTER, HIDDEN))[keep])
        got = arr(dst, new, "down_proj", (HIDDEN, len(keep)))
        assert np.array_equal(got, arr(src, old, "down_proj", (HIDDEN, INTER))[:, keep])
        q = f"model.layers.{new}.self_attn.q_proj.weight"
        assert dst[q] == src[f"model.layers.{old}.self_attn.q_proj.weight"]
    uneven = _plan()
    uneven["neurons"]["mlp"]["layers"][0]["pruned"] = [1]
    with pytest.raises(PruneError, match="different widths"):
        neurons_from_plan(uneven)
