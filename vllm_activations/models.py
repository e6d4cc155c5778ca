"""Capture variants of vLLM's Qwen3, Qwen2 and Llama causal LMs.

Registered by the plugin under NEW architecture names (the registry silently overwrites an
existing name), selected per deployment with --hf-overrides, so plain serving is untouched.
Each is the stock class plus `install_capture` at the end of __init__, and a forward that
first records the step's token ids for summary capture (a custom op, so it is part of a
compiled or CUDA-graph forward like the rest).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from vllm_activations.capture import capturing_layer_type, install_capture


class _RecordsTokens:
    def forward(self, input_ids, positions, *args, **kwargs):  # type: ignore[no-untyped-def]
        tokens = self.model.summary_tokens
        if tokens is not None and input_ids is not None:
            torch.ops.vllm_activations.record_tokens(input_ids, tokens)
        return super().forward(input_ids, positions, *args, **kwargs)


class CaptureQwen3ForCausalLM(_RecordsTokens, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_capture(self.model, vllm_config)


class CaptureQwen2ForCausalLM(_RecordsTokens, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_capture(self.model, vllm_config)


class CaptureLlamaForCausalLM(_RecordsTokens, LlamaForCausalLM):
    # Llama's construction hook (`layer_type`) builds capturing layers directly. Qwen3 and
    # Qwen2 build their models by name inside __init__ (Qwen3Model.decoder_layer_type and
    # Qwen2Model(decoder_layer_type=...) are not reachable from the causal LM without copying
    # its __init__), so install_capture turns their built layers into capturing ones.
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        kwargs.setdefault("layer_type", capturing_layer_type(LlamaDecoderLayer))
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        install_capture(self.model, vllm_config)
