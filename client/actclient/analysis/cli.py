"""The `actclient analyze` and `actclient plan` commands.

`register(subparsers)` adds both to the top-level parser; each sets `func(args) -> int`:
0 done, 2 bad input (the message on stderr says what to change).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actclient.analysis.analyze import AnalysisError, analyze, default_jobs
from actclient.analysis.budget import (
    DEFAULT_DEPTH_SHARE,
    DEFAULT_HIDDEN_MULTIPLE,
    DEFAULT_MAX_CUT,
    DEFAULT_MULTIPLE,
)
from actclient.analysis.embedding import ModelFilesError
from actclient.analysis.plan import HEAD_RULES, PlanError, make_budget_plan, make_plan
from actclient.analysis.stats import MassiveRule
from vllm_activations.contract.shard import ShardError

PLAN_DESCRIPTION = """\
Write a JSON pruning plan.

Layer plans (--target-layers / --drop): layers by block influence, Gromov block, alternating
and U-shaped baselines; neurons and heads (Wanda-sp) from the channel statistics.

Budget plans (--target-params / --target-ratio, need the model's config.json: --model or the
analysis's model): one complete shape per strategy, its parameter count computed exactly from
the config (embeddings tied or not, norms, Qwen3 q/k norms, biases) and at or below the budget:
  depth_only   the fewest lowest-BI unprotected layers dropped, widths kept
  last_layers  as many layers, the last ones before the final layer (baseline)
  width_only   every layer kept; MLP width, query heads per KV group and hidden size
  joint        --depth-share of the cut as lowest-BI layers, the width rule on the rest
  random       the joint shape with layers, neurons, heads and channels drawn at random
Width rule: hidden size (multiples of --hidden-multiple), query heads per KV group (rounded
up; every KV head kept) and MLP width (multiples of --mlp-multiple) are cut by the smallest
common fraction (at most --max-cut) that fits, found by bisection; then the MLP width is
raised to the largest multiple that still fits. Which channels go is Minitron importance (per
request mean |x|, L2 over requests: MLP neurons from the down_proj input, heads from the o_proj
input ranked within KV groups, hidden channels from both RMSNorm outputs summed over layers).
Granularity: a depth plan lands within one layer's parameters under the budget, a width plan
within one MLP step (--mlp-multiple neurons in every kept layer) unless the MLP is already at
full width (then within one hidden step); each entry states its step.
Limits: the shapes come from fixed rules (no search over quality), one shot (no re-scoring
after a cut), widths uniform across layers, RMSNorm over the kept hidden channels only (no
rescaling); kept_importance is a diagnostic, not a loss: score the pruned models.
"""


def _ids(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--special-tokens takes comma-separated token ids, got {value!r}"
        ) from exc


def _fraction(value: str) -> float:
    x = float(value)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1) is needed, got {value}")
    return x


def _jobs(value: str) -> int:
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(
            f"--jobs takes a positive number of processes, got {value!r}"
        )
    return jobs


def _analyze(args: argparse.Namespace) -> int:
    try:
        analysis = analyze(
            args.shards_dir,
            args.out,
            args.model,
            special_ids=args.special_tokens,
            rule=MassiveRule(threshold=args.massive_threshold, ratio=args.massive_ratio),
            pictures=not args.no_pictures,
            progress=not args.no_progress,
            jobs=args.jobs,
            skip_bad_shards=args.skip_bad_shards,
            force=args.force,
        )
    except (AnalysisError, ShardError, ModelFilesError, OSError) as exc:
        print(f"analyze: {exc}", file=sys.stderr)
        return 2
    flagged = [e["layer"] for e in analysis["redundant_layers"]]
    skipped = analysis["skipped_shards"]
    print(
        f"analyze: {analysis['num_shards']} shards, {analysis['tokens']['all']} tokens; "
        f"redundant layers {flagged or 'none'}"
        + (f"; skipped {len(skipped)} bad shards (listed in the report)" if skipped else ""),
        file=sys.stderr,
    )
    print(f"analyze: report at {Path(args.out) / 'report.md'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    budget = args.target_params is not None or args.target_ratio is not None
    try:
        if budget:
            plan = make_budget_plan(
                args.analysis,
                target_params=args.target_params,
                target_ratio=args.target_ratio,
                model_dir=args.model,
                tokens=args.tokens,
                mlp_multiple=args.mlp_multiple,
                hidden_multiple=args.hidden_multiple,
                max_cut=args.max_cut,
                depth_share=args.depth_share,
                seed=args.seed,
            )
        else:
            plan = make_plan(
                args.analysis,
                target_layers=args.target_layers,
                drop=args.drop,
                model_dir=args.model,
                tokens=args.tokens,
                mlp_fraction=args.mlp_fraction,
                head_fraction=args.head_fraction,
                head_rule=args.head_rule,
            )
    except (PlanError, ModelFilesError, OSError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(plan, indent=1) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        summary = _budget_summary(plan["budget"]) if budget else _layer_summary(plan)
        print(summary, file=sys.stderr)
        print(f"plan: written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _table(header: list[str], rows: list[list[object]]) -> str:
    """Columns padded to their widest cell, numbers right-aligned, two spaces between."""
    cells = [header] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    numeric = [all(isinstance(r[i], int) for r in rows if r[i] != "") for i in range(len(header))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ).rstrip()
        for r in cells
    ]
    return "\n".join("  " + line for line in lines)


def _layers(layers: list[int]) -> str:
    return ", ".join(str(i) for i in layers) or "none"


def _layer_summary(plan: dict) -> str:
    layers = plan["layers"]
    lines = [
        f"plan: {layers['num_layers']} -> {layers['num_layers_after']} layers "
        f"(drop {layers['drop']}; protected {_layers(layers['protected'])})",
        _table(
            ["strategy", "dropped layers"],
            [
                [
                    name,
                    _layers([d["layer"] for d in e["dropped"]])
                    if "dropped" in e
                    else f"skipped: {e.get('skipped')}",
                ]
                for name, e in layers["strategies"].items()
            ],
        ),  # fmt: skip
    ]
    neurons = plan.get("neurons", {})
    before = {
        "num_hidden_layers": layers["num_layers"],
        "intermediate_size": neurons.get("mlp", {}).get("intermediate_size_before"),
        "num_attention_heads": neurons.get("heads", {}).get("num_attention_heads_before"),
        "num_key_value_heads": neurons.get("heads", {}).get("num_key_value_heads_before"),
    }
    rows = [[key, before.get(key, after), after] for key, after in plan["widths"].items()]
    lines.append(_table(["width", "before", "after"], rows))
    return "\n".join(lines)


def _budget_summary(budget: dict) -> str:
    target, source = budget["target_params"], budget["source_params"]
    rows, skipped = [], []
    for name, e in budget["strategies"].items():
        if "skipped" in e:
            skipped.append(f"plan: {name}: skipped: {e['skipped']}")
            continue
        w = e["widths"]
        rows.append(
            [name, e["params"], target - e["params"], e["granularity"], w["num_hidden_layers"],
             _layers(e["dropped_layers"]), w["intermediate_size"],
             f"{w['num_attention_heads']}/{w['num_key_value_heads']}", w["hidden_size"]]
        )  # fmt: skip
    shape = budget["source_shape"]
    rows.insert(
        0,
        ["(source)", source, "", "", shape["num_hidden_layers"], "", shape["intermediate_size"],
         f"{shape['num_attention_heads']}/{shape['num_key_value_heads']}", shape["hidden_size"]],
    )  # fmt: skip
    header = ["strategy", "params", "under", "step", "layers", "dropped", "mlp", "heads/kv",
              "hidden"]  # fmt: skip
    lines = [f"plan: budget {target:,} of {source:,} parameters", _table(header, rows)]
    return "\n".join(lines + skipped)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `analyze` and `plan` to the top-level `actclient` parser."""
    p = subparsers.add_parser(
        "analyze",
        help="layer similarity, statistics and redundant layers of a shard directory",
        description="Stream activation shards into analysis.json, arrays/*.npy, PNGs and "
        "report.md (read report.md first).",
    )
    p.add_argument("shards_dir", metavar="SHARDS_DIR", help="directory of *.h5 shards")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--model",
        metavar="DIR",
        help="HF model dir with safetensors: rebuilds the "
        "embedding (layer 0's input) and reads the special tokens",
    )
    p.add_argument(
        "--special-tokens",
        type=_ids,
        metavar="IDS",
        help="comma-separated token "
        "ids excluded from content tokens (default: the model's special tokens)",
    )
    p.add_argument(
        "--massive-threshold",
        type=float,
        default=MassiveRule.threshold,
        help="absolute |x| a massive activation exceeds (default %(default)s)",
    )
    p.add_argument(
        "--massive-ratio",
        type=float,
        default=MassiveRule.ratio,
        help="times the token's median |x| it exceeds (default %(default)s)",
    )
    p.add_argument("--no-pictures", action="store_true", help="skip the PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a TTY")
    p.add_argument(
        "--jobs",
        type=_jobs,
        default=default_jobs(),
        metavar="N",
        help="worker processes sharing the shards (default: every core, %(default)s here)",
    )
    p.add_argument(
        "--skip-bad-shards",
        action="store_true",
        help="go on past shards that cannot be read and list them in the report "
        "(default: the first one stops the analysis)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier analysis in a non-empty --out (nothing of it is kept)",
    )
    p.set_defaults(func=_analyze)

    q = subparsers.add_parser(
        "plan",
        help="layer and neuron pruning plans, or whole shapes under a parameter budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=PLAN_DESCRIPTION,
    )
    q.add_argument("analysis", metavar="ANALYSIS", help="analysis dir or analysis.json")
    size = q.add_mutually_exclusive_group(required=True)
    size.add_argument("--target-layers", type=int, metavar="N", help="layers to keep")
    size.add_argument("--drop", type=int, metavar="K", help="layers to drop")
    size.add_argument(
        "--target-params",
        type=int,
        metavar="N",
        help="budget: at most N parameters, counted from the model's config.json",
    )
    size.add_argument(
        "--target-ratio",
        type=float,
        metavar="R",
        help="budget: at most R (0..1) times the model's parameter count",
    )
    q.add_argument(
        "--model",
        metavar="DIR",
        help="HF model dir: Wanda-style scores from the "
        "down_proj / o_proj weights (default: the analysis's model, else "
        "activation-only)",
    )
    q.add_argument("-o", "--out", metavar="PATH", help="write the plan here (default: stdout)")
    q.add_argument(
        "--tokens",
        choices=("all", "content", "last"),
        default="all",
        help="token population whose scores rank layers (default %(default)s)",
    )
    q.add_argument(
        "--mlp-fraction",
        type=_fraction,
        default=0.2,
        help="fraction of MLP neurons to prune per layer (default %(default)s)",
    )
    q.add_argument(
        "--head-fraction",
        type=_fraction,
        default=0.25,
        help="fraction of attention heads (or KV groups) to prune (default %(default)s)",
    )
    q.add_argument(
        "--head-rule",
        choices=HEAD_RULES,
        default="per-group",
        help="per-group: equal query heads from every KV group; whole-groups: "
        "whole KV groups (default %(default)s)",
    )
    q.add_argument(
        "--mlp-multiple",
        type=int,
        default=DEFAULT_MULTIPLE,
        metavar="M",
        help="budget: MLP widths on multiples of M (default %(default)s)",
    )
    q.add_argument(
        "--hidden-multiple",
        type=int,
        default=DEFAULT_HIDDEN_MULTIPLE,
        metavar="M",
        help="budget: hidden sizes on multiples of M, and for Llama of the head count "
        "(default %(default)s)",
    )
    q.add_argument(
        "--max-cut",
        type=_fraction,
        default=DEFAULT_MAX_CUT,
        metavar="F",
        help="budget: the largest fraction any width axis (and the joint plan's depth) loses "
        "(default %(default)s)",
    )
    q.add_argument(
        "--depth-share",
        type=_fraction,
        default=DEFAULT_DEPTH_SHARE,
        metavar="F",
        help="budget: share of the parameter cut the joint plan takes as whole layers "
        "(default %(default)s)",
    )
    q.add_argument(
        "--seed", type=int, default=0, help="budget: seed of the random baseline (default 0)"
    )
    q.set_defaults(func=_plan)
