"""The `vllm.general_plugins` entry point: register the capture architectures.

vLLM runs `register()` in every process (API server, engine core, each worker), so it must be
idempotent and cheap: the lazy "module:Class" form keeps vllm's model code (and CUDA) out of
processes that never build a model. Pure-Python names live here so the launcher can use them
without importing vllm.
"""

from __future__ import annotations

# Stock architecture -> capture architecture registered by this plugin.
CAPTURE_ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "CaptureQwen3ForCausalLM",
    "Qwen2ForCausalLM": "CaptureQwen2ForCausalLM",
    "LlamaForCausalLM": "CaptureLlamaForCausalLM",
}
CONNECTOR_NAME = "ActivationCaptureConnector"
CONNECTOR_MODULE = "vllm_activations.connector"
# How many requests may record channel statistics at once (device slots; 0 turns them off).
CHANNEL_STATS_SLOTS_ENV = "VLLM_ACTIVATIONS_CHANNEL_STATS_SLOTS"
DEFAULT_CHANNEL_STATS_SLOTS = 16
# How many requests may accumulate summaries at once (vllm_activations/summary.py).
SUMMARY_SLOTS_ENV = "VLLM_ACTIVATIONS_SUMMARY_SLOTS"
DEFAULT_SUMMARY_SLOTS = 8
# How many `positions: "last"` requests keep their two newest rows on the device instead of
# copying every step's row to the host (connector/worker.py); more run the host way.
LAST_TOKEN_SLOTS_ENV = "VLLM_ACTIVATIONS_LAST_TOKEN_SLOTS"
DEFAULT_LAST_TOKEN_SLOTS = 128
# How many shard writer processes run at once (connector/writer.py): the shards of requests
# that finish together are written, compressed and fsynced side by side.
SHARD_WRITERS_ENV = "VLLM_ACTIVATIONS_SHARD_WRITERS"
DEFAULT_SHARD_WRITERS = 2
# The launcher's settings that shape compiled graphs go into vLLM's `additional_config` under
# this key: vLLM hashes it into the compile-cache key, so changing them never reuses a graph
# compiled for other shapes.
PLUGIN_CONFIG_KEY = "vllm_activations"


def register() -> None:
    """Register the capture model classes under new names (plain serving is untouched)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for capture_arch in CAPTURE_ARCHITECTURES.values():
        if capture_arch not in supported:
            ModelRegistry.register_model(capture_arch, f"vllm_activations.models:{capture_arch}")
