"""Exact parameter counts of decoder-only Hugging Face configs, and configs at other widths.

The count follows the module layout of transformers' own Llama, Mistral, Qwen2 and Qwen3
classes (checked in tests against the sum of numel over the safetensors of real checkpoints
and over `model.parameters()` of models built from configs with every bias option): token
embedding, an untied lm_head, per layer two RMSNorm weights, q/k/v/o and gate/up/down
projections with the biases the architecture and config add (Qwen2: q/k/v always; Llama:
`attention_bias` on q/k/v/o, `mlp_bias` on gate/up/down; Qwen3: `attention_bias` on q/k/v/o),
Qwen3's q_norm/k_norm over head_dim, and the final norm. Rotary tables are buffers, not
parameters. Other architectures are refused by name rather than counted wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")


class ParamCountError(ValueError):
    """A config whose parameters this module cannot count; the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that fix a decoder's parameter count (uniform widths across layers)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        model_type = str(config.get("model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ParamCountError(
                f"model_type {model_type!r}: parameter counting knows {list(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                # the default of all four config classes
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or (model_type != "mistral" and attention_bias),
                o_bias=model_type in ("llama", "qwen3") and attention_bias,
                mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
            )
        except KeyError as exc:
            raise ParamCountError(f"the config has no {exc.args[0]!r}") from None

    def with_widths(self, **widths: int) -> ModelShape:
        """The same architecture at other widths (keys: the config's names)."""
        return replace(self, **widths)

    def per_layer(self) -> int:
        """Parameters of one decoder layer."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
        i = self.intermediate_size
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        return attn + mlp + 2 * h  # input_layernorm, post_attention_layernorm

    def outside_layers(self) -> int:
        """Embedding, final norm and an untied lm_head."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def count(self) -> int:
        return self.outside_layers() + self.num_hidden_layers * self.per_layer()

    def breakdown(self) -> dict[str, int]:
        """Counts by part, for reports: they sum to `count()`."""
        h = self.hidden_size
        embed = self.vocab_size * h
        return {
            "embed_tokens": embed,
            "lm_head": 0 if self.tie_word_embeddings else embed,
            "final_norm": h,
            "layers": self.num_hidden_layers * self.per_layer(),
        }


def count_parameters(config: dict) -> int:
    """The exact number of parameters of the model a config describes."""
    return ModelShape.from_config(config).count()
