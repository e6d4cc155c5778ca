"""`analyze`: stream a directory of activation shards into analysis.json, arrays, pictures, report.

All accumulation happens in `stats` (float64, mergeable, one token block in memory at a time);
this module picks the inputs (embedding table, special tokens), turns the sums into the JSON a
person and `actclient plan` read, and flags redundant layers with the reasons behind each flag.
Top-level metrics are over all tokens, as the papers define them; `by_tokens` repeats every
metric for content tokens (no position 0, no special tokens) and for each shard's last token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from actclient.analysis.embedding import (
    EmbeddingTable,
    ModelFilesError,
    load_config,
    special_token_ids,
)
from actclient.analysis.stats import (
    DEFAULT_BLOCK_BYTES,
    POPULATIONS,
    AnalysisAccumulator,
    MassiveRule,
    ResidualStats,
    SiteLayout,
    layer_metrics,
)
from actclient.progress import Progress
from vllm_activations.shard import ShardError, iter_shard_paths

ANALYSIS_SCHEMA = "actclient.analysis/1"
REDUNDANT_FACTOR = 0.5  # a score at most half the median score of its kind is "redundant"
CONFIG_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "model_type",
)


class AnalysisError(ValueError):
    """Inputs that cannot be analyzed; the message says what to change."""


def analyze(
    shards_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    *,
    special_ids: Iterable[int] | None = None,
    rule: MassiveRule | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    pictures: bool = True,
    progress: bool = True,
) -> dict:
    """Analyze every shard in `shards_dir`, write outputs to `out_dir`, return analysis.json.

    `model_dir` (a Hugging Face checkpoint with safetensors) rebuilds the embedding output so
    layer 0 gets scores, and supplies the special token ids unless `special_ids` is given.
    """
    paths = list(iter_shard_paths(shards_dir))
    if not paths:
        raise AnalysisError(f"{shards_dir}: no *.h5 shards; run `actclient record` first")
    embed = EmbeddingTable(model_dir) if model_dir is not None else None
    if special_ids is None:
        special_ids = special_token_ids(model_dir) if model_dir is not None else set()
    acc = AnalysisAccumulator(
        embed=embed,
        special_ids=frozenset(int(i) for i in special_ids),
        rule=rule or MassiveRule(),
        block_bytes=block_bytes,
    )
    with Progress(
        len(paths), desc="analyze", unit="shard", enabled=None if progress else False
    ) as bar:
        for path in paths:
            acc.add_shard(path)
            bar.update(1)
    return write_analysis(
        acc, out_dir, shards_dir=shards_dir, model_dir=model_dir, pictures=pictures
    )


def write_analysis(
    acc: AnalysisAccumulator,
    out_dir: str | Path,
    *,
    shards_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
    pictures: bool = True,
) -> dict:
    """Turn a filled accumulator into analysis.json, arrays/*.npy, pictures and report.md."""
    if acc.layout is None:
        raise AnalysisError("no shard was added")
    out = Path(out_dir)
    arrays_dir = out / "arrays"
    arrays_dir.mkdir(parents=True, exist_ok=True)
    layout = acc.layout
    by_tokens = {}
    arrays: dict[str, np.ndarray] = {}
    for name in POPULATIONS:
        stats = acc.populations[name]
        by_tokens[name] = population_summary(stats, layout)
        arrays[f"similarity_{name}"] = stats.similarity()
        arrays[f"similarity_std_{name}"] = stats.similarity_std()
        arrays[f"boundary_angle_{name}"] = stats.mean_angle() / np.pi
        arrays[f"channel_mean_{name}"] = stats.channel_mean
        arrays[f"channel_variance_{name}"] = stats.channel_variance()
        arrays[f"channel_absmax_{name}"] = stats.absmax
        arrays[f"massive_count_{name}"] = stats.massive_count
    for kind in acc.channels.sums:
        arrays[f"channel_stats_{kind}_layers"] = acc.channels.layers[kind]
        arrays[f"channel_stats_{kind}_sum"] = acc.channels.sums[kind]
        arrays[f"channel_stats_{kind}_sum_sq"] = acc.channels.sum_sqs[kind]
        arrays[f"channel_stats_{kind}_count"] = acc.channels.counts[kind]
    for key, value in arrays.items():
        np.save(arrays_dir / f"{key}.npy", value)

    model_config = _model_config(acc.attrs, model_dir)
    main = by_tokens["all"]
    analysis = {
        "schema": ANALYSIS_SCHEMA,
        "shards_dir": str(shards_dir) if shards_dir is not None else None,
        "num_shards": acc.num_shards,
        "bytes_read": acc.bytes_read,
        "model": acc.attrs.get("model"),
        "model_dir": str(model_dir) if model_dir is not None else None,
        "model_config": model_config,
        "layers": list(layout.layers),
        "sites": layout.labels,
        "embedding": "rebuilt from embed_tokens.weight" if layout.has_embedding else None,
        "special_token_ids": sorted(acc.special_ids),
        "token_populations": {
            "all": "every captured position",
            "content": "captured positions except position 0 and special token ids",
            "last": "the last captured position of each shard (Gromov et al.)",
        },
        "massive_rule": {"threshold": acc.rule.threshold, "ratio_to_token_median": acc.rule.ratio},
        "tokens": {name: acc.populations[name].count for name in POPULATIONS},
        "block_influence": main["block_influence"],
        "similarity": {"labels": layout.labels, "matrix": _json_matrix(arrays["similarity_all"])},
        "angular_distance": main["angular_distance"],
        "best_blocks": main["best_blocks"],
        "redundant_layers": main["redundant_layers"],
        "redundant_sub_blocks": main["redundant_sub_blocks"],
        "protected_layers": main["protected_layers"],
        "by_tokens": by_tokens,
        "channel_stats": {
            kind: {
                "layers": acc.channels.layers[kind].tolist(),
                "channels": int(acc.channels.sums[kind].shape[1]),
                "tokens": acc.channels.counts[kind].tolist(),
            }
            for kind in acc.channels.sums
        },
        "arrays": {key: f"arrays/{key}.npy" for key in arrays},
    }
    picture_paths: list[str] = []
    if pictures:
        from actclient.analysis.plots import render

        picture_paths = [str(p.relative_to(out)) for p in render(analysis, arrays, out)]
    analysis["pictures"] = picture_paths
    (out / "analysis.json").write_text(json.dumps(analysis, indent=1, allow_nan=False) + "\n")
    from actclient.analysis.report import write_report

    write_report(analysis, out)
    return analysis


def population_summary(stats: ResidualStats, layout: SiteLayout) -> dict:
    """Every metric of one token population, JSON-ready."""
    metrics = layer_metrics(stats, layout)
    sites = stats.site_summary()
    labels = layout.labels
    metrics["tokens"] = stats.count
    metrics["sites"] = {key: [_num(v) for v in values] for key, values in sites.items()}
    metrics["sites"]["labels"] = labels
    metrics["massive_activations"] = massive_summary(stats, labels)
    protected = protected_layers(metrics, layout)
    metrics["protected_layers"] = protected
    metrics["redundant_layers"], metrics["redundant_sub_blocks"] = redundant_layers(
        metrics, {p["layer"] for p in protected}
    )
    return metrics


def massive_summary(stats: ResidualStats, labels: list[str], top: int = 10) -> dict:
    """Massive activations: channels with their sites, positions and token ids."""
    counts = stats.massive_count
    channels = []
    for ch in np.nonzero(counts.sum(0))[0]:
        site_hits = np.nonzero(counts[:, ch])[0]
        peak_site = int(np.argmax(stats.absmax[:, ch]))
        channels.append(
            {
                "channel": int(ch),
                "tokens_flagged": int(counts[:, ch].max()),
                "first_site": labels[site_hits[0]],
                "last_site": labels[site_hits[-1]],
                "num_sites": int(len(site_hits)),
                "max_abs": float(stats.absmax[peak_site, ch]),
                "max_site": labels[peak_site],
                "max_position": int(stats.absmax_position[peak_site, ch]),
                "max_token": int(stats.absmax_token[peak_site, ch]),
            }
        )
    channels.sort(key=lambda c: -c["max_abs"])
    events = sorted(
        (e for site_events in stats.massive_events for e in site_events), key=lambda e: -e[0]
    )
    site_of = {id(e): labels[s] for s, evs in enumerate(stats.massive_events) for e in evs}
    first = next((labels[s] for s in range(len(labels)) if stats.massive_tokens[s]), None)
    return {
        "first_site": first,
        "channels": channels,
        "positions": [[p, c] for p, c in stats.massive_positions.most_common(top)],
        "token_ids": [[t, c] for t, c in stats.massive_token_ids.most_common(top)],
        "largest": [
            {
                "site": site_of[id(e)],
                "value": e[1],
                "channel": e[2],
                "shard": e[3],
                "position": e[4],
                "token": e[5],
            }
            for e in events[:top]
        ],
    }


def protected_layers(metrics: dict, layout: SiteLayout) -> list[dict]:
    """Layers no plan should drop: the first, the last, and where massive activations start."""
    layers = list(layout.layers)
    out: dict[int, list[str]] = {}
    if layers:
        out.setdefault(layers[0], []).append("first layer (removal is catastrophic in studies)")
        out.setdefault(layers[-1], []).append("last layer (feeds the final norm and LM head)")
    first = metrics["massive_activations"]["first_site"]
    if first is not None and first != "embedding":
        layer = int(first.split(".")[0])
        out.setdefault(layer, []).append(f"massive activations first appear at {first}")
    return [{"layer": k, "reasons": v} for k, v in sorted(out.items())]


def redundant_layers(metrics: dict, protected: set[int]) -> tuple[list[dict], list[dict]]:
    """Redundant layers: the lowest quarter by block influence, plus any layer whose BI is at
    most REDUNDANT_FACTOR x the median ("strong"); sub-blocks by the same factor rule."""
    layers = metrics["layers"]

    def low(key: str) -> dict[int, tuple[float, float]]:
        values = [
            (layer, v) for layer, v in zip(layers, metrics[key], strict=True) if v is not None
        ]
        if not values:
            return {}
        median = float(np.median([v for _, v in values]))
        return {layer: (v, median) for layer, v in values if v <= REDUNDANT_FACTOR * median}

    bi = low("block_influence")
    attn = low("attention_score")
    mlp = low("mlp_score")
    ranked = sorted(
        (v, layer)
        for layer, v in zip(layers, metrics["block_influence"], strict=True)
        if v is not None
    )
    rank = {layer: k + 1 for k, (_, layer) in enumerate(ranked)}
    quarter = max(1, round(len(ranked) / 4))
    median_bi = float(np.median([v for v, _ in ranked])) if ranked else 0.0
    gromov_reasons: dict[int, list[str]] = {}
    for best in metrics["best_blocks"]:
        if best["n"] > quarter:
            continue
        for layer in best["drop"]:
            gromov_reasons.setdefault(layer, []).append(
                f"inside the best Gromov block of {best['n']} layers "
                f"[{best['start']}, {best['start'] + best['n']}) (angular distance "
                f"{best['distance']:.4g})"
            )
    redundant, sub_blocks = [], []
    for layer in layers:
        reasons = []
        if layer in rank and (rank[layer] <= quarter or layer in bi):
            v = ranked[rank[layer] - 1][0]
            strong = layer in bi
            reasons.append(
                f"block influence {v:.4g} ranks {rank[layer]} of {len(ranked)} (lowest first; "
                f"median {median_bi:.4g})"
                + (f"; at most {REDUNDANT_FACTOR} x the median" if strong else "")
            )
        if not reasons:
            for kind, table in (("attention", attn), ("MLP", mlp)):
                if layer in table:
                    v, med = table[layer]
                    sub_blocks.append(
                        {
                            "layer": layer,
                            "sub_block": kind.lower(),
                            "score": v,
                            "reason": f"{kind} score {v:.4g} is at most {REDUNDANT_FACTOR} x "
                            f"the median {med:.4g}",
                        }
                    )
            continue
        for kind, table in (("attention", attn), ("MLP", mlp)):
            if layer in table:
                v, med = table[layer]
                reasons.append(f"{kind} sub-block score {v:.4g} (median {med:.4g})")
        reasons.extend(gromov_reasons.get(layer, []))
        entry = {
            "layer": layer,
            "block_influence": ranked[rank[layer] - 1][0],
            "strong": layer in bi,
            "reasons": reasons,
            "protected": layer in protected,
        }
        redundant.append(entry)
    return redundant, sub_blocks


def _model_config(attrs: dict, model_dir: str | Path | None) -> dict:
    config: dict = {}
    raw = attrs.get("model_config")
    if isinstance(raw, dict):
        config.update(raw)
    for key in CONFIG_KEYS:
        if key in attrs and key not in config:
            config[key] = attrs[key]
    if model_dir is not None:
        try:
            for key, value in load_config(model_dir).items():
                config.setdefault(key, value)
        except ModelFilesError:
            pass
    return {k: config[k] for k in CONFIG_KEYS if k in config}


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[_num(v) for v in row] for row in matrix]


__all__ = ["AnalysisError", "ShardError", "analyze", "write_analysis", "population_summary"]
