"""Summary capture on the real CPU engine: the analysis of summary-only shards equals the
analysis of the same requests captured raw (similarity matrices of every population, Block
Influence, attention and MLP scores, Gromov distances, redundant layers, plan), and so does a
mix of both; and a summary-only shard is a small fraction of the raw one."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_capture import capture, token_ids

from actclient.analysis.analyze import analyze
from actclient.analysis.plan import layer_plan
from vllm_activations.contract.shard import ShardReader
from vllm_activations.contract.spec import CaptureSpec

pytestmark = pytest.mark.integration

TOLERANCE = 1e-4
# (prompt length, generated tokens, positions): chunked prefills (the servers step 128
# tokens), short and long, and a positions subset.
JOBS = [(300, 6, "all"), (40, 12, "all"), (170, 4, "all"), (25, 20, "all")]


def _capture_pairs(server, jobs, positions_override=None) -> list[tuple[Path, Path]]:
    """Each job captured raw (float32 tensors) and summary-only, all requests at once."""
    specs = []
    for i, (n, g, positions) in enumerate(jobs):
        positions = positions_override or positions
        raw = CaptureSpec(positions=positions, dtype="float32")
        summary = CaptureSpec(positions=positions, dtype="float32", summary=True, tensors=False)
        prompt = token_ids(n, 900 + i)
        specs += [(prompt, g, raw), (prompt, g, summary)]
    with cf.ThreadPoolExecutor(len(specs)) as pool:
        paths = list(
            pool.map(lambda j: capture(server, j[0], max_tokens=j[1], spec=j[2])[1], specs)
        )
    return list(zip(paths[::2], paths[1::2], strict=True))


def _analysis(paths: list[Path], model_dir: Path, work: Path, name: str) -> dict:
    folder = work / name
    folder.mkdir(parents=True)
    for path in paths:
        shutil.copy(path, folder / path.name)
    out = work / f"{name}-out"
    analysis = analyze(folder, out, model_dir, pictures=False, progress=False, jobs=1)
    arrays = {p.stem: np.load(p) for p in (out / "arrays").glob("*.npy")}
    return {"analysis": analysis, "arrays": arrays, "plan": layer_plan(analysis, drop=2)}


def _numbers(tree, prefix=""):
    """(path, value) of every number in a JSON-like tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}/{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _numbers(value, f"{prefix}[{index}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix, float(tree)


# Per population: the layer scores the plan uses, and the similarity and angle matrices.
METRICS = ("block_influence", "attention", "mlp", "angular_distance", "best_blocks",
           "redundant_layers", "redundant_sub_blocks", "protected_layers", "tokens")  # fmt: skip
ARRAYS = ("similarity", "similarity_std", "boundary_angle")


def assert_same_analysis(a: dict, b: dict) -> None:
    compared = 0
    for population in ("all", "content", "last"):
        left, right = a["analysis"]["by_tokens"][population], b["analysis"]["by_tokens"][population]
        for key in METRICS:
            if key not in left:
                continue
            lhs, rhs = dict(_numbers(left[key])), dict(_numbers(right[key]))
            assert lhs.keys() == rhs.keys(), (population, key)
            for path, value in lhs.items():
                assert abs(value - rhs[path]) <= TOLERANCE, (
                    population,
                    key,
                    path,
                    value,
                    rhs[path],
                )
                compared += 1
        for name in ARRAYS:
            x, y = a["arrays"][f"{name}_{population}"], b["arrays"][f"{name}_{population}"]
            assert x.shape == y.shape and np.isnan(x).sum() == np.isnan(y).sum()
            np.testing.assert_allclose(x, y, atol=TOLERANCE, equal_nan=True, err_msg=name)
            compared += x.size
    assert compared > 500, f"only {compared} numbers compared"
    plans = [json.dumps(x["plan"], sort_keys=True) for x in (a, b)]
    assert _rounded(a["plan"]) == _rounded(b["plan"]), plans


def _rounded(tree):
    """The plan with its scores rounded to the tolerance: same layers, same strategies."""
    if isinstance(tree, dict):
        return {k: _rounded(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rounded(v) for v in tree]
    if isinstance(tree, float):
        return round(tree, 3)
    return tree


@pytest.mark.parametrize("name", ["tiny-qwen3-tied"])
def test_summary_only_analysis_equals_raw(servers, embedded_models, tmp_path, name):
    server = servers.get(name)
    pairs = _capture_pairs(server, JOBS)
    raw, summ = [r for r, _ in pairs], [s for _, s in pairs]
    for path in summ:
        with ShardReader(path) as reader:
            assert reader.has_summary and not reader.has_tensors
    model_dir = embedded_models[name]
    a = _analysis(raw, model_dir, tmp_path, "raw")
    b = _analysis(summ, model_dir, tmp_path, "summary")
    assert_same_analysis(a, b)
    c = _analysis(raw[:2] + summ[2:], model_dir, tmp_path, "mixed")
    assert_same_analysis(a, c)


def test_summary_with_a_positions_subset_equals_raw(servers, embedded_models, tmp_path):
    server = servers.get("tiny-qwen3-tied")
    pairs = _capture_pairs(server, JOBS[:3], positions_override="every:3")
    model_dir = embedded_models["tiny-qwen3-tied"]
    a = _analysis([r for r, _ in pairs], model_dir, tmp_path, "raw")
    b = _analysis([s for _, s in pairs], model_dir, tmp_path, "summary")
    assert_same_analysis(a, b)


def test_summary_only_shard_is_small(servers, tmp_path):
    """SmolLM2, a 376-token request: bytes of the summary-only shard against the full one."""
    server = servers.get("smollm2")
    prompt = token_ids(360, 77)
    _, full = capture(server, prompt, max_tokens=17)
    spec = CaptureSpec(summary=True, tensors=False)
    _, small = capture(server, prompt, max_tokens=17, spec=spec)
    ratio = full.stat().st_size / small.stat().st_size
    print(f"\nsummary-only shard: {small.stat().st_size} bytes, full {full.stat().st_size} "
          f"bytes: {ratio:.1f}x smaller")  # fmt: skip
    assert ratio >= 50, ratio  # the issue asks 50x (README: what the bytes are)
    with ShardReader(small) as reader:
        data = reader.summary()
        assert int(data["all"]["count"]) == 360 + 17 - 1
        assert np.isfinite(data["all"]["cos_sum"]).all()
