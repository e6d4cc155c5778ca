"""`actclient plan`: layer and neuron pruning plans from an analysis, as JSON.

With a parameter budget (`make_budget_plan`), the plan instead holds one complete shape per
strategy (depth-only, last layers, width-only, joint, random), each counted exactly from the
config: see `budget` for the search.

Layer plans (one-shot, scores are not recomputed between removals), all dropping K layers and
never a protected one (first, last, and the layer where massive activations appear):
- block_influence: the K lowest ShortGPT Block Influence scores;
- gromov: the contiguous block [l, l+K) with the smallest angular distance;
- alternating (baseline): every second layer (odd indices), spread evenly over depth;
- u_shaped (baseline): keep the first and last eighth of the layers, drop the K lowest-BI
  layers of the middle.
Neuron plan, from the per-channel sums of the down_proj input (MLP neurons) and o_proj input
(attention heads): Wanda-style score |W_ij| * ||X_j||, averaged over output rows (Wanda-sp),
when a model directory with safetensors weights is given, else the activation RMS alone.
Widths are uniform across layers so the pruned model still has a standard config. Heads obey
GQA: rule `per-group` removes the same number of query heads from every KV group (K/V
projections unchanged); rule `whole-groups` removes whole KV groups (their query heads and
their K/V head).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from actclient.analysis.budget import (
    DEFAULT_DEPTH_SHARE,
    DEFAULT_HIDDEN_MULTIPLE,
    DEFAULT_MAX_CUT,
    DEFAULT_MULTIPLE,
    BudgetError,
    Importance,
    budget_plan,
)
from actclient.analysis.embedding import (
    Checkpoint,
    ModelFilesError,
    load_config,
    resolve_model_dir,
)
from actclient.analysis.params import ModelShape, ParamCountError

HEAD_RULES: tuple[str, ...] = ("per-group", "whole-groups")
LAYER_STRATEGIES: tuple[str, ...] = ("block_influence", "gromov", "alternating", "u_shaped")
PLAN_SCHEMA = "actclient.plan/1"
_ROW_CHUNK = 1024  # weight rows read at a time, so a 25600-wide down_proj stays small


class PlanError(ValueError):
    """A plan that cannot be made from the given analysis; the message says why."""


def load_analysis(path: str | Path) -> tuple[dict, Path]:
    """analysis.json (or the directory holding it) and its directory."""
    path = Path(path)
    file = path / "analysis.json" if path.is_dir() else path
    if not file.is_file():
        raise PlanError(f"{path}: no analysis.json; run `actclient analyze` first")
    try:
        analysis = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{file}: not an `actclient analyze` result ({exc})") from None
    if not (isinstance(analysis, dict) and "by_tokens" in analysis):
        raise PlanError(f"{file}: not an `actclient analyze` result (no by_tokens)")
    return analysis, file.parent


def _num_layers(analysis: dict) -> int:
    return int(
        analysis.get("model_config", {}).get("num_hidden_layers") or max(analysis["layers"]) + 1
    )


def layer_plan(analysis: dict, drop: int, tokens: str = "all") -> dict:
    """Kept and dropped layers with their scores, by every strategy."""
    metrics = analysis["by_tokens"][tokens]
    layers: list[int] = metrics["layers"]
    total = _num_layers(analysis)
    if len(layers) != total:
        raise PlanError(
            f"the analysis covers layers {layers[0]}..{layers[-1]} of {total}; a layer plan "
            "needs shards that capture every layer"
        )
    protected = sorted({p["layer"] for p in metrics["protected_layers"]})
    free = [layer for layer in layers if layer not in protected]
    if not 0 < drop <= len(free):
        raise PlanError(
            f"cannot drop {drop} layers: {len(free)} of {total} are not protected "
            f"(protected: {protected})"
        )
    bi = dict(zip(layers, metrics["block_influence"], strict=True))
    scored = sorted((bi[layer], layer) for layer in free if bi[layer] is not None)
    plans: dict[str, dict] = {}
    if len(scored) >= drop:
        plans["block_influence"] = _layer_entry(
            metrics,
            [layer for _, layer in scored[:drop]],
            "the K unprotected layers with the lowest block influence",
        )
    else:
        plans["block_influence"] = {
            "skipped": "too few layers have a block influence "
            "(layer 0 needs --model at analyze time)"
        }
    plans["gromov"] = _gromov(metrics, drop, set(protected))
    odd = [layer for layer in free if layer % 2 == 1]
    pool = odd if len(odd) >= drop else free
    pick = np.unique(np.round(np.linspace(0, len(pool) - 1, drop)).astype(int))
    plans["alternating"] = _layer_entry(
        metrics,
        [pool[i] for i in pick],
        "every second layer (odd indices), spread evenly over depth; baseline",
    )
    end = max(1, round(total / 8))
    middle = [layer for layer in free if end <= layer < total - end]
    middle_scored = sorted(
        (bi[layer] if bi[layer] is not None else np.inf, layer) for layer in middle
    )
    if len(middle) >= drop:
        plans["u_shaped"] = _layer_entry(
            metrics,
            [layer for _, layer in middle_scored[:drop]],
            f"keep the first and last {end} layers, drop the K lowest-BI middle layers; baseline",
        )
    else:
        plans["u_shaped"] = {"skipped": f"only {len(middle)} middle layers for {drop} drops"}
    return {
        "tokens": tokens,
        "num_layers": total,
        "drop": drop,
        "num_layers_after": total - drop,
        "protected": protected,
        "strategies": plans,
    }


def _gromov(metrics: dict, drop: int, protected: set[int]) -> dict:
    row = metrics["angular_distance"].get(str(drop), [])
    options = [
        (d, start)
        for start, d in enumerate(row)
        if d is not None and not protected & set(range(start, start + drop))
    ]
    if not options:
        return {"skipped": f"no contiguous block of {drop} unprotected layers has a distance"}
    distance, start = min(options)
    entry = _layer_entry(
        metrics,
        list(range(start, start + drop)),
        "the contiguous unprotected block [l, l+K) with the smallest angular distance "
        "between its input and its output",
    )
    entry["block"] = [start, start + drop]
    entry["angular_distance"] = distance
    return entry


def _layer_entry(metrics: dict, dropped: list[int], rule: str) -> dict:
    index = {layer: k for k, layer in enumerate(metrics["layers"])}
    dropped = sorted(dropped)

    def scores(layer: int) -> dict:
        k = index[layer]
        return {
            "layer": layer,
            "block_influence": metrics["block_influence"][k],
            "attention_score": metrics["attention_score"][k],
            "mlp_score": metrics["mlp_score"][k],
        }

    return {
        "rule": rule,
        "dropped": [scores(layer) for layer in dropped],
        "kept": [layer for layer in metrics["layers"] if layer not in dropped],
    }


def column_abs_mean(checkpoint: Checkpoint, name: str) -> np.ndarray:
    """mean_i |W_ij| over the output rows of a [out, in] weight, read in row chunks."""
    rows, _ = checkpoint.shape(name)
    total = None
    for start in range(0, rows, _ROW_CHUNK):
        part = np.abs(checkpoint.rows(name, slice(start, min(start + _ROW_CHUNK, rows))))
        chunk = part.sum(0, dtype=np.float64)
        total = chunk if total is None else total + chunk
    assert total is not None
    return total / rows


def channel_scores(
    analysis_dir: Path, kind: str, module: str, checkpoint: Checkpoint | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """(layers, scores [L, C], description) for one channel-stats kind."""
    arrays = analysis_dir / "arrays"
    layers = np.load(arrays / f"channel_stats_{kind}_layers.npy")
    sum_sq = np.load(arrays / f"channel_stats_{kind}_sum_sq.npy")
    count = np.load(arrays / f"channel_stats_{kind}_count.npy")
    rms = np.sqrt(sum_sq / np.maximum(count, 1)[:, None])
    if checkpoint is None:
        return layers, rms, "activation RMS sqrt(E[x_j^2]) (no weights given)"
    weight = np.empty_like(rms)
    for k, layer in enumerate(layers):
        name = checkpoint.find(f"layers.{int(layer)}.{module}.weight")
        if checkpoint.shape(name)[1] != rms.shape[1]:
            raise PlanError(
                f"{name} has shape {checkpoint.shape(name)}, but the statistics "
                f"have {rms.shape[1]} channels"
            )
        weight[k] = column_abs_mean(checkpoint, name)
    return layers, weight * rms, "Wanda-sp: mean_i |W_ij| * sqrt(E[x_j^2])"


def neuron_plan(
    analysis: dict,
    analysis_dir: Path,
    model_dir: str | Path | None = None,
    *,
    mlp_fraction: float = 0.2,
    head_fraction: float = 0.25,
    head_rule: str = "per-group",
) -> dict:
    """Which MLP neurons and attention heads to prune in each layer, and the widths after."""
    if head_rule not in HEAD_RULES:
        raise PlanError(f"head rule {head_rule!r} is not one of {list(HEAD_RULES)}")
    if not (0 <= mlp_fraction < 1 and 0 <= head_fraction < 1):
        raise PlanError("pruning fractions must lie in [0, 1)")
    stats = analysis.get("channel_stats") or {}
    if not stats:
        return {
            "skipped": "the shards hold no channel_stats (per-neuron sums of the down_proj "
            "and o_proj inputs); capture them to get a neuron-level plan"
        }
    checkpoint = Checkpoint(model_dir) if model_dir is not None else None
    cfg = analysis.get("model_config", {})
    out: dict = {"widths": {}}
    if "mlp_intermediate" in stats:
        layers, scores, how = channel_scores(
            analysis_dir, "mlp_intermediate", "mlp.down_proj", checkpoint
        )
        width = scores.shape[1]
        prune = int(round(mlp_fraction * width))
        entries = []
        for k, layer in enumerate(layers):
            order = np.argsort(scores[k], kind="stable")
            entries.append(_prune_entry(int(layer), order[:prune], scores[k]))
        out["mlp"] = {
            "score": how,
            "fraction": mlp_fraction,
            "intermediate_size_before": width,
            "intermediate_size_after": width - prune,
            "layers": entries,
        }
        out["widths"]["intermediate_size"] = width - prune
    if "attn_heads" in stats:
        out["heads"] = _head_plan(analysis_dir, cfg, checkpoint, head_fraction, head_rule)
        out["widths"].update(out["heads"]["widths"])
    return out


def _prune_entry(layer: int, pruned: np.ndarray, scores: np.ndarray) -> dict:
    kept = np.setdiff1d(np.arange(len(scores)), pruned)
    return {
        "layer": layer,
        "pruned": sorted(int(i) for i in pruned),
        "max_pruned_score": float(scores[pruned].max()) if len(pruned) else None,
        "min_kept_score": float(scores[kept].min()) if len(kept) else None,
    }


def _head_plan(
    analysis_dir: Path, cfg: dict, checkpoint: Checkpoint | None, fraction: float, rule: str
) -> dict:
    layers, scores, how = channel_scores(analysis_dir, "attn_heads", "self_attn.o_proj", checkpoint)
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads", heads)
    if not heads or not kv:
        raise PlanError(
            "the analysis has no num_attention_heads / num_key_value_heads; pass "
            "--model or record shards whose attrs carry the model config"
        )
    head_dim = int(cfg.get("head_dim") or scores.shape[1] // heads)
    if heads * head_dim != scores.shape[1] or heads % kv:
        raise PlanError(
            f"{heads} heads x {head_dim} dims with {kv} KV heads do not match "
            f"{scores.shape[1]} o_proj input channels"
        )
    group = heads // kv
    head_scores = scores.reshape(len(layers), heads, head_dim).sum(2)
    entries = []
    if rule == "per-group":
        per_group = int(round(fraction * group))
        for k, layer in enumerate(layers):
            by_group = head_scores[k].reshape(kv, group)
            pruned = [
                g * group + int(h)
                for g in range(kv)
                for h in np.argsort(by_group[g], kind="stable")[:per_group]
            ]
            entries.append(_prune_entry(int(layer), np.array(pruned, dtype=int), head_scores[k]))
        widths = {"num_attention_heads": kv * (group - per_group), "num_key_value_heads": kv}
        desc = (
            f"remove the {per_group} lowest-scoring query heads of each of the {kv} KV "
            "groups; K/V projections unchanged"
        )
    else:
        drop_groups = int(round(fraction * kv))
        for k, layer in enumerate(layers):
            group_scores = head_scores[k].reshape(kv, group).sum(1)
            gone = np.argsort(group_scores, kind="stable")[:drop_groups]
            entry = _prune_entry(
                int(layer),
                np.array([g * group + h for g in gone for h in range(group)], dtype=int),
                head_scores[k],
            )
            entry["pruned_kv_groups"] = sorted(int(g) for g in gone)
            entries.append(entry)
        widths = {
            "num_attention_heads": (kv - drop_groups) * group,
            "num_key_value_heads": kv - drop_groups,
        }
        desc = (
            f"remove the {drop_groups} lowest-scoring whole KV groups (each {group} query "
            "heads and one K/V head)"
        )
    widths["head_dim"] = head_dim
    return {
        "score": how + "; head score = sum over the head's channels",
        "rule": rule,
        "description": desc,
        "fraction": fraction,
        "num_attention_heads_before": heads,
        "num_key_value_heads_before": kv,
        "widths": widths,
        "layers": entries,
    }


def make_plan(
    analysis_path: str | Path,
    *,
    target_layers: int | None = None,
    drop: int | None = None,
    model_dir: str | Path | None = None,
    tokens: str = "all",
    mlp_fraction: float = 0.2,
    head_fraction: float = 0.25,
    head_rule: str = "per-group",
) -> dict:
    """The full plan (layers and neurons) for an analysis directory or analysis.json."""
    analysis, analysis_dir = load_analysis(analysis_path)
    if (target_layers is None) == (drop is None):
        raise PlanError("give exactly one of --target-layers N or --drop K")
    total = _num_layers(analysis)
    if drop is None:
        assert target_layers is not None
        if not 1 <= target_layers < total:
            raise PlanError(
                f"--target-layers must be 1..{total - 1} (the model has {total} layers), "
                f"got {target_layers}"
            )
        drop = total - target_layers
    elif drop < 1:
        raise PlanError(f"--drop must be at least 1, got {drop}")
    if tokens not in analysis["by_tokens"]:
        raise PlanError(f"tokens {tokens!r} is not one of {list(analysis['by_tokens'])}")
    model_dir = model_dir if model_dir is not None else analysis.get("model_dir")
    if model_dir is not None:
        try:
            model_dir = resolve_model_dir(model_dir)
        except ModelFilesError as exc:
            raise PlanError(str(exc)) from None
    try:
        neurons = neuron_plan(
            analysis,
            analysis_dir,
            model_dir,
            mlp_fraction=mlp_fraction,
            head_fraction=head_fraction,
            head_rule=head_rule,
        )
    except ModelFilesError as exc:
        raise PlanError(str(exc)) from exc
    plan = {
        "schema": PLAN_SCHEMA,
        "analysis": str(analysis_dir),
        "model": analysis.get("model"),
        "model_dir": str(model_dir) if model_dir is not None else None,
        "layers": layer_plan(analysis, drop, tokens),
        "neurons": neurons,
    }
    widths = {"num_hidden_layers": total - drop, **neurons.get("widths", {})}
    plan["widths"] = widths
    return plan


def make_budget_plan(
    analysis_path: str | Path,
    *,
    target_params: int | None = None,
    target_ratio: float | None = None,
    model_dir: str | Path | None = None,
    tokens: str = "all",
    mlp_multiple: int = DEFAULT_MULTIPLE,
    hidden_multiple: int = DEFAULT_HIDDEN_MULTIPLE,
    max_cut: float = DEFAULT_MAX_CUT,
    depth_share: float = DEFAULT_DEPTH_SHARE,
    seed: int = 0,
) -> dict:
    """A plan whose every strategy fits `target_params` (or `target_ratio` of the model's
    parameters), counted from the model's config.json; see `budget` for the search."""
    analysis, analysis_dir = load_analysis(analysis_path)
    if (target_params is None) == (target_ratio is None):
        raise PlanError("give exactly one of --target-params N or --target-ratio R")
    model_dir = model_dir if model_dir is not None else analysis.get("model_dir")
    if model_dir is None:
        raise PlanError(
            "a budget plan counts parameters from the model's config.json: pass --model DIR "
            "(or analyze with --model)"
        )
    if tokens not in analysis["by_tokens"]:
        raise PlanError(f"tokens {tokens!r} is not one of {list(analysis['by_tokens'])}")
    try:
        model_dir = resolve_model_dir(model_dir)
        config = load_config(model_dir)
        shape = ModelShape.from_config(config)
    except (ModelFilesError, ParamCountError) as exc:
        raise PlanError(str(exc)) from None
    if target_ratio is not None:
        if not 0 < target_ratio < 1:
            raise PlanError(f"--target-ratio must lie in (0, 1), got {target_ratio}")
        target_params = int(target_ratio * shape.count())
    assert target_params is not None
    importance = Importance.load(analysis, analysis_dir, shape)
    try:
        budget = budget_plan(
            config,
            analysis["by_tokens"][tokens],
            importance,
            target_params,
            mlp_multiple=mlp_multiple,
            hidden_multiple=hidden_multiple,
            max_cut=max_cut,
            depth_share=depth_share,
            seed=seed,
        )
    except BudgetError as exc:
        raise PlanError(str(exc)) from None
    budget["tokens"] = tokens
    if target_ratio is not None:
        budget["target_ratio"] = target_ratio
    return {
        "schema": PLAN_SCHEMA,
        "analysis": str(analysis_dir),
        "model": analysis.get("model"),
        "model_dir": str(model_dir),
        "budget": budget,
    }
