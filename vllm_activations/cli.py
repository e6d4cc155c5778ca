"""The `vllm-activations` command: start vLLM with capture configured, build embedded models.

`serve` runs `vllm serve` in a child process with the plugin's capture architecture selected
through --hf-overrides and the capture KV connector through --kv-transfer-config, so nothing
has to be typed by hand; any argument it does not know is passed to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from vllm_activations import __version__
from vllm_activations.plugin import CAPTURE_ARCHITECTURES, CONNECTOR_MODULE, CONNECTOR_NAME

PLUGIN_NAME = "vllm_activations"


def model_architecture(model: str, revision: str | None = None) -> str:
    """The stock architecture named in a model's config.json (local dir or hub id)."""
    config_path = Path(model) / "config.json"
    if config_path.is_file():
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    else:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(model, revision=revision).architectures or []
    for arch in architectures:
        if arch in CAPTURE_ARCHITECTURES or arch in CAPTURE_ARCHITECTURES.values():
            return arch
    raise SystemExit(
        f"vllm-activations: {model} has architectures {architectures}; capture supports "
        f"{sorted(CAPTURE_ARCHITECTURES)}"
    )


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
        "vllm.entrypoints.cli.main",
        "serve",
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


def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    shard_dir = Path(args.shard_dir).resolve()
    shard_dir.mkdir(parents=True, exist_ok=True)
    cmd = vllm_serve_command(
        args.model,
        host=args.host,
        port=args.port,
        shard_dir=shard_dir,
        max_num_batched_tokens=args.max_num_batched_tokens,
        revision=args.revision,
        extra=extra,
    )
    print(f"vllm-activations: shards go to {shard_dir}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=plugin_env())

    def forward(signum, _frame):
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc.wait()


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
        help="start vLLM with capture configured; unknown arguments go to `vllm serve`",
        description="Start vLLM with the capture architecture and connector configured. "
        "Arguments not listed here are passed to `vllm serve` unchanged.",
    )
    serve.add_argument("model", help="model directory or Hugging Face id")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--shard-dir", default="shards", help="where shards are written")
    serve.add_argument("--revision", default=None)
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per engine step; also the rows of the capture buffer "
        "(2 x layers x hidden x dtype bytes each)",
    )
    serve.set_defaults(func=_serve)
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
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
