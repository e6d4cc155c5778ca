"""Minitron width importance from the accumulated channel statistics.

Minitron (Muralidharan et al. 2024; ModelOpt's `mcore_minitron`) ranks a channel by the L2 norm
over calibration sequences of its mean |activation| over the sequence's tokens. Each shard is
one request, and the device records per-request sums of |x|, so `ChannelStats` keeps the sum
over requests of (abs_sum / count)^2 and the importance is its square root:
- MLP neurons: the down_proj input (`mlp_intermediate`), per layer;
- attention heads: the o_proj input (`attn_heads`) as [heads, head_dim], the head's score the
  L2 over head_dim of its channels' importances (the device keeps per-channel sums, not
  per-token head norms, so this is the L2 of the aggregates), ranked within each GQA group:
  pruning removes the same number of query heads from every group and keeps every KV head;
- hidden (embedding) channels: the outputs of both RMSNorms of every layer (`attn_norm`, the
  input_layernorm output; `mlp_norm`, the post_attention_layernorm output), the per-layer
  importances summed over layers and both norms, one ranking shared by the whole model.
"""

from __future__ import annotations

import numpy as np

from actclient.analysis.stats import ChannelStats

NORM_KINDS: tuple[str, ...] = ("attn_norm", "mlp_norm")
DESCRIPTION = (
    "Minitron: per channel, L2 over requests of the request's mean |x|; heads: L2 over "
    "head_dim, ranked within KV groups; hidden: summed over layers and both RMSNorm outputs"
)


def head_scores(channel_importance: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """[L, heads] head scores from [L, heads * head_dim] o_proj-input channel importances."""
    layers, width = channel_importance.shape
    if width != heads * head_dim:
        raise ValueError(
            f"{heads} heads x {head_dim} dims do not match {width} o_proj input channels"
        )
    return np.linalg.norm(channel_importance.reshape(layers, heads, head_dim), axis=2)


def rank_in_groups(scores: np.ndarray, kv_heads: int) -> np.ndarray:
    """[L, kv, group] query-head indices of each KV group, most important first."""
    layers, heads = scores.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} KV groups")
    group = heads // kv_heads
    by_group = scores.reshape(layers, kv_heads, group)
    order = np.argsort(-by_group, axis=2, kind="stable")
    return order + (np.arange(kv_heads) * group)[None, :, None]


def hidden_scores(channels: ChannelStats) -> np.ndarray | None:
    """[H] hidden-channel importance summed over layers and both norm outputs (None: absent)."""
    present = [kind for kind in NORM_KINDS if kind in channels.sums]
    if not present:
        return None
    return sum(channels.minitron(kind).sum(0) for kind in present)


def minitron_summary(channels: ChannelStats, config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(the analysis.json `minitron` section, arrays to save) from accumulated statistics.

    Per-neuron importances [L, I] go to arrays only (a 64-layer, 25600-wide model would make
    analysis.json tens of MB); heads and hidden channels are small and are in the JSON too.
    """
    arrays: dict[str, np.ndarray] = {}
    out: dict = {"score": DESCRIPTION, "requests": dict(channels.requests)}
    for kind in channels.sums:
        arrays[f"minitron_{kind}"] = channels.minitron(kind)
        out.setdefault("arrays", {})[kind] = f"arrays/minitron_{kind}.npy"
    if "mlp_intermediate" in channels.sums:
        neurons = channels.minitron("mlp_intermediate")
        out["mlp"] = {
            "layers": channels.layers["mlp_intermediate"].tolist(),
            "intermediate_size": int(neurons.shape[1]),
            "per_layer_total": neurons.sum(1).tolist(),
            "array": "arrays/minitron_mlp_intermediate.npy",
        }
    heads = config.get("num_attention_heads")
    if "attn_heads" in channels.sums and heads:
        importance = channels.minitron("attn_heads")
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or importance.shape[1] // heads)
        scores = head_scores(importance, int(heads), head_dim)
        arrays["minitron_head_scores"] = scores
        out["heads"] = {
            "layers": channels.layers["attn_heads"].tolist(),
            "num_attention_heads": int(heads),
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "scores": scores.tolist(),
            "rank_in_group": rank_in_groups(scores, kv).tolist(),
        }
    hidden = hidden_scores(channels)
    if hidden is not None:
        kinds = [kind for kind in NORM_KINDS if kind in channels.sums]
        arrays["minitron_hidden"] = hidden
        out["hidden"] = {
            "kinds": kinds,
            "layers": channels.layers[kinds[0]].tolist(),
            "hidden_size": int(hidden.shape[0]),
            "scores": hidden.tolist(),
            "order": np.argsort(-hidden, kind="stable").tolist(),
        }
    return out, arrays
