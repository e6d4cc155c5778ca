"""Independent reference for residual-stream activations, computed with Hugging Face transformers.

Mechanism: plain eager forward pass with PyTorch hooks, nothing shared with the vLLM capture
code. In HF Llama/Qwen3 decoder layers ``post_attention_layernorm`` is called on
``residual + attn_out``, so its input is the post-attention residual; the input of the final
``model.norm`` is the last layer's post-MLP residual (HF's last ``hidden_states`` entry is
already normed, so it cannot be used for that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_MODELS: dict[tuple[str, str], object] = {}


def _load(model_dir: str | Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    key = (str(Path(model_dir).resolve()), dtype)
    if key not in _MODELS:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation="eager"
        )
        model.eval()
        _MODELS[key] = model
    return _MODELS[key]


def hf_residuals(
    model_dir: str | Path, token_ids: list[int], dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """Residual stream of one sequence: ``embedding`` [T, H], ``post_attention`` and
    ``post_mlp`` [L, T, H], as float32 numpy arrays, plus ``final_hidden`` [T, H] (after the
    final norm, for tests that must tell it apart from ``post_mlp[-1]``)."""
    import torch

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    model = _load(model_dir, dtype)
    layers = model.model.layers
    post_attention: list[torch.Tensor | None] = [None] * len(layers)
    pre_final_norm: list[torch.Tensor] = []

    def capture_post_attention(index: int):
        def hook(_module, args):
            post_attention[index] = args[0].detach()

        return hook

    handles = [
        layer.post_attention_layernorm.register_forward_pre_hook(capture_post_attention(i))
        for i, layer in enumerate(layers)
    ]
    handles.append(
        model.model.norm.register_forward_pre_hook(
            lambda _module, args: pre_final_norm.append(args[0].detach())
        )
    )
    try:
        with torch.no_grad():
            out = model.model(
                input_ids=torch.tensor([token_ids], dtype=torch.long),
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()

    def to_numpy(t: torch.Tensor) -> np.ndarray:
        return t[0].float().cpu().numpy()

    hidden = out.hidden_states  # (embedding, layer 0 out, ..., normed final)
    post_mlp = [to_numpy(h) for h in hidden[1 : len(layers)]] + [to_numpy(pre_final_norm[-1])]
    return {
        "embedding": to_numpy(hidden[0]),
        "post_attention": np.stack([to_numpy(t) for t in post_attention]),
        "post_mlp": np.stack(post_mlp),
        "final_hidden": to_numpy(out.last_hidden_state),
    }


def hf_channel_inputs(
    model_dir: str | Path, token_ids: list[int], dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """Inputs of every layer's down_proj (``mlp_intermediate`` [L, T, I]), o_proj
    (``attn_heads`` [L, T, heads * head_dim]), gate_proj (``mlp_norm``, the post-attention
    RMSNorm's output [L, T, H]) and q_proj (``attn_norm``, the input RMSNorm's output) for one
    sequence, as float32 numpy arrays."""
    import torch

    model = _load(model_dir, dtype)
    layers = model.model.layers
    sites = {
        "mlp_intermediate": lambda layer: layer.mlp.down_proj,
        "attn_heads": lambda layer: layer.self_attn.o_proj,
        "mlp_norm": lambda layer: layer.mlp.gate_proj,
        "attn_norm": lambda layer: layer.self_attn.q_proj,
    }
    seen: dict[str, list] = {kind: [None] * len(layers) for kind in sites}

    def keep(kind: str, index: int):
        def hook(_module, args):
            seen[kind][index] = args[0].detach()[0].float().cpu().numpy()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        for kind, module in sites.items():
            handles.append(module(layer).register_forward_pre_hook(keep(kind, i)))
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([token_ids], dtype=torch.long), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: np.stack(arrays) for kind, arrays in seen.items()}
