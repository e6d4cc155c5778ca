"""The analyzer's process pool, bad-shard policy, output-directory hygiene and the float32
path's precision near cos = 1, on the planted shards of test_analysis."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_analysis import model_dir, shards  # noqa: F401 - module fixtures

from actclient.analysis import cli
from actclient.analysis.analyze import AnalysisError, analyze
from actclient.analysis.formulas import unit_angle
from actclient.analysis.stats import AnalysisAccumulator
from vllm_activations.contract.shard import ShardError, write_shard

ARRAYS = ("similarity_all", "boundary_angle_content", "channel_variance_all", "massive_count_all")


def _load(out: Path, name: str) -> np.ndarray:
    return np.load(out / "arrays" / f"{name}.npy")


def test_jobs_equal_one_process(shards: Path, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    one = analyze(shards, tmp_path / "one", model_dir, pictures=False, progress=False, jobs=1)
    two = analyze(shards, tmp_path / "two", model_dir, pictures=False, progress=False, jobs=2)
    assert one["tokens"] == two["tokens"] and two["num_shards"] == 5
    assert one["redundant_layers"] == two["redundant_layers"]
    assert (
        one["by_tokens"]["all"]["massive_activations"]
        == (two["by_tokens"]["all"]["massive_activations"])
    )
    for name in ARRAYS:
        np.testing.assert_allclose(
            _load(tmp_path / "two", name), _load(tmp_path / "one", name), rtol=1e-12, atol=1e-12
        )


def _with_bad_shards(shards: Path, root: Path) -> Path:  # noqa: F811
    mixed = root / "mixed"
    shutil.copytree(shards, mixed)
    (mixed / "req-900.h5").write_bytes(b"not an hdf5 file")
    good = (mixed / "req-000.h5").read_bytes()
    (mixed / "req-901.h5").write_bytes(good[: len(good) // 2])  # truncated mid-file
    return mixed


@pytest.mark.parametrize("jobs", [1, 2])
def test_bad_shard_stops_unless_skipped(
    shards: Path,  # noqa: F811
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    jobs: int,
) -> None:
    mixed = _with_bad_shards(shards, tmp_path)
    with pytest.raises(ShardError, match="req-90"):
        analyze(mixed, tmp_path / "strict", model_dir, pictures=False, progress=False, jobs=jobs)
    assert not (tmp_path / "strict").exists()
    analysis = analyze(
        mixed,
        tmp_path / "out",
        model_dir,
        pictures=False,
        progress=False,
        jobs=jobs,
        skip_bad_shards=True,
    )
    assert analysis["num_shards"] == 5
    assert [s["shard"] for s in analysis["skipped_shards"]] == ["req-900.h5", "req-901.h5"]
    assert all(s["error"] for s in analysis["skipped_shards"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Skipped shards: 2" in report and "req-901.h5" in report
    clean = analyze(shards, tmp_path / "clean", model_dir, pictures=False, progress=False, jobs=1)
    assert analysis["tokens"] == clean["tokens"]
    np.testing.assert_allclose(
        _load(tmp_path / "out", "similarity_all"), _load(tmp_path / "clean", "similarity_all")
    )


def test_out_dir_refused_unless_force_then_nothing_stale(
    shards: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "analysis"
    analyze(shards, out, None, pictures=False, progress=False, jobs=1)
    stale = out / "similarity_all.png"
    stale.write_bytes(b"picture of an earlier run")
    (out / "arrays" / "old_array.npy").write_bytes(b"x")
    before = (out / "analysis.json").read_text()
    with pytest.raises(AnalysisError, match="--force"):
        analyze(shards, out, None, pictures=False, progress=False, jobs=1)
    assert (out / "analysis.json").read_text() == before and stale.exists()
    analyze(shards, out, None, pictures=False, progress=False, jobs=1, force=True)
    assert not stale.exists() and not (out / "arrays" / "old_array.npy").exists()
    assert (out / "analysis.json").is_file() and (out / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]  # no temporaries left
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AnalysisError, match="no analysis.json"):
        analyze(shards, foreign, None, pictures=False, progress=False, jobs=1, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_float32_angles_keep_precision_near_cos_one(tmp_path: Path) -> None:
    """Boundaries 1e-6 rad apart: the float32 path must not lose them to arccos rounding."""
    rng = np.random.default_rng(7)
    layers, tokens, hidden = 3, 5, 256
    base = rng.normal(size=(tokens, hidden))
    base[:, 11] += 3000.0  # a massive channel on top, as on sink tokens
    turn = rng.normal(size=(tokens, hidden))
    turn -= (turn * base).sum(1, keepdims=True) / (base * base).sum(1, keepdims=True) * base
    turn /= np.linalg.norm(turn, axis=1, keepdims=True)
    mlp = np.empty((layers, tokens, hidden), np.float32)
    for layer, angle in enumerate((0.0, 1e-6, 3e-2)):
        norm = np.linalg.norm(base, axis=1, keepdims=True)
        mlp[layer] = np.cos(angle) * base + np.sin(angle) * norm * turn
    write_shard(
        tmp_path / "near.h5",
        input_tokens=np.arange(tokens),
        output_tokens=[1],
        positions=np.arange(tokens),
        layers=np.arange(layers),
        layer_outputs={"post_mlp": mlp},
        dtype="float32",
    )
    acc = AnalysisAccumulator()
    acc.add_shard(tmp_path / "near.h5")
    got = acc.populations["all"].mean_angle()
    x = mlp.astype(np.float64)
    unit = x / np.linalg.norm(x, axis=2, keepdims=True)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        want = unit_angle(unit[i], unit[j]).mean()
        assert got[i, j] == pytest.approx(want, rel=1e-6)
    assert got[0, 1] == pytest.approx(1e-6, rel=1e-3)  # what float32 storage kept


def test_cli_jobs_force_and_skip_flags(shards: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    parser = argparse.ArgumentParser(prog="actclient")
    cli.register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", str(shards), "--out", str(tmp_path / "a"), "--jobs", "0"])
    assert "--jobs takes a positive number" in capsys.readouterr().err
    out = tmp_path / "a"
    run = ["analyze", str(shards), "-o", str(out), "--no-pictures", "--no-progress", "--jobs", "1"]
    args = parser.parse_args(run)
    assert args.func(args) == 0
    args = parser.parse_args(run)
    assert args.func(args) == 2
    assert "pass --force" in capsys.readouterr().err
    mixed = _with_bad_shards(shards, tmp_path)
    args = parser.parse_args([*run, "--force", "--skip-bad-shards"])
    args.shards_dir = str(mixed)
    assert args.func(args) == 0
    assert "skipped 2 bad shards" in capsys.readouterr().err


def _in_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run `python -m actclient ARGV` with a pseudo-terminal as its stdout and stderr."""
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "actclient", *argv], stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(120), b"".join(chunks).decode(errors="replace")


def test_analyze_draws_a_bar_on_a_terminal_unless_no_progress(shards: Path, tmp_path: Path):  # noqa: F811
    run = ["analyze", str(shards), "--no-pictures", "--jobs", "1"]
    code, seen = _in_a_terminal([*run, "-o", str(tmp_path / "a")])
    assert code == 0 and "analyze [" in seen and "5/5" in seen, seen
    code, seen = _in_a_terminal([*run, "-o", str(tmp_path / "b"), "--no-progress"])
    assert code == 0 and "analyze [" not in seen and "report at" in seen, seen
