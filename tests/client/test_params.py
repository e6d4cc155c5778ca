"""Exact parameter counts, against the real thing: the sum of numel over the safetensors of the
embedded checkpoints, and `model.parameters()` of transformers models built from configs with
every bias option. (Budget plans are tested on the planted analysis in test_analysis.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from actclient.analysis.embedding import read_safetensors_header
from actclient.analysis.params import ParamCountError, count_parameters


@pytest.mark.parametrize("name", ["smollm2", "tiny-qwen3-tied", "tiny-qwen3-untied"])
def test_count_equals_the_checkpoints_numel(embedded_models, name: str) -> None:
    model = embedded_models[name]
    config = json.loads((model / "config.json").read_text())
    numel = sum(
        int(np.prod(info.shape))
        for path in model.glob("*.safetensors")
        for info in read_safetensors_header(path).values()
    )
    assert count_parameters(config) == numel


@pytest.mark.parametrize(
    ("model_type", "options"),
    [
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {}),  # q/k/v biases without any option
        ("qwen3", {"attention_bias": True}),  # q/k/v/o biases and q/k norms
        ("mistral", {"head_dim": 24}),
    ],
)
def test_count_equals_transformers_parameters(model_type: str, options: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = {
        "vocab_size": 96,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    }
    config = AutoConfig.for_model(model_type, **{**dims, **options})
    model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(config.to_dict()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ParamCountError, match="gemma"):
        count_parameters({**config.to_dict(), "model_type": "gemma"})
