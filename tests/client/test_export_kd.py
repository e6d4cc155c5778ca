"""`actclient export-kd`: a recorded run as parquet, read back with Hugging Face `datasets`.

The run folder is made the way `actclient record` leaves it (manifest.jsonl + shards/), its
shards published through the same staged path the sidecar uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actclient import cli, record
from actclient.export_kd import METADATA_KEY, OUT_NAME, ExportError, export_kd
from actclient.phase1.dataset import build_dataset, write_jsonl
from vllm_activations.contract.shard import (
    TeacherData,
    publish_with_teacher,
    read_shard,
    staged_shard_path,
    write_shard,
)
from vllm_activations.contract.spec import CaptureSpec

K = 4


def _shard(path: Path, rng, prompt: int, generated: int, teacher: bool = True) -> dict:
    ids = rng.integers(0, 1000, size=prompt + generated)
    positions = np.arange(prompt + generated - 1)
    t = len(positions)
    data = TeacherData(
        topk_ids=rng.integers(0, 1000, size=(t, K)),
        topk_logprobs=-rng.random((t, K), dtype=np.float32) * 5,
        next_logprob=-rng.random(t, dtype=np.float32) * 5,
    )
    target = staged_shard_path(path) if teacher else path
    write_shard(
        target,
        input_tokens=ids[:prompt],
        output_tokens=ids[prompt:],
        positions=positions,
        layers=[0],
        layer_outputs={"post_mlp": np.ones((1, t, 8), np.float32)},
        dtype="bfloat16",
        attrs={"model": "tiny"},
    )
    if teacher:
        publish_with_teacher(target, path, data)
    return {"input_ids": ids.tolist(), "positions": positions.tolist(), "teacher": data}


def _run(tmp_path: Path, n: int, without_teacher: int = 0) -> tuple[Path, dict[str, dict]]:
    """A run folder of n teacher-forced records (plus some recorded without teacher data),
    with a failed record and a superseded line in the manifest, as record leaves them."""
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected: dict[str, dict] = {}
    lines = [{"id": "r0", "status": "failed", "shard": None}]
    for i in range(n + without_teacher):
        rid = f"r{i}"
        name = record.shard_name(rid)
        has_teacher = i < n
        want = _shard(run / "shards" / name, rng, 5 + 3 * i, 1, teacher=has_teacher)
        want["response_start"] = 2 + i
        if has_teacher:
            expected[rid] = want
        lines.append(
            {
                "id": rid,
                "status": "ok",
                "shard": f"shards/{name}",
                "text_start": 2 + i,
                "capture": CaptureSpec(teacher_logprobs=K).to_dict(),
            }
        )
    lines.append({"id": "never-ok", "status": "failed", "shard": None})
    (run / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"torn')
    return run, expected


def _assert_rows(rows: list[dict], expected: dict[str, dict]) -> None:
    assert [r["id"] for r in rows] == list(expected)
    for row in rows:
        want = expected[row["id"]]
        assert row["input_ids"] == want["input_ids"]
        assert row["response_start"] == want["response_start"]
        assert row["positions"] == want["positions"]
        teacher: TeacherData = want["teacher"]
        assert np.array_equal(np.array(row["topk_ids"], dtype=np.int32), teacher.topk_ids)
        # float32 in the shard, float32 in parquet: bit-exact.
        got = np.array(row["topk_logprobs"], dtype=np.float32)
        assert np.array_equal(got, teacher.topk_logprobs)
        assert np.array_equal(np.array(row["next_logprob"], dtype=np.float32), teacher.next_logprob)
        # Row t predicts input_ids[positions[t] + 1]: every position has a next token.
        assert max(row["positions"]) + 1 < len(row["input_ids"])


def test_export_round_trips_through_hugging_face_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets  # imported here, after the offline switches it reads at import time

    run, expected = _run(tmp_path, 5)
    out = tmp_path / "kd"
    summary = export_kd(run, out, batch_rows=2, progress=False)
    assert (summary.rows, summary.ks, summary.skipped) == (5, {K}, [])
    path = out / OUT_NAME
    assert sorted(p.name for p in out.iterdir()) == [OUT_NAME]  # no temporary left
    # Streaming: one row group per batch of 2 records, never the whole run at once.
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 3
    meta = json.loads(parquet.metadata.metadata[METADATA_KEY])
    assert meta["k"] == [K]

    ds = datasets.load_dataset(
        "parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(ds) == 5
    assert ds.features["topk_ids"].feature.feature.dtype == "int32"
    assert ds.features["topk_logprobs"].feature.feature.dtype == "float32"
    _assert_rows(list(ds), expected)
    # The README's loading lines, as written there: one [T, K] array per record, the tokens
    # next_logprob scores, and the rows that predict response tokens.
    ds = ds.with_format("numpy")
    row = ds[0]
    want = expected["r0"]
    assert row["topk_ids"].shape == want["teacher"].topk_ids.shape
    targets = row["input_ids"][row["positions"] + 1]
    assert targets.tolist() == [want["input_ids"][p + 1] for p in want["positions"]]
    response = row["positions"] >= row["response_start"] - 1
    assert response.tolist() == [p + 1 >= want["response_start"] for p in want["positions"]]


def test_cli_skips_shards_without_teacher_data_and_reports_them(tmp_path, capsys):
    run, expected = _run(tmp_path, 2, without_teacher=1)
    out = tmp_path / "kd"
    rc = cli.main(["export-kd", str(run), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "skipped r2" in err and "no teacher data" in err
    assert "export-kd: 2 rows (K=4)" in err and "1 skipped" in err
    _assert_rows(pq.read_table(out / OUT_NAME).to_pylist(), expected)


def test_nothing_exportable_writes_nothing(tmp_path, capsys):
    assert cli.main(["export-kd", str(tmp_path), "--out", str(tmp_path / "kd")]) == 2
    assert "manifest.jsonl not found" in capsys.readouterr().err
    run, _ = _run(tmp_path, 0, without_teacher=2)
    with pytest.raises(ExportError, match="no record .* has teacher data"):
        export_kd(run, tmp_path / "kd", progress=False)
    assert list((tmp_path / "kd").iterdir()) == []


def test_record_flag_asks_for_teacher_logprobs_by_default():
    parser = cli.build_parser()
    base = ["record", "data.jsonl", "--server", "http://x", "--out", "o"]
    assert parser.parse_args(base).teacher_logprobs == 20
    assert parser.parse_args([*base, "--teacher-logprobs", "8"]).teacher_logprobs == 8
    assert parser.parse_args([*base, "--no-teacher-logprobs"]).teacher_logprobs is None
    spec = record.capture_spec_from_flags(teacher_logprobs=8)
    assert spec.teacher_logprobs == 8 and spec.to_dict()["teacher_logprobs"] == 8
    assert record.capture_spec_from_flags().teacher_logprobs is None


def test_record_with_a_k_the_server_refuses_writes_nothing(tmp_path):
    """K above the server's --max-logprobs: the sidecar's 400 names the field and the limit,
    record stops at the first answer (every record would get it) and leaves OUT as it was."""
    import httpx

    message = "capture.teacher_logprobs: from 1 to 20 (the server's --max-logprobs), got 21"

    def sidecar(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "vllm": "ready"})
        if request.url.path == "/shards":
            return httpx.Response(200, json={"shards": []})
        if request.url.path == "/generate_with_activations":
            error = {"field": "capture.teacher_logprobs", "message": message, "status": 400}
            return httpx.Response(400, json={"error": error})
        return httpx.Response(404)

    chosen = build_dataset()[:2]
    for r in chosen:
        r.response = "Turn left at the fountain."
    write_jsonl(chosen, tmp_path / "answers.jsonl")
    options = record.RecordOptions(
        mode="teacher-forced",
        spec=record.capture_spec_from_flags(teacher_logprobs=21),
        progress=False,
    )
    out = tmp_path / "run"
    with pytest.raises(record.FatalError, match=r"capture\.teacher_logprobs: from 1 to 20"):
        record.record(
            [tmp_path / "answers.jsonl"], ["http://sidecar:8000"], out, options,
            transport=httpx.MockTransport(sidecar),
        )  # fmt: skip
    assert not out.exists()


@pytest.mark.integration
def test_record_then_export_on_the_real_server(servers, tmp_path, capsys):
    """`actclient record --mode teacher-forced --teacher-logprobs 5` against the real CPU
    stack, then `export-kd`: every row is its shard's teacher data, and response_start is
    where the record's response begins."""
    import datasets

    server = servers.get("tiny-qwen3-tied")
    chosen = build_dataset()[:3]
    for i, r in enumerate(chosen):
        r.response = f"Walk to the square, then turn left at the {i + 2}nd fountain."
    write_jsonl(chosen, tmp_path / "answers.jsonl")
    out, kd = tmp_path / "run", tmp_path / "kd"
    args = ["record", str(tmp_path / "answers.jsonl"), "--server", server.url, "--out", str(out)]
    args += ["--api-key", server.api_key, "--mode", "teacher-forced", "--layers", "0"]
    args += ["--sites", "post_mlp", "--no-channel-stats", "--teacher-logprobs", "5"]
    assert cli.main([*args, "--no-progress"]) == 0, capsys.readouterr().err
    assert cli.main(["export-kd", str(out), "--out", str(kd), "--no-progress"]) == 0
    assert "export-kd: 3 rows (K=5)" in capsys.readouterr().err
    ds = datasets.load_dataset(
        "parquet", data_files=str(kd / OUT_NAME), split="train", cache_dir=str(tmp_path / "hf")
    )
    manifest = record.read_manifest(out / "manifest.jsonl")
    assert sorted(ds["id"]) == sorted(r.id for r in chosen)
    for row in ds:
        entry = manifest[row["id"]]
        shard = read_shard(out / entry["shard"])
        assert (
            row["input_ids"] == np.concatenate([shard.input_tokens, shard.output_tokens]).tolist()
        )
        assert row["response_start"] == entry["text_start"] < len(shard.input_tokens)
        assert row["positions"] == shard.positions.tolist()
        assert np.array_equal(np.array(row["topk_ids"], np.int32), shard.teacher.topk_ids)
        assert np.array_equal(
            np.array(row["topk_logprobs"], np.float32), shard.teacher.topk_logprobs
        )
        assert np.array_equal(np.array(row["next_logprob"], np.float32), shard.teacher.next_logprob)
        # The teacher scores the recorded text: its top-1 is a real distribution's mode.
        assert (shard.teacher.topk_logprobs[:, 0] >= shard.teacher.next_logprob - 1e-6).all()
