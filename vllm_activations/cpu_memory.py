"""Memory defaults for vLLM's CPU build that fit this machine and the model being served.

vLLM CPU reads `--gpu-memory-utilization` as the share of the NUMA node's memory its worker
may take (weights, runtime and KV cache together) and refuses to start when that much is not
free, so the GPU default (0.92) fails on any machine already running something; a share too
small for the weights, or a KV cache too small for one request of `max_model_len` tokens,
fails later. `plan_cpu_memory` sizes the share from the model (weights on disk, KV bytes per
token, the capture buffer) and the memory available now, lowers `--max-model-len` when even
one full-length request would not fit (and the user did not set it), and refuses with the
numbers when the weights alone do not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
# Python, torch and vLLM's own buffers in the worker beyond the weights (measured about
# 1.2 GiB for SmolLM2 on vLLM CPU 0.32; rounded up).
RUNTIME_BYTES = 2 * GiB
# Full-length requests the KV cache holds when memory allows.
KV_REQUESTS = 2
# At most this share of the memory available at launch: vLLM checks again when its worker
# starts, seconds later, and other processes may have grown by then.
AVAILABLE_SHARE = 0.8
MODEL_LEN_STEP = 256


@dataclass(frozen=True)
class Memory:
    total: int
    available: int


@dataclass(frozen=True)
class CpuMemoryPlan:
    utilization: float  # --gpu-memory-utilization
    max_model_len: int | None  # a lowered --max-model-len, or None to keep the model's own
    weights: int
    kv_per_token: int
    kv_tokens: int  # tokens the planned KV cache holds
    runtime: int
    memory: Memory

    def flags(self) -> list[str]:
        out = ["--gpu-memory-utilization", f"{self.utilization:.4f}"]
        if self.max_model_len is not None:
            out += ["--max-model-len", str(self.max_model_len)]
        return out

    def describe(self) -> str:
        used = self.utilization * self.memory.total
        lowered = (
            f"; --max-model-len {self.max_model_len} (a full-length request would not fit)"
            if self.max_model_len is not None
            else ""
        )
        return (
            f"CPU build: --gpu-memory-utilization {self.utilization:.4f} = {used / GiB:.2f} of "
            f"{self.memory.total / GiB:.1f} GiB ({self.memory.available / GiB:.1f} GiB "
            f"available): weights {self.weights / GiB:.2f} GiB, runtime and capture buffer "
            f"{self.runtime / GiB:.2f} GiB, KV cache for {self.kv_tokens:,} tokens"
            f"{lowered}"
        )


class DoesNotFit(SystemExit):
    """The model cannot be served in the memory this machine has free."""


def node_memory() -> Memory:
    """Total and available memory as vLLM's CPU worker counts them (its NUMA node, clamped to
    a container's cgroup limit), else the machine's."""
    try:
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        info = get_memory_node_info(0)
        return Memory(int(info.total_memory), int(info.available_memory))
    except Exception:  # no vLLM here, or a platform it cannot read: the machine's numbers
        pass
    try:
        import psutil  # comes with vllm

        vm = psutil.virtual_memory()
        return Memory(int(vm.total), int(vm.available))
    except ImportError:  # a `--dry-run` where neither is installed
        pass
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        raise SystemExit(
            "vllm-activations: cannot read this machine's memory; pass --gpu-memory-utilization"
        ) from None
    kib = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)}
    return Memory(kib["MemTotal"], kib.get("MemAvailable", kib["MemFree"]))


def weights_bytes(model_dir: Path | None, config: dict, width: int) -> int:
    """Bytes of the weights in memory at `width` bytes per element: from the checkpoint's
    files, or estimated from the config when they are not on disk yet (a hub id that vLLM
    will download)."""
    if model_dir is not None:
        files = [*model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")]
        if files:
            stored = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
            stored_width = 4 if stored in ("float32", "float") else 2
            # A 16-bit checkpoint served in float32 takes twice its size, and the other way.
            return sum(f.stat().st_size for f in files) * width // stored_width
    hidden, layers, heads, kv_heads, head_dim = _shape(config)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 0)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return (layers * (attention + 3 * hidden * inter) + embeddings) * width


def kv_bytes_per_token(config: dict, width: int) -> int:
    """K and V of every layer for one token."""
    _, layers, _, kv_heads, head_dim = _shape(config)
    return 2 * layers * kv_heads * head_dim * width


def _shape(config: dict) -> tuple[int, int, int, int, int]:
    """(hidden size, layers, query heads, KV heads, head dim) of a decoder config."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return hidden, layers, heads, kv_heads, int(config.get("head_dim") or hidden // heads)


def plan_cpu_memory(
    config: dict,
    model_dir: Path | None,
    *,
    width: int,
    capture_buffer: int,
    max_model_len: int | None = None,
    memory: Memory | None = None,
) -> CpuMemoryPlan:
    """The share and, if needed, a lower --max-model-len for `config`'s model on this node.

    `width`: bytes per element of the weights and KV cache (2, or 4 for float32).
    `max_model_len`: the user's --max-model-len (kept as given), else None (the model's).
    """
    memory = memory or node_memory()
    weights = weights_bytes(model_dir, config, width)
    per_token = kv_bytes_per_token(config, width)
    runtime = RUNTIME_BYTES + capture_buffer
    room = int(AVAILABLE_SHARE * memory.available)
    fixed = weights + runtime
    model_len = max_model_len or int(config.get("max_position_embeddings") or 4096)
    lowered = None
    if fixed + per_token * model_len > room:
        fits = (room - fixed) // per_token // MODEL_LEN_STEP * MODEL_LEN_STEP
        if max_model_len is not None or fits < MODEL_LEN_STEP:
            need = fixed + per_token * (max_model_len or MODEL_LEN_STEP)
            raise DoesNotFit(
                f"vllm-activations: the model needs about {need / GiB:.1f} GiB on this CPU "
                f"machine (weights {weights / GiB:.1f} GiB, runtime {runtime / GiB:.1f} GiB, "
                f"KV cache for {max_model_len or MODEL_LEN_STEP} tokens), and "
                f"{memory.available / GiB:.1f} of {memory.total / GiB:.1f} GiB are available: "
                "free memory, choose a smaller model, lower --max-model-len, or pass "
                "--gpu-memory-utilization yourself"
            )
        lowered = model_len = fits
    kv_tokens = min(KV_REQUESTS * model_len, (room - fixed) // per_token)
    need = fixed + per_token * kv_tokens
    # Four decimals, rounded up: the worker gets the bytes planned (vLLM takes any float).
    utilization = math.ceil(need / memory.total * 10**4) / 10**4
    return CpuMemoryPlan(
        utilization=utilization,
        max_model_len=lowered,
        weights=weights,
        kv_per_token=per_token,
        kv_tokens=kv_tokens,
        runtime=runtime,
        memory=memory,
    )


def local_model_dir(model: str, revision: str | None) -> Path | None:
    """The model's folder: itself, or a hub id's snapshot already in the local cache."""
    if Path(model, "config.json").is_file():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not downloaded yet: vLLM will
        return None
