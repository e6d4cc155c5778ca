"""`vllm-activations serve`: the tested configuration by default, opt-in GPU defaults, and
settings that shape compiled graphs in vLLM's compile-cache key (no engine started)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from vllm_activations import cli


def dry_run(capsys, model, *args: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(environment, vLLM argv, comment lines) that `serve --dry-run` prints."""
    assert cli.main(["serve", str(model), "--dry-run", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line.split(" ")[0])
    commands = [line for line in lines if " -m vllm" in line]
    assert len(commands) == 1, lines
    return env, shlex.split(commands[0]), [line for line in lines if line.startswith("#")]


def test_default_is_the_tested_configuration(capsys, embedded_models):
    env, argv, notes = dry_run(capsys, embedded_models["smollm2"])
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "--no-async-scheduling" in argv and "--async-scheduling" not in argv
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "2048"
    assert any("the tested configuration" in n for n in notes)
    # SmolLM2: 2048 rows x 2 sites x 30 layers x 576 x 2 bytes
    assert any(f"{2048 * 2 * 30 * 576 * 2 / 2**30:.2f} GiB" in n for n in notes), notes
    config = json.loads(argv[argv.index("--additional-config") + 1])
    assert config["vllm_activations"]["channel_stats_slots"] == 16


def test_dry_run_prints_every_variable_it_changes(capsys, embedded_models, monkeypatch):
    """A VLLM_PLUGINS that leaves our plugin out is extended, and the dry run says so."""
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    env, _, notes = dry_run(capsys, embedded_models["smollm2"])
    assert env["VLLM_PLUGINS"] == f"other,{cli.PLUGIN_NAME}"
    assert any("--vllm-port" in n for n in notes)
    monkeypatch.delenv("VLLM_PLUGINS")
    env, _, notes = dry_run(capsys, embedded_models["smollm2"], "--vllm-port", "8123")
    assert "VLLM_PLUGINS" not in env and not any("--vllm-port" in n for n in notes)


def test_opt_in_flags_select_vllms_gpu_defaults(capsys, embedded_models):
    env, argv, notes = dry_run(
        capsys, embedded_models["smollm2"], "--model-runner-v2", "--async-scheduling",
        "--max-num-batched-tokens", "8192",
    )  # fmt: skip
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert "--async-scheduling" in argv and "--no-async-scheduling" not in argv
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "8192"
    assert any("selftest" in n for n in notes)


def test_user_additional_config_is_kept_and_slots_are_keyed(capsys, embedded_models):
    _, argv, _ = dry_run(
        capsys, embedded_models["smollm2"], "--channel-stats-slots", "3",
        "--additional-config", '{"mine": 1}',
    )  # fmt: skip
    assert argv.count("--additional-config") == 1
    config = json.loads(argv[argv.index("--additional-config") + 1])
    assert config["mine"] == 1 and config["vllm_activations"]["channel_stats_slots"] == 3


def test_cpu_build_gets_a_memory_share_that_fits(capsys, embedded_models):
    _, argv, notes = dry_run(capsys, embedded_models["smollm2"])
    share = float(argv[argv.index("--gpu-memory-utilization") + 1])
    assert 0.05 <= share <= 0.9
    _, argv, _ = dry_run(capsys, embedded_models["smollm2"], "--gpu-memory-utilization", "0.2")
    assert argv.count("--gpu-memory-utilization") == 1
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.2"


def test_missing_server_extra_names_it(monkeypatch, embedded_models, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(SystemExit, match=r"uvicorn is missing.*vllm-activations\[server\]"):
        cli.main(["serve", str(embedded_models["smollm2"]), "--shard-dir", str(tmp_path)])


def test_compile_cache_key_changes_with_the_plugin_settings(embedded_models):
    """vLLM hashes additional_config into its compile-cache key: two slot counts (different
    statistics buffer shapes in the graph) never share a compiled graph."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    def key(slots: int) -> str:
        return (
            EngineArgs(
                model=str(embedded_models["tiny-qwen3-tied"]),
                max_model_len=256,
                additional_config={"vllm_activations": {"channel_stats_slots": slots}},
            )
            .create_engine_config()
            .compute_hash()
        )

    assert key(16) == key(16)
    assert key(16) != key(0)
