"""The teacher's next-token distribution in the shard (`capture.teacher_logprobs`).

Unit tests: the alignment of vLLM's prompt_logprobs / logprobs JSON with shard positions, the
staged publish (no shard is ever visible without its teacher data), and refusing a bad K
before anything runs. Integration tests: on the real CPU engine, the shard's teacher data equal
what vLLM's own /v1/completions returns as prompt_logprobs for the same token ids.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from vllm_activations.cli import vllm_max_logprobs
from vllm_activations.contract.shard import (
    ShardError,
    TeacherData,
    iter_shard_paths,
    publish_with_teacher,
    read_shard,
    staged_shard_path,
    write_shard,
)
from vllm_activations.contract.spec import CaptureSpec, CaptureSpecError
from vllm_activations.sidecar import Settings, create_app
from vllm_activations.teacher import TeacherDataError, teacher_from_choice, teacher_request_fields

MODEL = "tiny-qwen3-tied"  # float32 engine: logprobs comparable to 1e-4
K = 5


# ---------------------------------------------------------------- unit: spec and alignment


def test_spec_field_round_trips_and_counts_its_bytes():
    spec = CaptureSpec(layers=[0], sites=["post_mlp"], teacher_logprobs=4)
    assert CaptureSpec.from_dict(spec.to_dict()) == spec
    plain = CaptureSpec(layers=[0], sites=["post_mlp"])
    # 10 prompt + 3 new tokens: 12 forwarded positions, each 4 ids + 4 logprobs + 1 logprob.
    extra = spec.estimate_bytes(10, 3, 4, 8) - plain.estimate_bytes(10, 3, 4, 8)
    assert extra == 12 * (4 * 4 + 4 * 4 + 4)
    assert teacher_request_fields(plain) == {}
    assert teacher_request_fields(spec) == {
        "logprobs": 4,
        "prompt_logprobs": 4,
        "return_tokens_as_token_ids": True,
    }
    # Generated positions need no prompt logprobs (nor their cost, nor the cache miss).
    generated = CaptureSpec(positions="generated", teacher_logprobs=4)
    assert "prompt_logprobs" not in teacher_request_fields(generated)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "3", True, [4]])
def test_spec_refuses_a_bad_k_naming_the_field(bad):
    with pytest.raises(CaptureSpecError) as info:
        CaptureSpec.from_dict({"teacher_logprobs": bad})
    assert info.value.field == "teacher_logprobs"
    assert str(info.value).startswith("capture.teacher_logprobs: ")
    assert "--max-logprobs" in str(info.value)


def _prompt_entry(token: int, top: list[tuple[int, float]], actual_lp: float, actual_rank: int):
    """A prompt_logprobs entry as vLLM's JSON has it: the actual token first, then the top K
    by rank (the actual token's entry replaced when it is among them)."""
    entry = {str(token): {"logprob": actual_lp, "rank": actual_rank, "decoded_token": "x"}}
    for rank, (tid, lp) in enumerate(top, start=1):
        entry[str(tid)] = {"logprob": lp, "rank": rank, "decoded_token": "y"}
    return entry


def _sampled_entry(token: int, top: list[tuple[int, float]], actual_lp: float):
    entry = {f"token_id:{token}": actual_lp}
    entry.update({f"token_id:{tid}": lp for tid, lp in top})
    return entry


def test_alignment_of_prompt_and_generated_logprobs_with_positions():
    """Position p's row is the distribution over token p+1: prompt_logprobs[p+1] inside the
    prompt, the generated logprobs[p - (P-1)] from the last prompt position on."""
    prompt = [10, 11, 12]
    output = [13, 14]
    top = {
        0: [(11, -0.1), (50, -2.0)],  # token 11 in the top 2
        1: [(60, -0.5), (61, -1.0)],  # token 12 outside: an extra entry
        2: [(13, -0.2), (70, -1.5)],
        3: [(71, -0.3), (72, -0.9)],  # sampled 14 outside the top 2
    }
    choice = {
        "prompt_logprobs": [
            None,
            _prompt_entry(11, top[0], -0.1, 1),
            _prompt_entry(12, top[1], -4.0, 9),
        ],
        "logprobs": {
            "tokens": ["token_id:13", "token_id:14"],
            "token_logprobs": [-0.2, -3.0],
            "top_logprobs": [_sampled_entry(13, top[2], -0.2), _sampled_entry(14, top[3], -3.0)],
        },
    }
    # Forwarded positions 0..P+G-2 = 0..3; `every:2`-like subsets index the same rows.
    teacher = teacher_from_choice(choice, prompt, output, [0, 1, 2, 3], k=2)
    assert teacher.topk_ids.tolist() == [[11, 50], [60, 61], [13, 70], [71, 72]]
    np.testing.assert_allclose(
        teacher.topk_logprobs, [[-0.1, -2.0], [-0.5, -1.0], [-0.2, -1.5], [-0.3, -0.9]]
    )
    np.testing.assert_allclose(teacher.next_logprob, [-0.1, -4.0, -0.2, -3.0])
    subset = teacher_from_choice(choice, prompt, output, [1, 3], k=2)
    assert subset.topk_ids.tolist() == [[60, 61], [71, 72]]
    with pytest.raises(TeacherDataError, match="not the shard's"):
        teacher_from_choice(choice, prompt, [13, 99], [0, 1, 2, 3], k=2)
    with pytest.raises(TeacherDataError, match="prompt_logprobs"):
        teacher_from_choice({**choice, "prompt_logprobs": None}, prompt, output, [0], k=2)


def _teacher(t: int, k: int) -> TeacherData:
    rng = np.random.default_rng(t)
    return TeacherData(
        topk_ids=rng.integers(0, 1000, size=(t, k)),
        topk_logprobs=-rng.random((t, k)),
        next_logprob=-rng.random(t),
    )


def _stage(directory, name="abc", positions=(0, 1, 2)):
    final = directory / f"{name}.h5"
    staged = staged_shard_path(final)
    write_shard(
        staged,
        input_tokens=[1, 2, 3],
        output_tokens=[4],
        positions=list(positions),
        layers=[0],
        layer_outputs={"post_mlp": np.ones((1, len(positions), 4), np.float32)},
        dtype="float32",
    )
    return staged, final


def test_staged_shard_is_invisible_until_published_with_its_teacher_data(tmp_path):
    staged, final = _stage(tmp_path)
    assert list(iter_shard_paths(tmp_path)) == [] and not final.exists()
    teacher = _teacher(3, K)
    publish_with_teacher(staged, final, teacher)
    assert list(iter_shard_paths(tmp_path)) == [final] and not staged.exists()
    shard = read_shard(final)
    assert shard.teacher is not None and shard.teacher.k == K
    assert np.array_equal(shard.teacher.topk_ids, teacher.topk_ids)
    assert np.array_equal(shard.teacher.topk_logprobs, teacher.topk_logprobs)
    assert np.array_equal(shard.teacher.next_logprob, teacher.next_logprob)
    assert shard.teacher.topk_ids.dtype == np.int32
    assert shard.teacher.topk_logprobs.dtype == shard.teacher.next_logprob.dtype == np.float32


def test_teacher_rows_must_match_positions_and_nothing_is_published(tmp_path):
    staged, final = _stage(tmp_path)
    with pytest.raises(ShardError, match="4 rows, the shard 3 positions"):
        publish_with_teacher(staged, final, _teacher(4, K))
    assert not final.exists() and list(iter_shard_paths(tmp_path)) == []


def test_a_teacher_only_shard_needs_no_tensors(tmp_path):
    """`tensors: false` with teacher_logprobs: the worker stages tokens and positions only."""
    final = tmp_path / "only.h5"
    staged = staged_shard_path(final)
    write_shard(
        staged,
        input_tokens=[1, 2, 3],
        output_tokens=[4],
        positions=[0, 1, 2],
        layers=[0],
        layer_outputs={},
        dtype="bfloat16",
    )
    with pytest.raises(ShardError, match="nothing else is recorded"):
        write_shard(
            final,
            input_tokens=[1],
            output_tokens=[2],
            positions=[0],
            layers=[0],
            layer_outputs={},
            dtype="bfloat16",
        )
    teacher = _teacher(3, K)
    publish_with_teacher(staged, final, teacher)
    shard = read_shard(final)
    assert shard.layer_outputs == {}
    assert np.array_equal(shard.teacher.topk_ids, teacher.topk_ids)


def test_launcher_reads_max_logprobs_from_the_vllm_arguments():
    assert vllm_max_logprobs([]) == 20
    assert vllm_max_logprobs(["--enforce-eager", "--max-logprobs", "64"]) == 64
    assert vllm_max_logprobs(["--max-logprobs=-1"]) == -1


@pytest.mark.parametrize("bad", [0, 9, 2.5, "3", True])
def test_sidecar_refuses_bad_k_before_calling_vllm(tmp_path, bad):
    """Checked before tokenizing: the (unreachable) vLLM is never called, nothing written."""
    settings = Settings(
        vllm_url="http://127.0.0.1:9",
        shard_dir=tmp_path,
        num_layers=4,
        hidden_size=8,
        model_name="m",
        max_logprobs=8,
    )
    with TestClient(create_app(settings)) as client:
        for wait in (True, False):
            r = client.post(
                "/generate_with_activations",
                json={"prompt": "hi", "capture": {"teacher_logprobs": bad}, "wait": wait},
            )
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["field"] == "capture.teacher_logprobs"
            assert "from 1 to 8" in error["message"] and "--max-logprobs" in error["message"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def server(servers):
    return servers.get(MODEL)


def _capture(server, body: dict) -> dict:
    r = httpx.post(
        f"{server.url}/generate_with_activations", json=body, headers=server.headers, timeout=600
    )
    assert r.status_code == 200, r.text
    return r.json()


def _vllm_logprobs(server, ids: list[int], k: int) -> dict:
    """vLLM's own answer for the same token ids: a plain completion, no capture."""
    body = {
        "model": "model",
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": k,
        "logprobs": k,
        "return_tokens_as_token_ids": True,
    }
    r = httpx.post(f"{server.vllm_url}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _reference_row(entry: dict, next_token: int, k: int):
    """Top K of one prompt_logprobs entry in rank order, and the logprob of `next_token`."""
    top = sorted((v["rank"], int(t), v["logprob"]) for t, v in entry.items() if v["rank"] <= k)
    assert len(top) == k
    return [t for _, t, _ in top], [lp for _, _, lp in top], entry[str(next_token)]["logprob"]


def _assert_prompt_rows_match(shard, reference: dict, k: int) -> int:
    """Every captured position before the last prompt token equals vLLM's prompt_logprobs
    for the next token; returns how many rows were compared."""
    prompt = shard.input_tokens.tolist()
    compared = 0
    for row, p in enumerate(shard.positions.tolist()):
        if p > len(prompt) - 2:
            continue
        ids, lps, nxt = _reference_row(reference["prompt_logprobs"][p + 1], prompt[p + 1], k)
        assert shard.teacher.topk_ids[row].tolist() == ids, (p, row)
        np.testing.assert_allclose(shard.teacher.topk_logprobs[row], lps, atol=1e-4, rtol=0)
        assert shard.teacher.next_logprob[row] == pytest.approx(nxt, abs=1e-4)
        compared += 1
    return compared


@pytest.mark.integration
def test_teacher_forced_shards_equal_vllm_prompt_logprobs(server):
    """Three concurrent teacher-forced captures (one of them over 128 tokens, so prefilled in
    chunks by this max_num_batched_tokens=128 server), each with another layer subset and
    position mode: their teacher data equal vLLM's prompt_logprobs for the same ids."""
    text = " ".join(
        "The harbour bridge opened in 1932 and still carries trains, cars and walkers."
        for _ in range(14)
    )
    bodies = [
        {"prompt": "Tell me about the bridge.", "text": text, "capture": {"layers": [0]}},
        {
            "prompt": "A short note:",
            "text": "the market opens at nine on Saturdays.",
            "capture": {"layers": [-1], "sites": ["post_mlp"], "positions": "every:3"},
        },
        {
            "messages": [{"role": "user", "content": "Where is the old lighthouse?"}],
            "text": "It stands on the northern cliff, a short walk from the pier.",
            "capture": {"layers": [1, 2], "positions": "prompt", "dtype": "float32"},
        },
    ]
    for body in bodies:
        body["capture"]["teacher_logprobs"] = K
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: _capture(server, b), bodies))
    lengths = []
    for body, result in zip(bodies, results, strict=True):
        assert result["shard"]["teacher_logprobs"] == K
        shard = read_shard(server.shard_dir / f"{result['id']}.h5")
        assert shard.teacher is not None
        assert shard.layers.tolist() == CaptureSpec(**body["capture"]).resolve_layers(4)
        t = len(shard.positions)
        assert shard.teacher.topk_ids.shape == (t, K) and shard.teacher.next_logprob.shape == (t,)
        prompt = shard.input_tokens.tolist()
        lengths.append(len(prompt))
        reference = _vllm_logprobs(server, prompt, K)
        compared = _assert_prompt_rows_match(shard, reference, K)
        assert compared == sum(1 for p in shard.positions if p <= len(prompt) - 2) > 0
        # The last prompt position's distribution is the one the sampled token came from.
        last = len(prompt) - 1
        if last in shard.positions:
            row = shard.positions.tolist().index(last)
            want = {
                int(key.split(":")[1]): lp
                for key, lp in reference["logprobs"]["top_logprobs"][0].items()
            }
            got = dict(
                zip(
                    shard.teacher.topk_ids[row].tolist(),
                    shard.teacher.topk_logprobs[row],
                    strict=True,
                )
            )
            assert set(got) == set(want)
            for tid, lp in got.items():
                assert lp == pytest.approx(want[tid], abs=1e-4)
            assert shard.output_tokens.tolist() == [
                int(reference["logprobs"]["tokens"][0].split(":")[1])
            ]
    assert max(lengths) > server.max_num_batched_tokens  # the first prompt was chunked


@pytest.mark.integration
def test_generate_mode_teacher_covers_generated_tokens_with_raw_logprobs(server):
    """Sampling at temperature 0.8: the stored distribution is the model's own (vLLM's raw
    logprobs, before temperature), equal to prompt_logprobs over prompt + generated ids."""
    result = _capture(
        server,
        {
            "prompt": "The old town square has",
            "max_tokens": 8,
            "temperature": 0.8,
            "seed": 7,
            "ignore_eos": True,
            "capture": {"layers": [3], "sites": ["post_attention"], "teacher_logprobs": K},
        },
    )
    shard = read_shard(server.shard_dir / f"{result['id']}.h5")
    ids = shard.input_tokens.tolist() + shard.output_tokens.tolist()
    assert len(shard.output_tokens) == 8
    assert shard.positions.tolist() == list(range(len(ids) - 1))
    reference = _vllm_logprobs(server, ids, K)
    # Decode steps and one prefill of the same ids differ by float32 rounding only.
    prompt_lp = reference["prompt_logprobs"]
    for row, p in enumerate(shard.positions.tolist()):
        want_ids, want_lps, nxt = _reference_row(prompt_lp[p + 1], ids[p + 1], K)
        assert shard.teacher.topk_ids[row].tolist() == want_ids, p
        np.testing.assert_allclose(shard.teacher.topk_logprobs[row], want_lps, atol=1e-4, rtol=0)
        assert shard.teacher.next_logprob[row] == pytest.approx(nxt, abs=1e-4)


@pytest.mark.integration
def test_teacher_data_alone_with_tensors_off(server):
    """A request that wants only the teacher data: no layer outputs, same teacher rows."""
    result = _capture(
        server,
        {
            "prompt": "Opening hours of the museum:",
            "text": "ten to six, closed on Mondays.",
            "capture": {"tensors": False, "teacher_logprobs": K},
        },
    )
    shard = read_shard(server.shard_dir / f"{result['id']}.h5")
    assert shard.layer_outputs == {}
    prompt = shard.input_tokens.tolist()
    assert shard.positions.tolist() == list(range(len(prompt)))
    reference = _vllm_logprobs(server, prompt, K)
    assert _assert_prompt_rows_match(shard, reference, K) == len(prompt) - 1


@pytest.mark.integration
def test_bad_k_is_refused_on_the_real_server_and_nothing_is_written(server):
    before = {p.name for p in server.shard_dir.iterdir()}
    for bad in (0, 21, 2.5, "3"):
        for wait in (True, False):
            r = httpx.post(
                f"{server.url}/generate_with_activations",
                json={"prompt": "hi", "capture": {"teacher_logprobs": bad}, "wait": wait},
                headers=server.headers,
                timeout=60,
            )
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["field"] == "capture.teacher_logprobs"
            assert "from 1 to 20" in error["message"], error["message"]
    assert {p.name for p in server.shard_dir.iterdir()} == before
