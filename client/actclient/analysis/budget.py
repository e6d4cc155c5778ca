"""Pruning plans under a parameter budget: depth, width or both, counted exactly from the config.

Every candidate is a standard config (uniform widths across layers): kept layers L', MLP width
I', query heads per KV group g' (every KV head kept) and hidden size H'. Its parameter count
comes from `params.ModelShape`, so a plan's `params` is what the pruned checkpoint holds.

Search (one-shot, nothing is re-scored after a removal). The shape of each strategy comes from
a fixed rule; the Minitron importance then picks which channels go:
- layers are removed in ascending block influence among unprotected layers (the analysis's
  `block_influence` strategy), so K dropped layers are always the K lowest-BI ones;
- widths: hidden size (multiples of `hidden_multiple`, and for Llama of the head count too:
  transformers' LlamaConfig refuses anything else), query heads per KV group (rounded
  up, every KV head kept) and MLP width (multiples of `mlp_multiple`) are cut by the smallest
  common fraction c <= `max_cut` that fits (bisection on c: the count falls as c grows), and
  then the MLP width is raised to the largest multiple that still fits;
- `kept_importance` reports, per axis, the Minitron importance kept / the importance before
  (and for depth 1 - dropped BI / total BI): a diagnostic, not a loss; compare strategies by
  scoring the pruned models.
Strategies: `depth_only` (fewest lowest-BI layers dropped to fit, full widths), `last_layers`
(the same number of layers, the last ones before the final layer), `width_only` (K = 0),
`joint` (`depth_share` of the parameter cut taken as whole layers, the width rule on the
rest), and `random` (the joint shape, layers among the unprotected, neurons, heads and
hidden channels drawn at random with `seed`). Granularity: a depth plan lands within one
layer's parameters of the budget, a width or joint plan within one MLP step (`mlp_multiple`
neurons in every kept layer) unless the MLP is already at full width (then within one hidden
step); each entry states its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actclient.analysis.importance import head_scores
from actclient.analysis.params import ModelShape

BUDGET_STRATEGIES: tuple[str, ...] = ("depth_only", "last_layers", "width_only", "joint", "random")
DEFAULT_MULTIPLE = 32
DEFAULT_HIDDEN_MULTIPLE = 8
# transformers' LlamaConfig refuses a hidden_size that is not a multiple of the head count
_HIDDEN_DIVIDES_HEADS = ("llama",)
DEFAULT_MAX_CUT = 0.5
DEFAULT_DEPTH_SHARE = 0.5


class BudgetError(ValueError):
    """A budget that cannot be planned from this analysis; the message says why."""


@dataclass
class Importance:
    """Minitron importances over every layer, read from an analysis's arrays."""

    mlp: np.ndarray  # [L, I]
    heads: np.ndarray  # [L, heads]
    hidden: np.ndarray  # [H]
    means: dict[str, np.ndarray] | None = None

    @classmethod
    def load(cls, analysis: dict, analysis_dir: Path, shape: ModelShape) -> Importance | str:
        """The importances, or why a width plan is impossible from this analysis."""
        arrays = analysis_dir / "arrays"
        needed = ("mlp_intermediate", "attn_heads", "mlp_norm", "attn_norm")
        missing = [k for k in needed if not (arrays / f"minitron_{k}.npy").is_file()]
        if missing:
            return (
                f"the analysis has no Minitron importance for {missing} (record with "
                "channel_stats and analyze with this version)"
            )
        layers = [np.load(arrays / f"channel_stats_{k}_layers.npy").tolist() for k in needed]
        every = list(range(shape.num_hidden_layers))
        if any(found != every for found in layers):
            return "the channel statistics do not cover every layer; record them for all layers"
        load = {k: np.load(arrays / f"minitron_{k}.npy") for k in needed}
        heads = head_scores(load["attn_heads"], shape.num_attention_heads, shape.head_dim)
        hidden = load["mlp_norm"].sum(0) + load["attn_norm"].sum(0)
        if load["mlp_intermediate"].shape[1] != shape.intermediate_size or len(hidden) != (
            shape.hidden_size
        ):
            return "the channel statistics do not match the config's widths: another model?"
        return cls(load["mlp_intermediate"], heads, hidden)


def _kept_fraction_curve(scores: np.ndarray) -> np.ndarray:
    """[..., n + 1]: the sum of the k largest scores along the last axis, for k = 0..n."""
    ranked = -np.sort(-scores, axis=-1)
    zero = np.zeros((*scores.shape[:-1], 1))
    return np.concatenate([zero, np.cumsum(ranked, axis=-1)], axis=-1)


@dataclass
class _Candidate:
    dropped: list[int]
    intermediate: int
    per_group: int
    hidden: int
    params: int
    kept: dict[str, float]

    @property
    def score(self) -> float:
        return float(np.prod(list(self.kept.values())))


class BudgetPlanner:
    """Enumerates the grid for one model, analysis and budget."""

    def __init__(
        self,
        shape: ModelShape,
        block_influence: list[float | None],
        protected: list[int],
        importance: Importance | None,
        *,
        mlp_multiple: int = DEFAULT_MULTIPLE,
        hidden_multiple: int = DEFAULT_HIDDEN_MULTIPLE,
        max_cut: float = DEFAULT_MAX_CUT,
    ) -> None:
        if mlp_multiple < 1 or hidden_multiple < 1:
            raise BudgetError("--mlp-multiple and --hidden-multiple must be at least 1")
        if not 0 <= max_cut < 1:
            raise BudgetError(f"--max-cut must lie in [0, 1), got {max_cut}")
        self.shape = shape
        self.importance = importance
        self.mlp_multiple, self.hidden_multiple, self.max_cut = (
            mlp_multiple,
            hidden_multiple,
            max_cut,
        )
        total = shape.num_hidden_layers
        self.bi = np.array([np.nan if v is None else v for v in block_influence], dtype=float)
        free = [i for i in range(total) if i not in set(protected)]
        # unscored layers go last: a layer without a BI is never dropped before a scored one
        self.drop_order = sorted(free, key=lambda i: (np.isnan(self.bi[i]), self.bi[i], i))
        self.protected = sorted(protected)
        if importance is not None:
            self.mlp_curve = _kept_fraction_curve(importance.mlp)  # [L, I + 1]
            group = shape.num_attention_heads // shape.num_key_value_heads
            grouped = importance.heads.reshape(total, shape.num_key_value_heads, group)
            self.head_curve = _kept_fraction_curve(grouped).sum(1)  # [L, g + 1]
            self.hidden_curve = _kept_fraction_curve(importance.hidden)  # [H + 1]

    @property
    def group(self) -> int:
        return self.shape.num_attention_heads // self.shape.num_key_value_heads

    def params(self, layers: int, intermediate: int, per_group: int, hidden: int) -> int:
        return self.shape.with_widths(
            num_hidden_layers=layers,
            intermediate_size=intermediate,
            num_attention_heads=per_group * self.shape.num_key_value_heads,
            hidden_size=hidden,
        ).count()

    def _depth_kept(self, dropped: list[int]) -> float:
        known = np.nansum(self.bi)
        return 1.0 - float(np.nansum(self.bi[dropped]) / known) if known > 0 else 1.0

    def _candidate(self, dropped: list[int], i: int, g: int, h: int, target: int) -> _Candidate:
        kept_layers = [k for k in range(self.shape.num_hidden_layers) if k not in set(dropped)]
        kept = {"depth": self._depth_kept(dropped)}
        if self.importance is not None:
            kept["mlp"] = float(
                self.mlp_curve[kept_layers, i].sum() / self.mlp_curve[kept_layers, -1].sum()
            )
            kept["heads"] = float(
                self.head_curve[kept_layers, g].sum() / self.head_curve[kept_layers, -1].sum()
            )
            kept["hidden"] = float(self.hidden_curve[h] / self.hidden_curve[-1])
        params = self.params(len(kept_layers), i, g, h)
        assert params <= target
        return _Candidate(sorted(dropped), i, g, h, params, kept)

    def depth(self, target: int) -> _Candidate | str:
        """Fewest lowest-BI layers dropped so the full-width model fits."""
        s = self.shape
        for k in range(len(self.drop_order) + 1):
            layers = s.num_hidden_layers - k
            if self.params(layers, s.intermediate_size, self.group, s.hidden_size) <= target:
                return self._candidate(
                    self.drop_order[:k], s.intermediate_size, self.group, s.hidden_size, target
                )
        return (
            f"dropping every one of the {len(self.drop_order)} unprotected layers does not "
            "reach the budget"
        )

    def widths(self, target: int, drop: int) -> _Candidate | str:
        """Drop the `drop` lowest-BI layers, then cut hidden size and heads per KV group by the
        smallest common fraction c that fits, and fill the MLP width up to the budget."""
        if self.importance is None:
            return "no Minitron importance in the analysis"
        s = self.shape
        layers = s.num_hidden_layers - drop

        def shape_at(c: float) -> tuple[int, int, int]:
            i = _floor_multiple((1 - c) * s.intermediate_size, self.mlp_multiple)
            g = int(np.ceil((1 - c) * self.group - 1e-9))
            step = self.hidden_multiple
            if s.model_type in _HIDDEN_DIVIDES_HEADS:
                step = math.lcm(step, g * s.num_key_value_heads)
            h = _floor_multiple((1 - c) * s.hidden_size, step)
            return (s.intermediate_size if c == 0 else i), (s.hidden_size if c == 0 else h), g

        def fits(c: float) -> bool:
            i, h, g = shape_at(c)
            return min(i, h, g) >= 1 and self.params(layers, i, g, h) <= target

        if not fits(self.max_cut):
            return (
                f"with {drop} layers dropped, cutting every width by --max-cut "
                f"{self.max_cut:.0%} still exceeds the budget"
            )
        low, high = 0.0, self.max_cut  # fits(high) holds throughout
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        _, h, g = shape_at(high)
        base = self.params(layers, 0, g, h)
        slope = self.params(layers, 1, g, h) - base
        i = min(s.intermediate_size, int((target - base) // slope))
        if i < s.intermediate_size:
            i -= i % self.mlp_multiple
        return self._candidate(self.drop_order[:drop], i, g, h, target)


def _floor_multiple(value: float, multiple: int) -> int:
    return int(np.floor(value / multiple + 1e-9)) * multiple


def _entry(
    planner: BudgetPlanner, cand: _Candidate, rule: str, step: int, importance: Importance | None
) -> dict:
    s = planner.shape
    kept_layers = [k for k in range(s.num_hidden_layers) if k not in set(cand.dropped)]
    entry = {
        "rule": rule,
        "params": cand.params,
        "granularity": step,
        "widths": {
            "num_hidden_layers": len(kept_layers),
            "intermediate_size": cand.intermediate,
            "num_attention_heads": cand.per_group * s.num_key_value_heads,
            "num_key_value_heads": s.num_key_value_heads,
            "head_dim": s.head_dim,
            "hidden_size": cand.hidden,
        },
        "dropped_layers": cand.dropped,
        "kept_layers": kept_layers,
        "kept_importance": {**cand.kept, "product": cand.score},
        "mlp": None,
        "heads": None,
        "hidden": None,
    }
    if importance is None:
        return entry
    if cand.intermediate < s.intermediate_size:
        entry["mlp"] = {
            "layers": [
                {
                    "layer": layer,
                    "pruned": sorted(
                        np.argsort(importance.mlp[layer], kind="stable")[
                            : s.intermediate_size - cand.intermediate
                        ].tolist()
                    ),
                }
                for layer in kept_layers
            ]
        }
    if cand.per_group < planner.group:
        cut = planner.group - cand.per_group
        rows = []
        for layer in kept_layers:
            grouped = importance.heads[layer].reshape(s.num_key_value_heads, planner.group)
            pruned = [
                g * planner.group + int(h)
                for g in range(s.num_key_value_heads)
                for h in np.argsort(grouped[g], kind="stable")[:cut]
            ]
            rows.append({"layer": layer, "pruned": sorted(pruned)})
        entry["heads"] = {"layers": rows}
    if cand.hidden < s.hidden_size:
        order = np.argsort(importance.hidden, kind="stable")
        entry["hidden"] = {"pruned": sorted(order[: s.hidden_size - cand.hidden].tolist())}
    return entry


def _randomized(entry: dict, planner: BudgetPlanner, rng: np.random.Generator) -> dict:
    """The same shape with random layers (among the unprotected), neurons, heads, channels."""
    s = planner.shape
    out = dict(entry)
    dropped = sorted(
        rng.choice(planner.drop_order, len(entry["dropped_layers"]), replace=False).tolist()
    )
    kept_layers = [k for k in range(s.num_hidden_layers) if k not in set(dropped)]
    out.update(dropped_layers=dropped, kept_layers=kept_layers, kept_importance=None)
    out["rule"] = "the joint plan's widths and layer count, every choice drawn at random"
    if entry["mlp"]:
        cut = s.intermediate_size - entry["widths"]["intermediate_size"]
        out["mlp"] = {
            "layers": [
                {"layer": k, "pruned": sorted(rng.choice(s.intermediate_size, cut, False).tolist())}
                for k in kept_layers
            ]
        }
    if entry["heads"]:
        cut = planner.group - entry["widths"]["num_attention_heads"] // s.num_key_value_heads
        out["heads"] = {
            "layers": [
                {
                    "layer": k,
                    "pruned": sorted(
                        g * planner.group + int(h)
                        for g in range(s.num_key_value_heads)
                        for h in rng.choice(planner.group, cut, replace=False)
                    ),
                }
                for k in kept_layers
            ]
        }
    if entry["hidden"]:
        cut = s.hidden_size - entry["widths"]["hidden_size"]
        out["hidden"] = {"pruned": sorted(rng.choice(s.hidden_size, cut, False).tolist())}
    return out


def budget_plan(
    config: dict,
    metrics: dict,
    importance: Importance | str,
    target: int,
    *,
    mlp_multiple: int = DEFAULT_MULTIPLE,
    hidden_multiple: int = DEFAULT_HIDDEN_MULTIPLE,
    max_cut: float = DEFAULT_MAX_CUT,
    depth_share: float = DEFAULT_DEPTH_SHARE,
    seed: int = 0,
) -> dict:
    """The `budget` section of a plan: every strategy at `target` parameters."""
    shape = ModelShape.from_config(config)
    total = shape.count()
    if not 0 < target < total:
        raise BudgetError(
            f"the target must lie in 1..{total - 1} (the model has {total}), got {target}"
        )
    if metrics["layers"] != list(range(shape.num_hidden_layers)):
        raise BudgetError("a budget plan needs an analysis of shards that capture every layer")
    protected = sorted({p["layer"] for p in metrics["protected_layers"]})
    usable = importance if isinstance(importance, Importance) else None
    planner = BudgetPlanner(
        shape,
        metrics["block_influence"],
        protected,
        usable,
        mlp_multiple=mlp_multiple,
        hidden_multiple=hidden_multiple,
        max_cut=max_cut,
    )
    strategies: dict[str, dict] = {}
    layer_step = shape.per_layer()
    depth = planner.depth(target)
    if isinstance(depth, str):
        strategies["depth_only"] = strategies["last_layers"] = {"skipped": depth}
    else:
        strategies["depth_only"] = _entry(
            planner,
            depth,
            "the fewest lowest-BI unprotected layers dropped to fit",
            layer_step,
            usable,
        )
        k = len(depth.dropped)
        last = list(range(shape.num_hidden_layers - 1 - k, shape.num_hidden_layers - 1))
        if k and 0 in last:
            strategies["last_layers"] = {"skipped": "the budget would drop layer 0"}
        else:
            cand = planner._candidate(
                last, shape.intermediate_size, planner.group, shape.hidden_size, target
            )
            strategies["last_layers"] = _entry(
                planner,
                cand,
                "the last K layers before the final one (baseline)",
                layer_step,
                usable,
            )

    def mlp_step(cand: _Candidate) -> int:
        layers = shape.num_hidden_layers - len(cand.dropped)
        g, h = cand.per_group, cand.hidden
        return mlp_multiple * (planner.params(layers, 1, g, h) - planner.params(layers, 0, g, h))

    # joint: the depth share of the parameter cut goes to whole lowest-BI layers
    joint_drop = min(
        int(depth_share * (total - target) // layer_step),
        int(max_cut * len(planner.drop_order)),
    )
    for name, drop, rule in (
        (
            "width_only",
            0,
            "every layer kept; hidden size and heads per KV group cut by one common fraction, "
            "the MLP width filled up to the budget",
        ),
        (
            "joint",
            joint_drop,
            f"the {joint_drop} lowest-BI unprotected layers dropped (about {depth_share:.0%} "
            "of the cut), then the width_only rule on the rest",
        ),
    ):
        cand = planner.widths(target, drop)
        strategies[name] = (
            {"skipped": cand}
            if isinstance(cand, str)
            else _entry(planner, cand, rule, mlp_step(cand), usable)
        )
    if "skipped" in strategies["joint"]:
        strategies["random"] = {"skipped": "no joint plan to draw a random one like"}
    else:
        strategies["random"] = _randomized(
            strategies["joint"], planner, np.random.default_rng(seed)
        )
        strategies["random"]["seed"] = seed
    return {
        "target_params": target,
        "source_params": total,
        "source_breakdown": shape.breakdown(),
        "source_shape": {
            "num_hidden_layers": shape.num_hidden_layers,
            "intermediate_size": shape.intermediate_size,
            "num_attention_heads": shape.num_attention_heads,
            "num_key_value_heads": shape.num_key_value_heads,
            "head_dim": shape.head_dim,
            "hidden_size": shape.hidden_size,
        },
        "search": {
            "mlp_multiple": mlp_multiple,
            "hidden_multiple": hidden_multiple,
            "max_cut": max_cut,
            "depth_share": depth_share,
            "layer_drop_order": planner.drop_order,
            "protected_layers": protected,
        },
        "importance": None if usable else importance,
        "strategies": strategies,
    }
