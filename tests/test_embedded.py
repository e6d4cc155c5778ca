"""Embedded models build once, load in transformers, and the HF reference captures the residual."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hf_reference import _load, hf_residuals

from vllm_activations import embedded

TINY = {"tiny-qwen3-tied": True, "tiny-qwen3-untied": False}


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_smollm2_config(embedded_models):
    config = _config(embedded_models["smollm2"])
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_qwen3_config(embedded_models, name):
    config = _config(embedded_models[name])
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["tie_word_embeddings"] is TINY[name]
    assert config["head_dim"] == 64  # vLLM CPU attention needs it
    assert embedded_models[name].name == name


def test_second_call_does_not_rebuild(embedded_models):
    marker = embedded_models["smollm2"] / embedded.COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert embedded.smollm2() == embedded_models["smollm2"]
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == before


def test_tiny_qwen3_build_is_deterministic(tmp_path, embedded_models):
    path = embedded.tiny_qwen3(tied=False, cache_dir=tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (path / name).read_bytes() == (
            embedded_models["tiny-qwen3-untied"] / name
        ).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_tiny_tokenizer_chat_template(embedded_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_models["tiny-qwen3-tied"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert _config(embedded_models["tiny-qwen3-tied"])["vocab_size"] == len(tokenizer)
    sample = "Grüße, 東京! x = 42"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


@pytest.mark.parametrize("name", ["smollm2", "tiny-qwen3-tied", "tiny-qwen3-untied"])
def test_hf_residual_shapes(embedded_models, name):
    config = _config(embedded_models[name])
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    tokens = [5, 17, 42, 99, 100, 7, 3]
    ref = hf_residuals(embedded_models[name], tokens)
    assert ref["embedding"].shape == (len(tokens), hidden)
    assert ref["post_attention"].shape == (layers, len(tokens), hidden)
    assert ref["post_mlp"].shape == (layers, len(tokens), hidden)
    for key, value in ref.items():
        assert value.dtype == np.float32 and np.isfinite(value).all(), key
    # the last post-MLP residual is taken before the final norm
    assert not np.allclose(ref["post_mlp"][-1], ref["final_hidden"], atol=1e-3)
    # attention adds something in every layer
    before_attention = np.concatenate([ref["embedding"][None], ref["post_mlp"][:-1]])
    assert (np.abs(ref["post_attention"] - before_attention).max(axis=(1, 2)) > 1e-4).all()


def test_hf_residuals_match_module_math(embedded_models):
    """The hooked values are what the decoder layers compute from each other."""
    import torch

    path = embedded_models["tiny-qwen3-untied"]
    ref = hf_residuals(path, list(range(10, 30)))
    model = _load(path, "float32").model
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            post_attention = torch.from_numpy(ref["post_attention"][index])
            mlp_out = layer.mlp(layer.post_attention_layernorm(post_attention))
            np.testing.assert_allclose(
                (post_attention + mlp_out).numpy(), ref["post_mlp"][index], atol=1e-5
            )
        final = model.norm(torch.from_numpy(ref["post_mlp"][-1])).numpy()
    np.testing.assert_allclose(final, ref["final_hidden"], atol=1e-5)


def test_hf_residuals_bfloat16_close_to_float32(embedded_models):
    path = embedded_models["tiny-qwen3-tied"]
    tokens = list(range(40, 56))
    full = hf_residuals(path, tokens, "float32")
    half = hf_residuals(path, tokens, "bfloat16")
    scale = np.abs(full["post_mlp"]).max()
    assert np.abs(half["post_mlp"] - full["post_mlp"]).max() < 0.05 * scale
