"""Unit tests: the shard format, bfloat16 storage and atomic writes."""

from __future__ import annotations

import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from vllm_activations.contract.shard import (
    SCHEMA_VERSION,
    ShardError,
    ShardReader,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    iter_shard_paths,
    read_shard,
    write_shard,
)


def make(path, dtype="bfloat16", L=3, T=5, H=8, seed=0):
    rng = np.random.default_rng(seed)
    acts = {
        s: rng.normal(size=(L, T, H)).astype(np.float32) * 100
        for s in ("post_attention", "post_mlp")
    }
    write_shard(
        path,
        input_tokens=[1, 2, 3, 4],
        output_tokens=[5, 6],
        positions=range(T),
        layers=[0, 2, 5],
        layer_outputs=acts,
        dtype=dtype,
        attrs={
            "model": "m",
            "capture_spec": {"positions": "all"},
            "prompt": "a\x00b",
            "completion": '"quoted"',
            "other": "[not json",
        },
    )
    return acts


def test_bf16_round_trip_matches_torch_rounding():
    import torch

    x = np.random.default_rng(1).normal(size=10000).astype(np.float32) * 1e3
    x[:4] = [0.0, -0.0, 3.0e38, 1e-40]
    ours = float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    back = bf16_bits_to_float32(ours)
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([np.nan], np.float32))))


@pytest.mark.parametrize("dtype, atol", [("bfloat16", 1.0), ("float16", 0.1), ("float32", 0)])
def test_write_read_round_trip(tmp_path, dtype, atol):
    acts = make(tmp_path / "a.h5", dtype)
    shard = read_shard(tmp_path / "a.h5")
    assert shard.input_tokens.tolist() == [1, 2, 3, 4]
    assert shard.output_tokens.tolist() == [5, 6]
    assert shard.layers.tolist() == [0, 2, 5]
    assert shard.tokens.tolist() == [1, 2, 3, 4, 5]
    assert shard.attrs["schema_version"] == SCHEMA_VERSION
    assert shard.attrs["capture_spec"] == {"positions": "all"}
    assert shard.attrs["prompt"] == "a\x00b"
    assert shard.attrs["completion"] == '"quoted"'
    assert shard.attrs["other"] == "[not json"
    for site, want in acts.items():
        got = shard.layer_outputs[site]
        assert got.dtype == np.float32 and got.shape == (3, 5, 8)
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-2 if atol else 0)
    with h5py.File(tmp_path / "a.h5") as f:
        stored = f["layer_outputs/post_mlp"]
        assert stored.attrs["dtype"] == dtype
        assert (
            stored.dtype
            == {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[dtype]
        )


def test_reader_selects_layers_and_sites(tmp_path):
    acts = make(tmp_path / "a.h5", "float32")
    shard = read_shard(tmp_path / "a.h5", layers=[5, 0], sites=["post_mlp"])
    assert shard.layers.tolist() == [5, 0]
    np.testing.assert_array_equal(shard.layer_outputs["post_mlp"], acts["post_mlp"][[2, 0]])
    with pytest.raises(ShardError, match=r"layers \[1\] were not captured"):
        read_shard(tmp_path / "a.h5", layers=[1])


def test_invalid_files_are_rejected(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ShardError, match="not a readable HDF5 shard"):
        ShardReader(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ShardError, match="schema_version"):
        ShardReader(tmp_path / "other.h5")


def test_shape_mismatch_refused_and_nothing_written(tmp_path):
    with pytest.raises(ShardError, match="expected"):
        write_shard(
            tmp_path / "bad.h5",
            input_tokens=[1],
            output_tokens=[],
            positions=[0, 1],
            layers=[0],
            layer_outputs={"post_mlp": np.zeros((1, 3, 4), np.float32)},
            dtype="float32",
        )
    assert list(tmp_path.iterdir()) == []


WRITER = """
import sys, numpy as np
from vllm_activations.contract.shard import write_shard
x = np.ones((64, 512, 1024), np.float32)
print("start", flush=True)
while True:
    write_shard(sys.argv[1], input_tokens=[1], output_tokens=[2], positions=range(512),
                layers=range(64), layer_outputs={"post_mlp": x, "post_attention": x},
                dtype="float32")
"""


def test_killed_writer_leaves_no_partial_shard_visible(tmp_path):
    """SIGKILL in the middle of writing: readers see either nothing or a whole shard."""
    target = tmp_path / "big.h5"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"start"
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for path in iter_shard_paths(tmp_path):
        shard = read_shard(path, layers=[63])
        assert shard.layer_outputs["post_mlp"].shape == (1, 512, 1024)
    assert all(p.suffix == ".partial" for p in leftovers)
    assert [p.name for p in iter_shard_paths(tmp_path)] in ([], ["big.h5"])


def test_layer_outputs_may_be_views_of_a_larger_store(tmp_path):
    """The connector hands over [:, :T] views of its row store; they are written as is."""
    rng = np.random.default_rng(3)
    store = rng.standard_normal((3, 10, 8)).astype(np.float32)
    view = store[:, :6]
    assert not view.flags.c_contiguous
    path = write_shard(
        tmp_path / "v.h5",
        input_tokens=[1, 2, 3, 4],
        output_tokens=[5, 6, 7],
        positions=range(6),
        layers=[0, 1, 2],
        layer_outputs={"post_mlp": view},
        dtype="float32",
    )
    assert np.array_equal(read_shard(path).layer_outputs["post_mlp"], store[:, :6])


def test_summary_sums_round_trip_with_pair_sums_as_one_triangle(tmp_path):
    """Cosine sums (symmetric) keep one triangle with the diagonal, angle sums (upper
    triangle only) one without it; the reader gives back the full matrices, and `all` as the
    merge of the stored `content` and `rest` (Chan's formula for the channel moments)."""
    from vllm_activations.contract.shard import summary_datasets

    rng = np.random.default_rng(4)
    s, b, h = 7, 4, 5
    cos = rng.normal(size=(s, s))
    cos = cos + cos.T

    def sums(x: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "count": np.int64(len(x)), "cos_sum": cos * len(x), "cos_sq_sum": cos * cos,
            "angle_sum": np.triu(np.full((b, b), 0.5 * len(x)), 1),
            "update_ratio_sum": np.full(s - 1, 0.1), "norm_sum": np.ones(s),
            "x_sum": x.sum(0), "x_sq_sum": (x * x).sum(0), "absmax": np.abs(x).max(0),
            "massive_count": np.ones((s, h), np.int32), "massive_tokens": np.ones(s, np.int64),
        }  # fmt: skip

    xc = rng.normal(size=(3, s, h)) + 40.0  # a large mean: the merge must not cancel
    xr = rng.normal(size=(2, s, h)) * 3.0
    result = {"content": sums(xc), "rest": sums(xr), "last": sums(xr[1:])}
    datasets, attrs = summary_datasets(result, "float32")
    assert datasets["summary/content/cos_sum"].shape == (s * (s + 1) // 2,)
    assert datasets["summary/content/angle_sum"].shape == (b * (b - 1) // 2,)
    path = write_shard(
        tmp_path / "s.h5", input_tokens=[1, 2], output_tokens=[3, 4], positions=range(3),
        layers=[0, 1, 2], layer_outputs={}, dtype="float32", extra=datasets, extra_attrs=attrs,
    )  # fmt: skip
    with ShardReader(path) as reader:
        back = reader.summary()
    assert set(back) == {"all", "content", "rest", "last"}
    for population, want in result.items():
        got = back[population]
        np.testing.assert_allclose(got["cos_sum"], want["cos_sum"], rtol=1e-6)
        np.testing.assert_allclose(got["cos_sq_sum"], want["cos_sq_sum"], rtol=1e-6)
        np.testing.assert_allclose(got["angle_sum"], want["angle_sum"], rtol=1e-6)
    x = np.concatenate([xc, xr])
    got = back["all"]
    assert int(got["count"]) == 5 and (got["massive_count"] == 2).all()
    np.testing.assert_allclose(got["cos_sum"], cos * 5, rtol=1e-6)
    np.testing.assert_allclose(got["absmax"], np.abs(x).max(0), rtol=1e-6)
    # the stored moments keep 10 mantissa bits (2^-11 relative); the merge keeps that size
    np.testing.assert_allclose(got["channel_mean"], x.mean(0), rtol=2.0**-10)
    np.testing.assert_allclose(got["channel_m2"], ((x - x.mean(0)) ** 2).sum(0), rtol=2.0**-8)
    with h5py.File(path) as f:
        assert f["summary/content/channel_m2"].attrs["mantissa_bits"] == 10


def test_summary_moments_keep_ten_mantissa_bits_rounded_to_nearest():
    """Per-channel moments are stored rounded to 10 mantissa bits: within 2^-11 relative of
    the float64 value, the 13 dropped bits zero (so gzip stores them for almost nothing),
    and values that are not finite kept as they are."""
    from vllm_activations.contract.shard import round_mantissa

    rng = np.random.default_rng(7)
    x = rng.normal(size=20000) * 10.0 ** rng.integers(-30, 30, size=20000)
    got = round_mantissa(x)
    assert got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - x), np.abs(x) * 2.0**-11 * (1 + 1e-6))
    assert not (got.view(np.uint32) & np.uint32((1 << 13) - 1)).any()
    # nearest: better than truncation on average
    truncated = (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    assert np.mean(np.abs(got - x)) < 0.6 * np.mean(np.abs(truncated - x))
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, np.finfo(np.float32).max])
    back = round_mantissa(special)
    assert np.isinf(back[:2]).all() and np.isnan(back[2]) and (back[3:5] == 0).all()
    assert back[5] == np.finfo(np.float32).max  # would round past float32's range: kept
