"""Analyzer math against brute-force numpy on synthetic shards with planted structure.

The planted model: 6 layers, hidden 32, residual updates drawn at random, except that layer 3
is the identity (its output equals its input), and from layer 1 on channel 7 of position 0
carries a massive activation (5000). Position 0 and token 1 (special) are not content tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from actclient.analysis import cli
from actclient.analysis.analyze import analyze
from actclient.analysis.budget import BUDGET_STRATEGIES
from actclient.analysis.embedding import Checkpoint, EmbeddingTable, special_token_ids
from actclient.analysis.formulas import unit_angle
from actclient.analysis.params import ModelShape
from actclient.analysis.plan import PlanError, layer_plan, make_budget_plan, make_plan
from actclient.analysis.stats import AnalysisAccumulator, ResidualStats
from actclient.cli import main as actclient
from vllm_activations.contract.shard import bf16_bits_to_float32, float32_to_bf16_bits, write_shard

LAYERS, HIDDEN, VOCAB, INTER = 6, 32, 50, 24
HEADS, KV, HEAD_DIM = 4, 2, 4
IDENTITY_LAYER, MASSIVE_CHANNEL, MASSIVE_VALUE = 3, 7, 5000.0
SPECIAL = (1,)
QUIET_HIDDEN = 11


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        raw = float32_to_bf16_bits(value.astype(np.float32)).tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(1)
    tensors = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN))}
    for layer in range(LAYERS):
        down = rng.normal(size=(HIDDEN, INTER))
        down[:, 5] = 0.0  # a neuron whose weights are zero: Wanda must prune it
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = down
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"] = rng.normal(
            size=(HIDDEN, HEADS * HEAD_DIM)
        )
    _write_safetensors(root / "model.safetensors", tensors)
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3",
                "num_hidden_layers": LAYERS,
                "hidden_size": HIDDEN,
                "intermediate_size": INTER,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KV,
                "head_dim": HEAD_DIM,
            }
        )
    )
    (root / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"1": {"content": "<|im_start|>", "special": True}}})
    )
    return root


def _embedding(model_dir: Path) -> np.ndarray:
    return EmbeddingTable(model_dir)(np.arange(VOCAB))


def _residuals(emb: np.ndarray, tokens: np.ndarray, rng: np.random.Generator) -> dict:
    """post_attention / post_mlp [L, T, H] of the planted model."""
    t = len(tokens)
    h = emb[tokens].astype(np.float64)
    attn, mlp = np.zeros((LAYERS, t, HIDDEN)), np.zeros((LAYERS, t, HIDDEN))
    for layer in range(LAYERS):
        if layer == IDENTITY_LAYER:
            a, h = h.copy(), h.copy()
        else:
            a = h + rng.normal(scale=1.0, size=h.shape)
            if layer == 1:
                a[0, MASSIVE_CHANNEL] += MASSIVE_VALUE
            h = a + rng.normal(scale=1.5, size=h.shape)
        attn[layer], mlp[layer] = a, h
    return {"post_attention": attn.astype(np.float32), "post_mlp": mlp.astype(np.float32)}


def _channel_stats(rng: np.random.Generator) -> dict:
    mlp_sq = rng.uniform(1.0, 2.0, size=(LAYERS, INTER))
    mlp_sq[:, 9] = 1e-4  # a nearly silent neuron: every score prunes it
    heads_sq = rng.uniform(1.0, 2.0, size=(LAYERS, HEADS * HEAD_DIM))
    heads_sq[:, 0:HEAD_DIM] = 1e-3  # head 0 (KV group 0) is silent
    norm_sq = rng.uniform(1.0, 2.0, size=(LAYERS, HIDDEN))
    norm_sq[:, QUIET_HIDDEN] = 1e-4  # a hidden channel both norms keep near zero
    extra = {}
    kinds = (
        ("mlp_intermediate", mlp_sq),
        ("attn_heads", heads_sq),
        ("mlp_norm", norm_sq),
        ("attn_norm", norm_sq * 2),
    )
    for kind, sq in kinds:
        extra[f"channel_stats/{kind}/sum"] = rng.normal(size=sq.shape)
        extra[f"channel_stats/{kind}/sum_sq"] = sq * 10
        # sum |x| <= sqrt(n sum x^2): a consistent stand-in, random per request
        extra[f"channel_stats/{kind}/abs_sum"] = np.sqrt(sq * 10 * 10) * rng.uniform(
            0.5, 1, sq.shape
        )
        extra[f"channel_stats/{kind}/count"] = np.full(LAYERS, 10, dtype=np.int64)
    return extra


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    emb = _embedding(model_dir)
    for i in range(5):
        prompt = rng.integers(2, VOCAB, size=6 + i)
        prompt[0] = SPECIAL[0]
        prompt[3] = SPECIAL[0]
        output = rng.integers(2, VOCAB, size=4)
        positions = np.arange(len(prompt) + len(output) - 1)
        tokens = np.concatenate([prompt, output])[positions]
        write_shard(
            root / f"req-{i:03d}.h5",
            input_tokens=prompt,
            output_tokens=output,
            positions=positions,
            layers=np.arange(LAYERS),
            layer_outputs=_residuals(emb, tokens, rng),
            dtype="float32",
            attrs={
                "model": "planted",
                "num_hidden_layers": LAYERS,
                "hidden_size": HIDDEN,
                "model_config": {
                    "num_attention_heads": HEADS,
                    "num_key_value_heads": KV,
                    "head_dim": HEAD_DIM,
                    "intermediate_size": INTER,
                },
            },
            extra=_channel_stats(rng),
        )
    return root


def _brute(shards: Path, emb: np.ndarray, population: str) -> dict:
    """All tokens of a population as [S, N, H] float64, then every metric directly."""
    blocks = []
    for path in sorted(shards.glob("*.h5")):
        from vllm_activations.contract.shard import read_shard

        shard = read_shard(path)
        tokens, pos = shard.tokens, shard.positions
        x = [emb[tokens][None]]
        for layer in range(LAYERS):
            x += [
                shard.layer_outputs["post_attention"][layer][None],
                shard.layer_outputs["post_mlp"][layer][None],
            ]
        x = np.concatenate(x).astype(np.float64)
        mask = {
            "all": np.ones(len(pos), bool),
            "content": (pos != 0) & ~np.isin(tokens, SPECIAL),
            "last": pos == pos.max(),
        }[population]
        blocks.append(x[:, mask])
    x = np.concatenate(blocks, axis=1)
    unit = x / np.linalg.norm(x, axis=2, keepdims=True)
    cos = np.clip(np.einsum("ith,jth->ijt", unit, unit), -1, 1)
    bounds = [0] + [2 + 2 * layer for layer in range(LAYERS)]
    angle = np.arccos(cos[np.ix_(bounds, bounds)]).mean(2) / np.pi
    centred = x - x.mean(2, keepdims=True)
    kurt = (centred**4).mean(2) / (centred**2).mean(2) ** 2 - 3
    return {
        "x": x,
        "sim": cos.mean(2),
        "angle": angle,
        "kurtosis": kurt.mean(1),
        "norm": np.linalg.norm(x, axis=2).mean(1),
        "var": x.var(1),
        "absmax": np.abs(x).max(1),
    }


def _accumulate(
    paths: list[Path],
    model_dir: Path,
    block_bytes: int = 1 << 26,
    compute_dtype=np.float32,
    warm_tokens: int = 64,
):
    acc = AnalysisAccumulator(
        embed=EmbeddingTable(model_dir),
        special_ids=frozenset(SPECIAL),
        block_bytes=block_bytes,
        compute_dtype=compute_dtype,
        warm_tokens=warm_tokens,
    )
    acc.add_shards(paths)
    return acc


def test_safetensors_and_special_tokens(model_dir: Path) -> None:
    ckpt = Checkpoint(model_dir)
    name = ckpt.find("embed_tokens.weight")
    assert ckpt.shape(name) == (VOCAB, HIDDEN)
    rows = ckpt.rows(name, np.array([3, 7]))
    # bf16 widening is exact: re-rounding gives the same bits
    assert np.array_equal(bf16_bits_to_float32(float32_to_bf16_bits(rows)), rows)
    table = EmbeddingTable(model_dir)
    assert np.array_equal(table(np.array([7, 3, 7])), rows[[1, 0, 1]])
    assert special_token_ids(model_dir) == {1}


def test_unit_angle_is_accurate_near_zero() -> None:
    u = np.zeros(4)
    u[0] = 1.0
    v = np.array([np.cos(1e-9), np.sin(1e-9), 0.0, 0.0])
    assert unit_angle(u, v) == pytest.approx(1e-9, rel=1e-6)
    assert unit_angle(u, -u) == pytest.approx(np.pi)


# Stated tolerances of the float32 path against float64 brute force (see formulas.py): the
# data are float32/bfloat16, so float32 BLAS rounding (~1e-7 relative) is far below the noise
# of the stored values; float64 compute reproduces the brute force to rounding.
TOLERANCES = {
    np.float64: {"sim": 1e-12, "angle": 1e-7, "norm": 1e-12, "kurtosis": 1e-9, "var": 1e-9},
    np.float32: {"sim": 1e-6, "angle": 1e-6, "norm": 1e-6, "kurtosis": 1e-5, "var": 1e-6},
}
# Excess kurtosis is near 0 for Gaussian-like tokens, so its float32 tolerance is absolute.
KURTOSIS_ATOL = {np.float64: 0.0, np.float32: 1e-5}
# Splits change which tokens share a block; float32 rounds the block moments differently.
SPLIT_TOLERANCES = {
    np.float64: {"rtol": 1e-10, "atol": 1e-9},
    np.float32: {"rtol": 1e-6, "atol": 1e-6},
}


@pytest.mark.parametrize("warm_tokens", [64, 3])  # block shifts only / the running mean
@pytest.mark.parametrize("compute_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("population", ["all", "content", "last"])
def test_metrics_match_brute_force(
    shards: Path, model_dir: Path, population: str, compute_dtype: type, warm_tokens: int
) -> None:
    tol = TOLERANCES[compute_dtype]
    acc = _accumulate(
        sorted(shards.glob("*.h5")),
        model_dir,
        block_bytes=1,  # 1 token blocks
        compute_dtype=compute_dtype,
        warm_tokens=warm_tokens,
    )
    stats: ResidualStats = acc.populations[population]
    ref = _brute(shards, _embedding(model_dir), population)
    assert stats.count == ref["x"].shape[1]
    np.testing.assert_allclose(stats.similarity(), ref["sim"], atol=tol["sim"])
    np.testing.assert_allclose(stats.mean_angle() / np.pi, ref["angle"], atol=tol["angle"])
    summary = stats.site_summary()
    np.testing.assert_allclose(summary["mean_norm"], ref["norm"], rtol=tol["norm"])
    np.testing.assert_allclose(
        summary["kurtosis"],
        ref["kurtosis"],
        rtol=tol["kurtosis"],
        atol=KURTOSIS_ATOL[compute_dtype],
    )
    np.testing.assert_allclose(
        stats.channel_variance(), ref["var"], rtol=tol["var"], atol=tol["var"]
    )
    np.testing.assert_allclose(stats.absmax, ref["absmax"])


def test_identical_layers_come_out_redundant(shards: Path, model_dir: Path, tmp_path: Path):
    analysis = analyze(shards, tmp_path, model_dir, pictures=False, progress=False)
    assert analysis["block_influence"][IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-12)
    flagged = {e["layer"]: e for e in analysis["redundant_layers"]}
    assert IDENTITY_LAYER in flagged and flagged[IDENTITY_LAYER]["reasons"]
    assert [layer for layer, e in flagged.items() if e["strong"]] == [IDENTITY_LAYER]
    assert all(e["protected"] for layer, e in flagged.items() if layer != IDENTITY_LAYER)
    labels = analysis["similarity"]["labels"]
    i, j = (
        labels.index(f"{IDENTITY_LAYER - 1}.post_mlp"),
        labels.index(f"{IDENTITY_LAYER}.post_mlp"),
    )
    assert analysis["similarity"]["matrix"][i][j] == pytest.approx(1.0)
    best1 = next(b for b in analysis["best_blocks"] if b["n"] == 1)
    assert best1["drop"] == [IDENTITY_LAYER] and best1["distance"] < 1e-6
    assert analysis["block_influence"][0] is not None  # embedding rebuilt
    assert (tmp_path / "report.md").read_text().count(f"Layer {IDENTITY_LAYER}") >= 1
    assert np.load(tmp_path / "arrays" / "similarity_content.npy").shape == (1 + 2 * LAYERS,) * 2


def test_massive_channel_detected_and_content_differs(shards: Path, model_dir: Path, tmp_path):
    analysis = analyze(shards, tmp_path, model_dir, pictures=False, progress=False)
    massive = analysis["by_tokens"]["all"]["massive_activations"]
    assert [c["channel"] for c in massive["channels"]] == [MASSIVE_CHANNEL]
    assert massive["first_site"] == "1.post_attention"
    assert massive["positions"] == [[0, 5]]
    assert massive["token_ids"] == [[SPECIAL[0], 5]]
    assert massive["channels"][0]["max_position"] == 0
    assert any(p["layer"] == 1 for p in analysis["protected_layers"])
    content = analysis["by_tokens"]["content"]
    assert content["massive_activations"]["channels"] == []
    assert analysis["tokens"]["content"] == analysis["tokens"]["all"] - 10  # pos 0 + token 1
    # The sink token is near-parallel across layers, so BI over all tokens is lower.
    for layer in (2, 4):
        assert analysis["block_influence"][layer] < content["block_influence"][layer]
    assert content["sites"]["max_abs"][3] < MASSIVE_VALUE / 2


@pytest.mark.parametrize("compute_dtype", [np.float64, np.float32])
def test_any_order_and_split_equals_single_pass(
    shards: Path, model_dir: Path, compute_dtype: type
) -> None:
    paths = sorted(shards.glob("*.h5"))
    single = _accumulate(paths, model_dir, compute_dtype=compute_dtype)
    rng = random.Random(3)
    for _ in range(3):
        order = paths[:]
        rng.shuffle(order)
        cut = sorted(rng.sample(range(1, len(order)), 2))
        parts = [order[: cut[0]], order[cut[0] : cut[1]], order[cut[1] :]]
        merged = AnalysisAccumulator()
        for part in reversed(parts):
            block_bytes = rng.choice([1, 1 << 26])
            merged.merge(_accumulate(part, model_dir, block_bytes, compute_dtype))
        for name, stats in single.populations.items():
            other = merged.populations[name]
            assert other.count == stats.count
            for attr in (
                "cos_sum",
                "angle_sum",
                "norm_sum",
                "kurtosis_sum",
                "hoyer_sum",
                "channel_mean",
                "channel_m2",
                "update_ratio_sum",
            ):
                np.testing.assert_allclose(
                    getattr(other, attr), getattr(stats, attr), **SPLIT_TOLERANCES[compute_dtype]
                )
            assert np.array_equal(other.absmax, stats.absmax)
            assert np.array_equal(other.absmax_position, stats.absmax_position)
            assert np.array_equal(other.massive_count, stats.massive_count)
            assert other.massive_positions == stats.massive_positions
            assert sorted(map(str, other.massive_events)) == sorted(map(str, stats.massive_events))
        for kind in single.channels.sums:
            np.testing.assert_allclose(merged.channels.sums[kind], single.channels.sums[kind])
            np.testing.assert_allclose(
                merged.channels.minitron(kind), single.channels.minitron(kind)
            )
            assert merged.channels.requests[kind] == single.channels.requests[kind] == 5
            assert np.array_equal(merged.channels.counts[kind], single.channels.counts[kind])


def test_bfloat16_shards_read_as_float32(tmp_path: Path, model_dir: Path) -> None:
    rng = np.random.default_rng(5)
    tokens = rng.integers(2, VOCAB, size=8)
    outputs = _residuals(_embedding(model_dir), tokens, rng)
    write_shard(
        tmp_path / "a.h5",
        input_tokens=tokens,
        output_tokens=[3],
        positions=range(8),
        layers=range(LAYERS),
        layer_outputs=outputs,
        dtype="bfloat16",
    )
    acc = _accumulate([tmp_path / "a.h5"], model_dir)
    expected = bf16_bits_to_float32(float32_to_bf16_bits(outputs["post_mlp"]))
    assert acc.populations["all"].absmax[-1] == pytest.approx(np.abs(expected[-1]).max(0))


def test_layer_plan_math(shards: Path, model_dir: Path, tmp_path: Path) -> None:
    analysis = analyze(shards, tmp_path, model_dir, pictures=False, progress=False)
    plan = layer_plan(analysis, drop=2)
    strategies = plan["strategies"]
    assert plan["protected"] == [0, 1, LAYERS - 1]
    bi = analysis["block_influence"]
    free = [layer for layer in range(LAYERS) if layer not in plan["protected"]]
    expected = sorted(sorted(free, key=lambda layer: bi[layer])[:2])
    assert [d["layer"] for d in strategies["block_influence"]["dropped"]] == expected
    assert IDENTITY_LAYER in expected
    gromov = strategies["gromov"]
    row = analysis["angular_distance"]["2"]
    options = {s: row[s] for s in range(len(row)) if not {s, s + 1} & set(plan["protected"])}
    assert gromov["block"][0] == min(options, key=options.get)
    # only layer 3 is odd and unprotected: one drop takes it, two fall back to all free layers
    assert [
        d["layer"] for d in layer_plan(analysis, 1)["strategies"]["alternating"]["dropped"]
    ] == [3]
    for entry in strategies.values():
        if "dropped" in entry:
            assert len(entry["dropped"]) == 2 and len(entry["kept"]) == LAYERS - 2
            assert not {d["layer"] for d in entry["dropped"]} & set(plan["protected"])


def test_minitron_importance_matches_brute_force(shards: Path, tmp_path: Path) -> None:
    """Per-request mean |x|, L2 over requests; heads L2 over head_dim and ranked within KV
    groups; hidden channels summed over layers and both RMSNorm outputs."""
    from vllm_activations.contract.shard import ShardReader

    analysis = analyze(shards, tmp_path, None, special_ids=SPECIAL, pictures=False, progress=False)
    means: dict[str, list[np.ndarray]] = {}
    for path in sorted(shards.glob("*.h5")):
        with ShardReader(path) as reader:
            for kind in ("mlp_intermediate", "attn_heads", "mlp_norm", "attn_norm"):
                base = f"channel_stats/{kind}"
                count = reader.dataset(f"{base}/count")[:, None]
                means.setdefault(kind, []).append(reader.dataset(f"{base}/abs_sum") / count)
    want = {kind: np.sqrt((np.stack(v) ** 2).sum(0)) for kind, v in means.items()}
    for kind, value in want.items():
        got = np.load(tmp_path / "arrays" / f"minitron_{kind}.npy")
        np.testing.assert_allclose(got, value, rtol=1e-12)
    minitron = analysis["minitron"]
    assert minitron["requests"]["mlp_intermediate"] == 5
    heads = np.linalg.norm(want["attn_heads"].reshape(LAYERS, HEADS, HEAD_DIM), axis=2)
    np.testing.assert_allclose(minitron["heads"]["scores"], heads, rtol=1e-12)
    group = HEADS // KV
    for layer, ranks in enumerate(minitron["heads"]["rank_in_group"]):
        for g, ranked in enumerate(ranks):
            assert sorted(ranked) == list(range(g * group, (g + 1) * group))
            assert list(heads[layer, ranked]) == sorted(heads[layer, ranked], reverse=True)
        assert ranks[0][-1] == 0  # the silent head is last in its group
    hidden = want["mlp_norm"].sum(0) + want["attn_norm"].sum(0)
    np.testing.assert_allclose(minitron["hidden"]["scores"], hidden, rtol=1e-12)
    assert minitron["hidden"]["order"][-1] == QUIET_HIDDEN


def test_neuron_plan_wanda_and_activation_only(shards: Path, model_dir: Path, tmp_path: Path):
    analyze(shards, tmp_path, None, special_ids=SPECIAL, pictures=False, progress=False)
    act = make_plan(tmp_path, drop=1, mlp_fraction=0.1, head_fraction=0.5)
    wanda = make_plan(tmp_path, drop=1, model_dir=model_dir, mlp_fraction=0.1, head_fraction=0.5)
    assert act["layers"]["strategies"]["block_influence"]["dropped"][0]["layer"] == 3
    for plan in (act, wanda):
        assert plan["widths"]["intermediate_size"] == INTER - 2
        assert plan["widths"]["num_attention_heads"] == KV * 1
        assert plan["widths"]["num_key_value_heads"] == KV
        assert plan["widths"]["num_hidden_layers"] == LAYERS - 1
        for entry in plan["neurons"]["mlp"]["layers"]:
            assert 9 in entry["pruned"]
        for entry in plan["neurons"]["heads"]["layers"]:
            heads = entry["pruned"]
            assert 0 in heads and len(heads) == KV  # one query head from each KV group
            assert sorted(h // (HEADS // KV) for h in heads) == list(range(KV))
    assert all(5 in e["pruned"] for e in wanda["neurons"]["mlp"]["layers"])
    assert "Wanda" in wanda["neurons"]["mlp"]["score"]
    whole = make_plan(tmp_path, drop=1, head_fraction=0.5, head_rule="whole-groups")
    assert whole["widths"]["num_key_value_heads"] == KV - 1
    assert all(e["pruned_kv_groups"] == [0] for e in whole["neurons"]["heads"]["layers"])


def test_cli_analyze_and_plan(shards: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="actclient")
    cli.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "analysis"
    args = parser.parse_args(["analyze", str(shards), "--out", str(out), "--model", str(model_dir)])
    assert args.func(args) == 0
    assert (out / "analysis.json").is_file() and (out / "report.md").is_file()
    pytest.importorskip("matplotlib")
    for name in ("similarity_all.png", "block_influence.png", "norms.png"):
        assert (out / name).stat().st_size > 1000
    args = parser.parse_args(
        ["plan", str(out), "--target-layers", "4", "--out", str(tmp_path / "plan.json")]
    )
    capsys.readouterr()
    assert args.func(args) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["layers"]["drop"] == 2 and plan["widths"]["num_hidden_layers"] == 4
    # The summary is a table: a row per strategy, widths before and after; no Python dicts.
    err = capsys.readouterr().err
    assert "{" not in err and "'" not in err, err
    rows = {line.split()[0]: line.split()[1:] for line in err.splitlines()[1:]}
    for name, entry in plan["layers"]["strategies"].items():
        dropped = ", ".join(str(d["layer"]) for d in entry["dropped"])
        assert " ".join(rows[name]) == dropped, err
    assert rows["num_hidden_layers"] == ["6", "4"]
    assert rows["num_key_value_heads"][1] == str(plan["widths"]["num_key_value_heads"])
    args = parser.parse_args(["plan", str(out), "--drop", "99"])
    assert args.func(args) == 2
    assert "cannot drop 99" in capsys.readouterr().err
    # An output path that is a directory: one line naming it, exit status 2, no traceback.
    (tmp_path / "taken").mkdir()
    assert actclient(["plan", str(out), "--drop", "1", "-o", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "taken") in err and "Traceback" not in err


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _budget_model(model_dir: Path, tmp_path: Path) -> Path:
    """The planted model's config with a vocabulary, so a budget can be counted."""
    out = tmp_path / "model"
    out.mkdir()
    config = {**_config(model_dir), "vocab_size": VOCAB, "tie_word_embeddings": True}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.6])
def test_budget_plans_fit_and_are_tight(shards: Path, model_dir: Path, tmp_path: Path, ratio):
    analyze(shards, tmp_path / "a", None, special_ids=SPECIAL, pictures=False, progress=False)
    model = _budget_model(model_dir, tmp_path)
    plan = make_budget_plan(
        tmp_path / "a", target_ratio=ratio, model_dir=model, mlp_multiple=4, hidden_multiple=4
    )
    budget = plan["budget"]
    shape = ModelShape.from_config(_config(model))
    target = budget["target_params"]
    assert budget["source_params"] == shape.count() and target == int(ratio * shape.count())
    assert set(budget["strategies"]) == set(BUDGET_STRATEGIES)
    for name, entry in budget["strategies"].items():
        if "skipped" in entry:
            assert name not in ("depth_only", "width_only"), entry
            continue
        w = entry["widths"]
        counted = shape.with_widths(
            num_hidden_layers=w["num_hidden_layers"],
            intermediate_size=w["intermediate_size"],
            num_attention_heads=w["num_attention_heads"],
            hidden_size=w["hidden_size"],
        ).count()
        assert entry["params"] == counted <= target, name
        assert w["num_key_value_heads"] == KV
        if name in ("depth_only", "last_layers"):
            assert target - counted < shape.per_layer()  # within one layer of the budget
            assert w["intermediate_size"] == INTER and w["hidden_size"] == HIDDEN
        elif w["intermediate_size"] < INTER:  # within one MLP step of the budget
            assert target - counted < entry["granularity"]
            assert (
                entry["granularity"]
                == counted
                - shape.with_widths(
                    num_hidden_layers=w["num_hidden_layers"],
                    intermediate_size=w["intermediate_size"] - 4,
                    num_attention_heads=w["num_attention_heads"],
                    hidden_size=w["hidden_size"],
                ).count()
            )
        assert len(entry["dropped_layers"]) + w["num_hidden_layers"] == LAYERS
        assert not set(entry["dropped_layers"]) & set(budget["search"]["protected_layers"])
        for section, size in (("mlp", INTER - w["intermediate_size"]),):
            if entry[section]:
                rows = entry[section]["layers"]
                assert [r["layer"] for r in rows] == entry["kept_layers"]
                assert all(len(r["pruned"]) == size for r in rows)
        if entry["hidden"]:
            assert len(entry["hidden"]["pruned"]) == HIDDEN - w["hidden_size"]
            if name != "random":
                assert QUIET_HIDDEN in entry["hidden"]["pruned"]
        if entry["heads"]:
            group = HEADS // KV
            for row in entry["heads"]["layers"]:
                per_group = np.bincount(np.array(row["pruned"]) // group, minlength=KV)
                assert len(set(per_group.tolist())) == 1  # the same cut in every KV group
                if name != "random":
                    assert 0 in row["pruned"]  # the silent head goes first
    last = budget["strategies"]["last_layers"]
    if "dropped_layers" in last and last["dropped_layers"]:
        k = len(last["dropped_layers"])
        assert last["dropped_layers"] == list(range(LAYERS - 1 - k, LAYERS - 1))
    assert HEAD_DIM * HEADS == 16


def test_budget_refusals(shards: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    analyze(shards, tmp_path / "a", None, special_ids=SPECIAL, pictures=False, progress=False)
    model = _budget_model(model_dir, tmp_path)
    with pytest.raises(PlanError, match="--model"):
        make_budget_plan(tmp_path / "a", target_params=1000)
    with pytest.raises(PlanError, match="must lie in"):
        make_budget_plan(tmp_path / "a", target_params=10**9, model_dir=model)
    out = tmp_path / "plan.json"
    code = actclient(
        ["plan", str(tmp_path / "a"), "--target-params", "9000", "--model", str(model),
         "--hidden-multiple", "4", "--mlp-multiple", "4", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "plan: budget 9,000 of" in err and "{" not in err
    table = [line.split() for line in err.splitlines()[1:] if line.startswith("  ")]
    assert table[0][:3] == ["strategy", "params", "under"] and table[1][0] == "(source)"
    assert len(table) > 2  # at least one shape fits the budget
    plan = json.loads(out.read_text())["budget"]
    for name, entry in plan["strategies"].items():
        if "skipped" in entry:
            assert f"plan: {name}: skipped: {entry['skipped']}" in err
            continue
        (row,) = [r for r in table if r[0] == name]
        assert row[1] == f"{entry['params']:,}" and row[2] == f"{9000 - entry['params']:,}"
    assert json.loads(out.read_text())["budget"]["target_params"] == 9000


def test_model_as_a_hub_id_from_the_local_cache(
    shards: Path, model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """`analyze --model Org/Name` and `plan --model Org/Name` read the cached snapshot, as
    they read the folder itself."""
    import shutil

    hub = tmp_path / "hub"
    snapshot = hub / "models--Org--Tiny" / "snapshots" / "abc123"
    shutil.copytree(model_dir, snapshot)
    (hub / "models--Org--Tiny" / "refs").mkdir()
    (hub / "models--Org--Tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    by_id, by_dir = tmp_path / "by-id", tmp_path / "by-dir"
    for out, model in ((by_id, "Org/Tiny"), (by_dir, str(model_dir))):
        run = ["analyze", str(shards), "-o", str(out / "a"), "--model", model, "--no-pictures"]
        assert actclient([*run, "--no-progress", "--jobs", "1"]) == 0
        plan = ["plan", str(out / "a"), "--drop", "2", "--model", model, "-o", str(out / "p")]
        assert actclient(plan) == 0
    a, b = (json.loads((d / "a" / "analysis.json").read_text()) for d in (by_id, by_dir))
    assert a["by_tokens"] == b["by_tokens"] and a["tokens"] == b["tokens"]
    p, q = (json.loads((d / "p").read_text()) for d in (by_id, by_dir))
    assert a["model_dir"] == str(snapshot) and a["special_token_ids"] == b["special_token_ids"]
    assert p["neurons"] == q["neurons"] and p["model_dir"] == str(snapshot)
    assert "Wanda" in p["neurons"]["mlp"]["score"]  # the weights were read, not skipped
    assert actclient(["plan", str(by_id / "a"), "--drop", "2", "--model", "Org/Gone"]) == 2
