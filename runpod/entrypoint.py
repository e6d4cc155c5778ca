"""Container entrypoint: turn the pod's environment variables into `vllm-activations serve`.

RunPod configures a pod through environment variables (the template's `env`, secrets included),
so this script is the one place that maps them to command-line arguments. `build_argv` is a pure
function of the environment, so tests check every variable without starting anything; `main`
validates, then replaces itself (os.execvp) with `vllm-activations serve`, which stays PID 1 and
forwards SIGTERM to vLLM. Standard library only: it imports without vllm, torch or the package.

With arguments (a RunPod "container start command" or `docker run IMAGE selftest ...`) it runs
`vllm-activations ARGS...` instead of `serve`, with the same HF_HOME.

The API key never goes on the command line (other processes can read argv): `serve` reads it
from VLLM_ACTIVATIONS_API_KEY itself. This script only checks that it is there.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping

PROGRAM = "vllm-activations"

# Defaults for a RunPod pod: the volume disk is mounted at /workspace and survives restarts.
DEFAULT_MODEL = "Qwen/Qwen3-32B-FP8"
DEFAULT_HOST = "0.0.0.0"  # RunPod's HTTP proxy reaches the pod on its external interface
DEFAULT_PORT = 8000
DEFAULT_SHARD_DIR = "/workspace/shards"
DEFAULT_HF_HOME = "/workspace/hf"

API_KEY_VAR = "VLLM_ACTIVATIONS_API_KEY"
API_KEY_FILE_VAR = "VLLM_ACTIVATIONS_API_KEY_FILE"
API_KEY_SECRET = "vllm_activations_api_key"  # the RunPod secret name the template references

# Positive integers passed to `serve` (vLLM flags are forwarded by `serve` unchanged).
INT_FLAGS: dict[str, str] = {
    "TENSOR_PARALLEL_SIZE": "--tensor-parallel-size",
    "MAX_MODEL_LEN": "--max-model-len",
    "MAX_NUM_BATCHED_TOKENS": "--max-num-batched-tokens",
    "MAX_PROMPT_TOKENS": "--max-prompt-tokens",
    "MAX_TOKENS_LIMIT": "--max-tokens-limit",
    "MAX_CONCURRENT_CAPTURES": "--max-concurrent-captures",
}
# Byte counts: a plain integer or a number with a unit (e.g. 20GiB, 500MB).
SIZE_FLAGS: dict[str, str] = {
    "MAX_CAPTURE_BYTES": "--max-capture-bytes",
    "MIN_FREE_DISK_BYTES": "--min-free-disk-bytes",
}

# Every variable this script reads (the guide and the template are checked against it).
VARIABLES: tuple[str, ...] = (
    "MODEL",
    "MODEL_REVISION",
    "HOST",
    "PORT",
    "SHARD_DIR",
    "HF_HOME",
    API_KEY_VAR,
    API_KEY_FILE_VAR,
    "INSECURE_NO_AUTH",
    *INT_FLAGS,
    *SIZE_FLAGS,
    "GPU_MEMORY_UTILIZATION",
    "EXTRA_VLLM_ARGS",
)

# Flags this script (or `serve`) sets: in EXTRA_VLLM_ARGS they would silently override the
# value above or break capture, so they are refused with the variable to use instead.
MANAGED_FLAGS: dict[str, str] = {
    "--host": "set HOST",
    "--port": "set PORT",
    "--shard-dir": "set SHARD_DIR",
    "--revision": "set MODEL_REVISION",
    "--model": "set MODEL",
    "--api-key": f"set {API_KEY_VAR} (the sidecar checks keys; vLLM listens on loopback only)",
    "--api-key-file": f"set {API_KEY_FILE_VAR}",
    "--insecure-no-auth": "set INSECURE_NO_AUTH=1",
    "--hf-overrides": "`vllm-activations serve` sets it to select the capture architecture",
    "--kv-transfer-config": "`vllm-activations serve` sets it to install the capture connector",
    "--no-enable-chunked-prefill": "capture needs chunked prefill: without it vLLM raises "
    "max_num_batched_tokens to max_model_len and the capture buffer grows to match",
    "--enable-dbo": "capture does not support dual-batch overlap",
    "--speculative-config": "capture does not support speculative decoding",
    **{flag: f"set {var}" for var, flag in {**INT_FLAGS, **SIZE_FLAGS}.items()},
    "-tp": "set TENSOR_PARALLEL_SIZE",
    "--gpu-memory-utilization": "set GPU_MEMORY_UTILIZATION",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# A RunPod secret reference left unresolved (the secret does not exist).
_SECRET_REF_RE = re.compile(r"\{\{\s*RUNPOD_SECRET_(\w+)\s*\}\}")


class EnvError(ValueError):
    """An environment variable with a bad value; the message names the variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def _get(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value of `name`, or None when unset or empty."""
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def parse_bool(env: Mapping[str, str], name: str) -> bool:
    value = (env.get(name) or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise EnvError(name, f"{env[name]!r} is not a boolean; use 1/true/yes or 0/false/no")


def parse_positive_int(name: str, value: str, maximum: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise EnvError(name, f"{value!r} is not an integer") from None
    if number < 1:
        raise EnvError(name, f"must be at least 1, got {number}")
    if maximum is not None and number > maximum:
        raise EnvError(name, f"must be at most {maximum}, got {number}")
    return number


def parse_size(name: str, value: str) -> int:
    """Bytes from `1073741824`, `20GiB`, `500MB` (decimal units) or `1.5TiB`."""
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise EnvError(
            name,
            f"{value!r} is not a byte count; use an integer or a number with a unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 20GiB",
        )
    number = int(float(match.group(1)) * _UNITS[unit])
    if number < 1:
        raise EnvError(name, f"must be at least 1 byte, got {value!r}")
    return number


def parse_fraction(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise EnvError(name, f"{value!r} is not a number") from None
    if not 0.0 < number <= 1.0:
        raise EnvError(name, f"must be a fraction in (0, 1], got {value}")
    return number


def check_secret_references(env: Mapping[str, str]) -> None:
    """Fail on a `{{ RUNPOD_SECRET_x }}` value: RunPod leaves it as is when x does not exist."""
    for name, value in env.items():
        match = _SECRET_REF_RE.search(value or "")
        if match:
            raise EnvError(
                name,
                f"holds the unresolved reference {match.group(0)!r}: create a RunPod secret "
                f"named {match.group(1)!r} (console: Secrets), then restart the pod",
            )


def check_extra_args(extra: list[str]) -> None:
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise EnvError("EXTRA_VLLM_ARGS", f"{flag} is not allowed here: {MANAGED_FLAGS[flag]}")


def build_argv(env: Mapping[str, str]) -> list[str]:
    """The `vllm-activations serve ...` argument list for this environment.

    Raises EnvError (naming the variable) on a bad or missing value.
    """
    check_secret_references(env)

    model = _get(env, "MODEL") or DEFAULT_MODEL
    if any(c.isspace() for c in model):
        raise EnvError("MODEL", f"{model!r} contains whitespace; give one Hugging Face id or path")
    host = _get(env, "HOST") or DEFAULT_HOST
    port = parse_positive_int("PORT", _get(env, "PORT") or str(DEFAULT_PORT), maximum=65535)
    shard_dir = _get(env, "SHARD_DIR") or DEFAULT_SHARD_DIR
    if not shard_dir.startswith("/"):
        raise EnvError("SHARD_DIR", f"{shard_dir!r} is not an absolute path (use /workspace/...)")

    argv = [PROGRAM, "serve", model, "--host", host, "--port", str(port), "--shard-dir", shard_dir]
    revision = _get(env, "MODEL_REVISION")
    if revision:
        argv += ["--revision", revision]

    insecure = parse_bool(env, "INSECURE_NO_AUTH")
    key_file = _get(env, API_KEY_FILE_VAR)
    if key_file:
        if not os.path.isfile(key_file):
            raise EnvError(API_KEY_FILE_VAR, f"{key_file!r} is not a file")
        argv += ["--api-key-file", key_file]
    if insecure:
        argv.append("--insecure-no-auth")
    elif not key_file and not _get(env, API_KEY_VAR):
        raise EnvError(
            API_KEY_VAR,
            "is not set, and the sidecar refuses to serve a public port without a key. Create a "
            f"RunPod secret named {API_KEY_SECRET!r} and set {API_KEY_VAR} to "
            f"'{{{{ RUNPOD_SECRET_{API_KEY_SECRET} }}}}' (runpod/template.json does), or set "
            f"{API_KEY_FILE_VAR}. INSECURE_NO_AUTH=1 turns auth off: anyone who knows the pod "
            "URL can then use the GPU and read the shards.",
        )

    for name, flag in INT_FLAGS.items():
        value = _get(env, name)
        if value is not None:
            argv += [flag, str(parse_positive_int(name, value))]
    for name, flag in SIZE_FLAGS.items():
        value = _get(env, name)
        if value is not None:
            argv += [flag, str(parse_size(name, value))]
    gpu_fraction = _get(env, "GPU_MEMORY_UTILIZATION")
    if gpu_fraction is not None:
        argv += [
            "--gpu-memory-utilization",
            repr(parse_fraction("GPU_MEMORY_UTILIZATION", gpu_fraction)),
        ]

    try:
        extra = shlex.split(env.get("EXTRA_VLLM_ARGS") or "")
    except ValueError as exc:
        raise EnvError("EXTRA_VLLM_ARGS", f"cannot be split like a shell line: {exc}") from None
    check_extra_args(extra)
    return argv + extra


def build_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for the exec'd command: HF_HOME on the volume unless set."""
    out = dict(env)
    if not _get(out, "HF_HOME"):
        out["HF_HOME"] = DEFAULT_HF_HOME
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    env = build_env(os.environ)
    try:
        check_secret_references(env)
        command = [PROGRAM, *args] if args else build_argv(env)
    except EnvError as exc:
        print(f"entrypoint: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"entrypoint: exec {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"entrypoint: cannot run {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
