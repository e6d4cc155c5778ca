"""Model side of capture: a custom op that copies each decoder layer's residual stream into a
preallocated, fixed-address buffer, and capture variants of vLLM's Qwen3/Qwen2/Llama models.

Why a custom op: vLLM compiles the model with torch.compile (fullgraph) and, on GPU, replays it
as CUDA graphs, so Python forward hooks silently stop firing. An op registered with
`direct_register_custom_op(mutates_args=["buffer"])` is opaque to Inductor, runs in program
order and is recorded into graphs like any kernel. It copies right after a layer returns,
before the next layer's fused add+RMSNorm (in place on GPU) can overwrite `h` and `residual`.

Buffer layout: [max_num_batched_tokens, 2 * num_layers, hidden], token-major, model dtype.
Column 2*l holds layer l's post-attention residual; column 2*l+1 its post-MLP residual
(`h + residual`, the layer's output). Row i is the i-th token of the current forward batch;
the KV connector (connector.py) maps rows to requests and positions after each forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.library import Library
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_activations.residual_copy import copy_residuals, copy_residuals_fake

_LIB = Library("vllm_activations", "FRAGMENT")


direct_register_custom_op(
    op_name="capture_residuals",
    op_func=copy_residuals,
    mutates_args=["buffer"],
    fake_impl=copy_residuals_fake,
    target_lib=_LIB,
)


@dataclass
class CaptureState:
    """What the worker-side connector needs to read the buffer of this process's model."""

    buffer: torch.Tensor
    num_layers: int
    hidden_size: int


_STATE: CaptureState | None = None


def capture_state() -> CaptureState:
    """The capture buffer of the model loaded in this process."""
    if _STATE is None:
        raise RuntimeError(
            "vllm-activations: the served model has no capture buffer. Load it with a capture "
            "architecture (`vllm-activations serve MODEL`, or vllm serve with "
            '--hf-overrides \'{"architectures": ["CaptureQwen3ForCausalLM"]}\').'
        )
    return _STATE


class CapturingDecoderLayer(nn.Module):
    """Mixin for a decoder layer: after the layer returns, copy its residuals into the buffer."""

    capture_slot: int

    def forward(self, positions, hidden_states, residual, *args, **kwargs):  # type: ignore[override]
        hidden_states, residual = super().forward(
            positions, hidden_states, residual, *args, **kwargs
        )
        torch.ops.vllm_activations.capture_residuals(
            hidden_states, residual, self.capture_buffer, self.capture_slot
        )
        return hidden_states, residual


_LAYER_CLASSES: dict[type, type] = {}


def _capturing_class(base: type) -> type:
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"Capturing{base.__name__}", (CapturingDecoderLayer, base), {})
    return _LAYER_CLASSES[base]


def install_capture(model: nn.Module, vllm_config) -> CaptureState:
    """Allocate the buffer and turn every decoder layer of `model` into a capturing layer.

    Called from the model's __init__, so vLLM's memory profiling counts the buffer and the
    layers are capturing before torch.compile traces them. Parameter names are unchanged
    (the layer's class changes, not its place in the module tree), so weights load as usual.
    """
    global _STATE
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("vllm-activations: pipeline parallelism is not supported; use TP")
    hf_config = vllm_config.model_config.hf_config
    num_layers = hf_config.num_hidden_layers
    hidden = hf_config.hidden_size
    rows = vllm_config.scheduler_config.max_num_batched_tokens
    buffer = torch.zeros(rows, 2 * num_layers, hidden, dtype=vllm_config.model_config.dtype)
    layers = model.layers
    if len(layers) != num_layers:
        raise ValueError(
            f"vllm-activations: expected {num_layers} decoder layers in model.layers, "
            f"found {len(layers)}"
        )
    for index, layer in enumerate(layers):
        if not hasattr(layer, "post_attention_layernorm"):
            raise TypeError(
                f"vllm-activations: layer {index} ({type(layer).__name__}) is not a "
                "pre-norm decoder layer with post_attention_layernorm; supported: Qwen3, "
                "Qwen2, Llama"
            )
        layer.__class__ = _capturing_class(type(layer))
        layer.capture_slot = 2 * index
        layer.register_buffer("capture_buffer", buffer, persistent=False)
    _STATE = CaptureState(buffer=buffer, num_layers=num_layers, hidden_size=hidden)
    return _STATE
