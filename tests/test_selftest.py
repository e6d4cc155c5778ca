"""`vllm-activations selftest` and tensor parallelism on the CPU build.

The selftest must pass here, and its checks must fail on the faults they exist to catch: a
residual captured at the wrong point, rows attributed to the wrong position. TP=2 runs on this
CPU build (one OpenMP core per rank) and must equal TP=1 and Hugging Face.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from server import CaptureServer
from test_capture import assert_matches_hf, capture, cosine, token_ids

from actclient.analysis.crosscheck import summary_deviations, summary_faults
from vllm_activations import cli
from vllm_activations.contract.shard import ShardReader, read_shard, write_shard
from vllm_activations.selftest import (
    CheckpointWeights,
    chain_errors,
    compare,
    overhead_variants,
    row_cosines,
)


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of shard `src` with its activations passed through `change(site, array)`."""
    with ShardReader(src) as r:
        extra = {
            f"channel_stats/{k}/{n}": r.dataset(f"channel_stats/{k}/{n}")
            for k in ("attn_heads", "mlp_intermediate")
            for n in ("sum", "sum_sq", "count")
        }
        outputs = {site: change(site, r.read(site)) for site in r.sites}
        return write_shard(
            dst,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            positions=r.positions,
            layers=r.layers,
            layer_outputs=outputs,
            dtype="float32",
            attrs={"model_dtype": r.attrs["model_dtype"]},
            extra=extra,
        )


@pytest.mark.integration
def test_selftest_passes_and_its_checks_catch_faults(embedded_models, tmp_path, capsys):
    model = embedded_models["tiny-qwen3-untied"]
    work = tmp_path / "selftest"
    rc = cli.main(
        [
            "selftest", str(model), "--workdir", str(work), "--quick",
            "--max-num-batched-tokens", "64",
            # float32: vLLM CPU's eager bf16 kernels die with SIGILL on Intel/AMX hosts in
            # this sandbox (stock vLLM too); the GPU pod runs the model's own dtype.
            "--dtype", "float32",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((work / "selftest-report.json").read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert report["verdict"] == "PASS" and all(c["passed"] for c in checks.values()), out
    assert {c["config"] for c in checks.values()} == {"default"}  # no GPU: no opt-in pass
    assert set(checks) >= {
        "engine", "batch == solo", "position modes", "stop token, last + channel_stats",
        "shared 64-token prefix (all + generated)", "full 64-token step",
        "compiled == eager (incl. a 600-token prompt)", "summary == its rows",
        "stop string (summary + rows)",
    }, sorted(checks)  # fmt: skip
    assert "model runner v1" in checks["engine"]["detail"]
    assert "async scheduling False" in checks["engine"]["detail"]
    assert f"selftest: PASS ({len(checks)}/{len(checks)} checks)" in out
    for line in ("config", "position modes", "full 64-token step"):
        assert line in out  # the table
    # The overhead measurement: every variant timed in both rounds, ratios to the same
    # round's no-capture batch, and its table printed.
    overhead = report["overhead"]["default"]
    assert (overhead["requests"], overhead["max_tokens"], overhead["rounds"]) == (4, 12, 2)
    variants = overhead["variants"]
    assert list(variants) == [name for name, _ in overhead_variants(4)]
    assert variants["no capture"]["ratio_median"] == 1.0
    for name, v in variants.items():
        assert len(v["wall_s"]) == 2 and min(v["wall_s"]) > 0, (name, v)
        lo, hi = v["ratio_range"]
        assert 0 < lo <= v["ratio_median"] <= hi, (name, v)
    assert "capture overhead [default]: 4 concurrent requests x 12 tokens" in out
    assert "summary only, all layers" in out

    shards = sorted((work / "default" / "compiled" / "shards").glob("*.h5"))

    def full_capture(path: Path) -> bool:
        """A solo capture of every position with channel statistics (the chaining input)."""
        with ShardReader(path) as reader:
            spec = reader.attrs["capture_spec"]
            return (
                spec["channel_stats"] and spec["positions"] == "all"
                and len(reader.input_tokens) > 5
            )  # fmt: skip

    good = next(p for p in shards if full_capture(p))
    weights = CheckpointWeights(model)
    assert max(e for _, _, e in chain_errors(good, weights)) < 5e-2

    # A layer-2 output captured before the MLP add (e.g. copied after an in-place kernel
    # reused the buffer) breaks both identities around it.
    def stale(site, x):
        if site == "post_mlp":
            x = x.copy()
            x[2] = read_shard(good).layer_outputs["post_attention"][2]
        return x

    broken = _rewrite(good, tmp_path / "stale.h5", stale)
    errors = {(block, layer): e for block, layer, e in chain_errors(broken, weights)}
    assert errors[("mlp", 2)] > 0.5 and errors[("attention", 3)] > 0.2  # limit: 5e-2
    assert errors[("attention", 1)] < 5e-2

    # Rows attributed to the wrong positions (shifted by one) fail the shard comparison.
    shifted = _rewrite(good, tmp_path / "shifted.h5", lambda _s, x: np.roll(x, 1, axis=1))
    assert row_cosines(read_shard(good), read_shard(good)).min() > 0.99999
    result = compare("shifted", [(shifted, good)], (0.999, 0.99, 5e-2))
    assert not result.passed, result.detail

    # The summary cross-check: the device's sums equal the analysis of the shard's own rows,
    # and a summary off by 0.1% or by one token is caught.
    summarised = [p for p in shards if _has_summary_and_rows(p)]
    assert len(summarised) >= 4  # three concurrent + the stop-string one (+ its full run)
    deviations = summary_deviations(summarised[0])
    assert deviations["all/count"] == 0 and deviations["all/similarity"] < 1e-5, deviations
    for path in summarised:
        assert summary_faults(path) == [], path
    scaled = _edit_summary(summarised[0], tmp_path / "scaled.h5", "content/cos_sum", 1.001)
    faults = summary_faults(scaled)
    assert any(f.startswith("content/similarity:") for f in faults), faults
    assert not any(f.startswith("last/") for f in faults), faults
    counted = _edit_summary(summarised[0], tmp_path / "counted.h5", "rest/count", 1, add=True)
    assert any(f.startswith("all/count:") for f in summary_faults(counted))


def _has_summary_and_rows(path: Path) -> bool:
    with ShardReader(path) as reader:
        return reader.has_summary and reader.has_tensors


def _edit_summary(src: Path, dst: Path, name: str, value, add: bool = False) -> Path:
    """A copy of shard `src` with one summary dataset scaled by (or, `add`, increased by)
    `value`."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        ds = f[f"summary/{name}"]
        ds[()] = ds[()] + value if add else ds[()] * value
    return dst


def test_fp8_block_scaled_weights_are_dequantized(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    dense = torch.randn(256, 384) * 0.05
    scale = torch.rand(2, 3) + 0.5  # one per 128x128 block
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    fp8 = (dense / full).to(torch.float8_e4m3fn)
    save_file(
        {
            "model.layers.0.mlp.down_proj.weight": fp8,
            "model.layers.0.mlp.down_proj.weight_scale_inv": scale,
            "model.embed_tokens.weight": dense.to(torch.bfloat16),
        },
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
        )
    )
    weights = CheckpointWeights(tmp_path)
    got = weights.get(weights.find("layers.0.mlp.down_proj.weight"))
    want = fp8.float() * full
    assert torch.equal(got, want)
    assert (got - dense).abs().max() < 0.1 * dense.abs().max()  # fp8 keeps ~2 significant bits
    assert weights.get(weights.find("embed_tokens.weight")).dtype == torch.float32


@pytest.mark.integration
def test_tensor_parallel_2_equals_tp1_and_hf(servers, embedded_models, tmp_path, monkeypatch):
    """TP=2 (one core per rank): only rank 0 writes, the residual stream equals TP=1's and
    HF's, and the channel statistics, sharded across ranks, come back whole."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    name = "tiny-qwen3-tied"
    tp1 = servers.get(name)
    tp2 = CaptureServer(
        embedded_models[name], tmp_path / "tp2", dtype="float32",
        extra=["--tensor-parallel-size", "2"],
    )  # fmt: skip
    try:
        tp2.wait_ready()
        from vllm_activations.contract.spec import CaptureSpec

        spec = CaptureSpec(dtype="float32", channel_stats=True)
        prompts = [token_ids(n, 70 + n) for n in (150, 20)]
        with cf.ThreadPoolExecutor(2) as pool:
            on_tp2 = list(pool.map(lambda p: capture(tp2, p, 10, spec)[1], prompts))
        for prompt, path in zip(prompts, on_tp2, strict=True):
            _, ref_path = capture(tp1, prompt, 10, spec)
            a, b = read_shard(path), read_shard(ref_path)
            assert a.output_tokens.tolist() == b.output_tokens.tolist()
            for site in a.layer_outputs:
                assert cosine(a.layer_outputs[site], b.layer_outputs[site]).min() > 0.99999
            assert_matches_hf(a, embedded_models[name], 0.99999, 1e-4)
            with ShardReader(path) as ra, ShardReader(ref_path) as rb:
                for kind in ("attn_heads", "mlp_intermediate"):
                    for stat in ("sum", "sum_sq", "count"):
                        got = ra.dataset(f"channel_stats/{kind}/{stat}")
                        want = rb.dataset(f"channel_stats/{kind}/{stat}")
                        assert got.shape == want.shape, (kind, stat)
                        scale = np.abs(want).max()
                        assert np.abs(got - want).max() <= 1e-4 * scale, (kind, stat)
        written = sorted(p.name for p in tp2.shard_dir.iterdir())
        assert written == sorted(p.name for p in on_tp2), written  # rank 0 only, no errors
    finally:
        tp2.stop()
