"""Summary capture: the device formulas equal the analyzer's, and the device accumulation
(ring, populations, keep rules) equals summing the per-token values directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actclient.analysis import formulas
from actclient.analysis.stats import MassiveRule, TokenBlock
from vllm_activations import summary


def site_vectors(tokens: int, layers: int, hidden: int, seed: int = 0) -> np.ndarray:
    """A residual stream with the features that make the formulas hard: slowly drifting
    sites (cosines near 1), a site equal to its predecessor, a massive channel on token 0."""
    rng = np.random.default_rng(seed)
    s = summary.num_sites(layers)
    x = np.empty((tokens, s, hidden), dtype=np.float32)
    x[:, 0] = rng.normal(size=(tokens, hidden))
    for k in range(1, s):
        x[:, k] = x[:, k - 1] + 0.05 * rng.normal(size=(tokens, hidden))
    x[:, 3] = x[:, 2]  # an update of exactly zero
    x[0, 2:, 7] = 3000.0  # a massive activation from layer 0 on
    return x


def test_device_formulas_equal_the_analyzers():
    layers, hidden = 3, 96
    x = site_vectors(5, layers, hidden)
    boundary = summary.boundary_sites(layers)
    # The analyzer's formulas in their float64 (audit) mode: the device computes in float64.
    block = TokenBlock(
        x.astype(np.float64), np.arange(5), np.arange(5), "s", boundary, MassiveRule(),
        {"all": np.ones(5, bool), "content": np.ones(5, bool), "last": np.ones(5, bool)},
    )  # fmt: skip
    q = summary.token_quantities(torch.from_numpy(x).double(), torch.as_tensor(boundary))
    np.testing.assert_allclose(q["cos"].numpy(), block.gram, atol=1e-6)
    np.testing.assert_allclose(q["angle"].numpy(), block.angle, atol=1e-6)
    assert q["angle"][0, 1, 2] == 0 or np.isclose(block.angle[0, 1, 2], q["angle"][0, 1, 2])
    ratio = np.diagonal(q["ratio"].numpy(), offset=1, axis1=1, axis2=2)
    np.testing.assert_allclose(ratio, block.update_ratio, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(q["norms"].numpy(), block.norms, rtol=1e-6)
    np.testing.assert_allclose(q["kurtosis"].numpy(), block.kurtosis, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(q["hoyer"].numpy(), block.hoyer, rtol=1e-5, atol=1e-7)
    flags = q["flags"].numpy()
    rows_t, rows_s, flagged, _ = block.massive
    want = np.zeros_like(flags)
    want[rows_t, rows_s] = flagged
    assert flags.any() and np.array_equal(flags, want)


@pytest.mark.parametrize("hidden", [96, 97])
def test_massive_counting_shortcut_equals_the_median_rule(hidden):
    """Massive flags decided by counting equal the rule with every median:
    single and several candidates, candidates right at ratio x median, rows of ties."""
    rng = np.random.default_rng(3)
    mag = np.abs(rng.normal(size=(64, 9, hidden))).astype(np.float32)
    mag[:, :, 5] = rng.uniform(50, 3000, size=(64, 9))  # one candidate, either side of 1000x
    mag[:8, :, 11] = rng.uniform(100, 5000, size=(8, 9))  # a second candidate
    mag[8:16, :, :] = 1.0  # ties: the median is exactly 1
    mag[8:16, :, 3] = np.where(np.arange(8) % 2, 1000.0, 1000.5)[:, None]  # at / above 1000
    mag[16:24] *= 20.0  # a large median: candidates near the cut both ways
    t = torch.from_numpy(mag)
    exact = torch.clamp(summary.MASSIVE_RATIO * summary._median(t), min=summary.MASSIVE_THRESHOLD)
    want = (t > exact[:, :, None]).numpy()
    got = (t > summary._massive_bounds(t)[:, :, None]).numpy()
    assert want.any() and not want.all(axis=2).any()
    assert np.array_equal(got, want)
    rule = MassiveRule()
    rows = mag.reshape(-1, hidden)
    analyzer = formulas.massive_flags(rows, rule.threshold, rule.ratio)
    assert np.array_equal(got.reshape(-1, hidden), analyzer)


@pytest.mark.parametrize("path", ["direct", "segments"])
def test_ring_and_populations_equal_direct_sums(path, monkeypatch):
    # "segments": the per-slot partial sums used on a GPU; "direct": the CPU's in-place
    # index_add_ of the rows that need it.
    monkeypatch.setattr(summary, "_segments_path", lambda device: path == "segments")
    """Chunked steps, two requests with different keep rules, an async-style extra forward,
    each step's rows in a buffer with rows of no summary request between them: the device
    sums (committed + valid ring) equal summing each kept token's quantities."""
    layers, hidden, rows = 2, 32, 40
    state = summary.SummaryState.allocate(
        2, layers, hidden, rows, torch.float32, vocab_size=50, special_ids=[5]
    )
    state.block_tokens = 3  # several blocks per step
    x = torch.from_numpy(site_vectors(40, layers, hidden, seed=1))
    tokens = torch.arange(40) % 7  # token 5 is special
    plan = {0: ("all", 0, 12), 1: ("every", 3, 10)}  # slot: (mode, every, prompt length)
    for slot, (mode, every, prompt) in plan.items():
        state.start_slot(slot, mode if mode != "every" else "all", every, prompt)
    steps = [{0: range(0, 9), 1: range(0, 6)}, {0: range(9, 12), 1: range(6, 11)}]
    steps += [{0: [p], 1: [p - 1]} for p in range(12, 16)]
    for step in steps:
        pos, owner, idx = [], [], []
        for slot, ps in step.items():
            for p in ps:
                pos.append(p)
                owner.append(slot)
                idx.append(p + 20 * slot)  # each request its own vectors
        n = len(pos)
        # Every other buffer row belongs to no summary request (all zeros, token 0).
        rows = torch.arange(n) * 2 + 1
        xs = torch.zeros(2 * n + 1, *x.shape[1:])
        xs[rows] = x[torch.as_tensor(idx) % 40]
        state.embedding[: 2 * n + 1] = xs[:, 0]
        state.tokens[: 2 * n + 1] = 0
        state.tokens[rows] = tokens[torch.as_tensor(idx) % 40]
        state.accumulate(xs[:, 1:], rows, torch.as_tensor(pos), torch.as_tensor(owner))
    # Request 0 ends at position 14 (position 15 was the extra forward); request 1 at 13.
    for slot, last_pos in ((0, 14), (1, 13)):
        result = summary.read_slot(state, slot, last_pos)
        result["all"] = summary._plus(result["content"], result.pop("rest"))
        mode, every, _ = plan[slot]
        kept = [p for p in range(last_pos + 1) if p % max(every, 1) == 0]
        vecs = x[torch.as_tensor([(p + 20 * slot) % 40 for p in kept])].double()
        q = summary.token_quantities(vecs, state.boundary)
        tok = tokens[torch.as_tensor([(p + 20 * slot) % 40 for p in kept])]
        content = torch.as_tensor([p != 0 for p in kept]) & (tok != 5)
        masks = {
            "all": torch.ones(len(kept), dtype=torch.bool),
            "content": content,
            "last": torch.arange(len(kept)) == len(kept) - 1,
        }
        for population, mask in masks.items():
            got, want = result[population], {k: v[mask] for k, v in q.items()}
            assert got["count"] == int(mask.sum()), population
            np.testing.assert_allclose(got["cos_sum"], want["cos"].sum(0), atol=1e-9)
            np.testing.assert_allclose(got["angle_sum"], want["angle"].sum(0), atol=1e-9)
            np.testing.assert_allclose(got["x_sum"], want["x"].sum(0), rtol=1e-9, atol=1e-6)
            np.testing.assert_allclose(got["absmax"], want["mag"].amax(0))
            np.testing.assert_array_equal(got["massive_count"], want["flags"].sum(0))
            np.testing.assert_array_equal(got["massive_tokens"], want["flags"].any(2).sum(0))
            xs = want["x"]
            np.testing.assert_allclose(got["x_sq_sum"], (xs * xs).sum(0), rtol=1e-9, atol=1e-6)
            np.testing.assert_allclose(got["cos_sq_sum"], want["cos"].square().sum(0), atol=1e-9)
            for name, key in (("ratio_sum", "ratio"), ("norm_sum", "norms"),
                              ("norm_sq_sum", "sq"), ("kurtosis_sum", "kurtosis"),
                              ("hoyer_sum", "hoyer")):  # fmt: skip
                np.testing.assert_allclose(got[name], want[key].sum(0), rtol=1e-5, atol=1e-6)
