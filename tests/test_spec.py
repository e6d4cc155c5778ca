"""Unit tests: the capture spec's validation, position selection and size estimate."""

from __future__ import annotations

import pytest

from vllm_activations.contract.spec import CaptureSpec, CaptureSpecError


def test_defaults_capture_everything():
    spec = CaptureSpec.from_dict({})
    assert spec.layers is None
    assert spec.sites == ("post_attention", "post_mlp")
    assert spec.positions == "all"
    assert spec.dtype == "bfloat16"
    assert spec.resolve_layers(4) == [0, 1, 2, 3]
    assert CaptureSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ({"layers": [0, 0]}, "layers", "duplicates"),
        ({"layers": []}, "layers", "must not be empty"),
        ({"layers": "all"}, "layers", "list of integers"),
        ({"layers": [1.5]}, "layers", "not an integer"),
        ({"sites": ["resid"]}, "sites", "['post_attention', 'post_mlp']"),
        ({"sites": []}, "sites", "must not be empty"),
        ({"positions": "first"}, "positions", "every:K"),
        ({"positions": "every:-2"}, "positions", "positive integer"),
        ({"positions": 3}, "positions", "not a string"),
        ({"dtype": "fp8"}, "dtype", "['bfloat16', 'float16', 'float32']"),
        ({"layer": [1]}, "layer", "allowed fields"),
    ],
)
def test_invalid_fields_are_named(data, field, fragment):
    with pytest.raises(CaptureSpecError) as info:
        CaptureSpec.from_dict(data)
    assert info.value.field == field
    assert str(info.value).startswith(f"capture.{field}: ")
    assert fragment in str(info.value)


def test_layers_resolve_negative_and_sorted():
    spec = CaptureSpec(layers=(-1, 0, 5))
    assert spec.resolve_layers(30) == [0, 5, 29]
    with pytest.raises(CaptureSpecError, match=r"capture.layers: 30 is out of range.*0..29"):
        CaptureSpec(layers=(30,)).resolve_layers(30)
    with pytest.raises(CaptureSpecError, match="same layer twice"):
        CaptureSpec(layers=(-1, 29)).resolve_layers(30)


@pytest.mark.parametrize(
    "positions, expected",
    [
        ("all", list(range(12))),
        ("prompt", list(range(8))),
        ("generated", [8, 9, 10, 11]),
        ("last", [11]),
        ("every:5", [0, 5, 10]),
    ],
)
def test_expected_positions(positions, expected):
    # 8 prompt tokens, 5 generated: the last generated token is never forwarded.
    assert CaptureSpec(positions=positions).expected_positions(8, 5) == expected


def test_estimate_bytes():
    spec = CaptureSpec()
    # Qwen3-32B, both sites of 64 layers, bf16: 1.25 MiB per token (1 prompt token, 1 new:
    # one forwarded position).
    assert spec.estimate_bytes(1, 1, 64, 5120) == int(1.25 * 2**20)
    assert CaptureSpec(positions="last").estimate_bytes(999, 2, 64, 5120) == int(1.25 * 2**20)
    quarter = CaptureSpec(layers=tuple(range(0, 64, 4)), sites=("post_mlp",), dtype="float32")
    assert quarter.estimate_bytes(10, 1, 64, 5120) == 10 * 16 * 5120 * 4
    assert CaptureSpec(positions="every:4").estimate_bytes(9, 1, 2, 8) == 3 * 2 * 2 * 8 * 2


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "every:3"])
def test_keeps_position_on_arrays_equals_scalar_answers(positions):
    import numpy as np

    spec = CaptureSpec(positions=positions)
    pos = np.arange(20)
    want = [spec.keeps_position(int(p), 8) for p in pos]
    assert spec.keeps_position(pos, 8).tolist() == want
    assert [p for p in range(20) if want[p]] == spec.expected_positions(8, 21 - 8)[:20]


def test_only_prompt_position_specs_need_prefix_cache_bypass():
    needs = {
        p: CaptureSpec(positions=p).needs_prompt_positions
        for p in ("all", "prompt", "every:4", "generated", "last")
    }
    assert needs == {
        "all": True,
        "prompt": True,
        "every:4": True,
        "generated": False,
        "last": False,
    }
