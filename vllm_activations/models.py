"""Capture variants of vLLM's Qwen3, Qwen2 and Llama causal LMs.

Registered by the plugin under NEW architecture names (the registry silently overwrites an
existing name), selected per deployment with --hf-overrides, so plain serving is untouched.
Each is the stock class plus `install_capture` at the end of __init__.
"""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from vllm_activations.capture import install_capture


class CaptureQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_capture(self.model, vllm_config)


class CaptureQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_capture(self.model, vllm_config)


class CaptureLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        install_capture(self.model, vllm_config)
