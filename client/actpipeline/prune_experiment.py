"""`make experiment`: which pruning keeps SmolLM2's tour texts best, by layers and by budget?

One command, end to end on this machine: record SmolLM2 activations on the shipped Phase 1
prompts (the `make demo` flow with channel statistics, reused when its analysis exists),
`actclient analyze`, then two parts (`--part` picks one):
- layers: for every k in 2, 4, 6, 8 an `actclient plan --drop k`, and for every method (Block
  Influence, Gromov block, alternating layers, random layers with 3 seeds) a pruned checkpoint;
  random layers come from the layers the plan may drop (it protects the first and the last
  layer), so every method chooses from the same pool. Writes prune_experiment.{json,md,png}.
- budget: for every ratio in 0.85, 0.7 an `actclient plan --target-ratio R` and a checkpoint
  per budget strategy (depth_only, last_layers, width_only, joint, random with 3 seeds, and
  width_only with FLAP bias compensation): equal parameter counts, compared on the same texts.
  Writes budget_experiment.{json,md,png}.
Each model, the dense one first, is served by a stock vLLM (plain, compiled: one engine at a
time, no capture) and scored by `actclient evaluate` on the held-out tour texts, which no
recorded prompt mentions. Variants that drop the same layers are evaluated once. Nothing is
healed or distilled after pruning.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_activations.process import ServerProcess

if TYPE_CHECKING:
    from actclient.evaluate import ReferenceText

METHODS = ("block_influence", "gromov", "alternating")
DEFAULT_KS = (2, 4, 6, 8)
DEFAULT_RATIOS = (0.85, 0.7)
PARTS = ("layers", "budget")
# the budget strategies in table order; FLAP is width_only with bias compensation
FLAP = "width_only+flap"
BUDGET_ROWS = ("depth_only", "last_layers", "width_only", FLAP, "joint", "random")
DEFAULT_SEEDS = (0, 1, 2)
RANDOM = "random"
NEURONS = "mlp_neurons"  # the plan's MLP neuron pruning alone, no layer dropped
# Plain vLLM, a context the texts fit in, and engine and worker in the server's own process:
# each start then imports vLLM once, not three times. Compiled, not eager: on Intel CPUs with
# AMX, vLLM CPU's eager bfloat16 kernels die with SIGILL in this sandbox (worker exit -4,
# reproduced with stock vLLM and no plugin), while the compiled path runs.
PLAIN_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
SERVE_ARGS = (
    "--distributed-executor-backend",
    "uni",
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "1024",
    "--served-model-name",
    "model",
    "--gpu-memory-utilization",
    "0.15",
)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def record_and_analyze(work: Path, prompts: int, max_tokens: int) -> Path:
    """The analysis directory of a `make demo`-style recording (made once, then reused)."""
    from actpipeline import demo

    analysis = work / "record" / "analysis"
    if (analysis / "analysis.json").is_file():
        _log(f"reusing the recording and analysis in {analysis.parent}")
        return analysis
    code = demo.main(
        ["--out", str(work / "record"), "--prompts", str(prompts), "--max-tokens", str(max_tokens)]
    )
    if code or not (analysis / "analysis.json").is_file():
        raise RuntimeError(f"recording or analysis failed (exit {code}); see {work / 'record'}")
    return analysis


def random_drop(pool: list[int], k: int, seed: int) -> list[int]:
    """k layers from `pool`, reproducible from (seed, k)."""
    return sorted(random.Random(f"{seed}:{k}").sample(pool, k))


def variants(plans: dict[int, dict], seeds: tuple[int, ...]) -> list[dict]:
    """Every (method, k, seed) to evaluate, with the layers it drops."""
    out = []
    for k, plan in plans.items():
        strategies = plan["layers"]["strategies"]
        for method in METHODS:
            entry = strategies[method]
            if "skipped" in entry:
                _log(f"k={k} {method}: skipped by the plan ({entry['skipped']})")
                continue
            dropped = sorted(d["layer"] for d in entry["dropped"])
            out.append({"method": method, "k": k, "seed": None, "dropped": dropped})
        protected = set(plan["layers"]["protected"])
        pool = [i for i in range(plan["layers"]["num_layers"]) if i not in protected]
        for seed in seeds:
            dropped = random_drop(pool, k, seed)
            out.append({"method": RANDOM, "k": k, "seed": seed, "dropped": dropped})
    first = next(iter(plans.values()))
    if "mlp" in first.get("neurons", {}):
        out.append({"method": NEURONS, "k": 0, "seed": None, "dropped": []})
    return out


def budget_variants(plans: dict[float, dict[int, dict]]) -> list[dict]:
    """Every (strategy, ratio, seed) of budget plans {ratio: {seed: plan}}: each strategy from
    the first seed's plan, `random` from every seed's, FLAP as width_only with compensation."""
    out = []
    for ratio, by_seed in plans.items():
        first = next(iter(by_seed.values()))
        for name in BUDGET_ROWS:
            strategy = "width_only" if name == FLAP else name
            sources = by_seed.items() if name == RANDOM else [(None, first)]
            for seed, plan in sources:
                entry = plan["budget"]["strategies"][strategy]
                if "skipped" in entry:
                    _log(f"ratio {ratio} {name}: skipped by the plan ({entry['skipped']})")
                    continue
                out.append(
                    {
                        "method": name,
                        "strategy": strategy,
                        "ratio": ratio,
                        "seed": seed,
                        "target_params": plan["budget"]["target_params"],
                        "params": entry["params"],
                        "widths": entry["widths"],
                        "dropped": entry["dropped_layers"],
                        "bias_compensation": name == FLAP,
                    }
                )
    return out


def serve_and_evaluate(
    model: Path, workdir: Path, texts: Sequence[ReferenceText], reference: dict | None
) -> dict:
    """Start a plain vLLM on `model`, score the texts, stop it; the evaluate result."""
    from actclient.evaluate import evaluate

    server = ServerProcess(model, workdir, SERVE_ARGS, plain=True, env=PLAIN_ENV)
    try:
        server.wait_ready()
        return evaluate(server.url, texts, api_key=server.api_key, reference=reference)
    except Exception:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()


def _row(variant: dict, result: dict) -> dict:
    comparison = result.get("comparison", {})
    return {
        **variant,
        "summary": result["summary"],
        "per_text_perplexity": {t["id"]: t["perplexity"] for t in result["per_text"]},
        "mean_perplexity_ratio": comparison.get("mean_perplexity_ratio", 1.0),
        "factual_mean_surprisal_ratio": comparison.get("factual_mean_surprisal_ratio", 1.0),
        "factual_max_surprisal_ratio": comparison.get("factual_max_surprisal_ratio", 1.0),
        "pass": comparison.get("pass", True),
        "rules": comparison.get("rules"),
    }


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Record and analyze, evaluate the dense model, then each part in `args.part`."""
    from actclient.evaluate import load_texts
    from vllm_activations import embedded

    started = time.monotonic()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = embedded.smollm2()
    texts = load_texts(args.texts)

    t = time.monotonic()
    analysis = record_and_analyze(work, args.prompts, args.max_tokens)
    shared = {"record_and_analyze_s": time.monotonic() - t}

    t = time.monotonic()
    _log(f"dense {model.name}: serving and evaluating {len(texts)} texts")
    dense = serve_and_evaluate(model, work / "servers" / "dense", texts, None)
    (work / "eval").mkdir(exist_ok=True)
    (work / "eval" / "dense.json").write_text(json.dumps(dense, indent=1) + "\n")
    shared["dense_evaluate_s"] = time.monotonic() - t
    common = {
        "model": Path(model).name,  # names only: results are committed, machine paths are not
        "texts": Path(args.texts).name,
        "num_texts": len(texts),
        "recorded_prompts": args.prompts,
        "seeds": list(args.seeds),
        "serve_args": list(SERVE_ARGS),
    }
    parts = PARTS if args.part == "all" else (args.part,)
    results = {}
    for part in parts:
        t = time.monotonic()
        go = run_layers if part == "layers" else run_budget
        results[part] = {**common, **go(args, work, model, analysis, texts, dense)}
        timings = {**shared, "evaluate_s": time.monotonic() - t}
        timings["total_s"] = timings["record_and_analyze_s"] + timings["dense_evaluate_s"]
        timings["total_s"] += timings["evaluate_s"]
        results[part]["timings"] = timings
    _log(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return results


def _evaluate_pruned(
    name: str, pruned: Path, work: Path, texts: Sequence[ReferenceText], dense: dict, keep: bool
) -> dict:
    result = serve_and_evaluate(pruned, work / "servers" / name, texts, dense)
    (work / "eval" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not keep:
        shutil.rmtree(pruned)
    return result


def _log_row(row: dict) -> None:
    _log(
        f"    mean ppl x{row['mean_perplexity_ratio']:.3f}, factual surprisal "
        f"x{row['factual_mean_surprisal_ratio']:.3f}, {'PASS' if row['pass'] else 'FAIL'}"
    )


def run_layers(
    args: argparse.Namespace,
    work: Path,
    model: Path,
    analysis: Path,
    texts: Sequence[ReferenceText],
    dense: dict,
) -> dict:
    """The layer-deletion part: every method and k, rows with the dense row first."""
    from actclient.analysis.plan import make_plan
    from actclient.prune import (
        LayerSelection,
        layers_from_plan,
        neurons_from_plan,
        prune_checkpoint,
    )

    plans = {}
    for k in args.k:
        plans[k] = make_plan(analysis, drop=k, model_dir=model)
        (work / "plans").mkdir(exist_ok=True)
        (work / "plans" / f"drop{k}.json").write_text(json.dumps(plans[k], indent=1) + "\n")
    todo = variants(plans, tuple(args.seeds))
    rows = [_row({"method": "dense", "k": 0, "seed": None, "dropped": []}, dense)]
    done: dict[tuple[int, ...], dict] = {}
    for n, variant in enumerate(todo, 1):
        key = (variant["method"],) if variant["method"] == NEURONS else tuple(variant["dropped"])
        name = f"{variant['method']}-k{variant['k']}" + (
            f"-s{variant['seed']}" if variant["seed"] is not None else ""
        )
        if key in done:
            _log(f"[{n}/{len(todo)}] {name}: drops {list(key)} like an earlier variant")
            rows.append(_row(variant, done[key]))
            continue
        what = "MLP neurons" if variant["method"] == NEURONS else f"layers {list(key)}"
        _log(f"[{n}/{len(todo)}] {name}: pruning {what}")
        pruned = work / "models" / name
        if pruned.exists():
            shutil.rmtree(pruned)
        neurons = None
        if variant["method"] == RANDOM:
            selection = LayerSelection(
                variant["dropped"], {"rule": f"random layers, seed {variant['seed']}"}
            )
        elif variant["method"] == NEURONS:
            selection = LayerSelection([], {"rule": "no layer dropped"})
            k = args.k[0]
            neurons = neurons_from_plan(plans[k], work / "plans" / f"drop{k}.json")
            variant["intermediate_size"] = neurons.width
        else:
            selection = layers_from_plan(
                plans[variant["k"]], variant["method"], work / "plans" / f"drop{variant['k']}.json"
            )
        prune_checkpoint(model, pruned, selection, neurons)
        done[key] = _evaluate_pruned(name, pruned, work, texts, dense, args.keep_models)
        rows.append(_row(variant, done[key]))
        _log_row(rows[-1])
    return {
        "schema": "vllm_activations.prune_experiment/1",
        "model_layers": plans[args.k[0]]["layers"]["num_layers"],
        "protected_layers": plans[args.k[0]]["layers"]["protected"],
        "ks": list(args.k),
        "rows": rows,
    }


def run_budget(
    args: argparse.Namespace,
    work: Path,
    model: Path,
    analysis: Path,
    texts: Sequence[ReferenceText],
    dense: dict,
) -> dict:
    """The budget part: every strategy at every ratio, rows with the dense row first."""
    from actclient.analysis.plan import make_budget_plan
    from actclient.prune import ChannelMeans, budget_strategy, prune_checkpoint

    plans: dict[float, dict[int, dict]] = {}
    (work / "plans").mkdir(exist_ok=True)
    for ratio in args.ratios:
        plans[ratio] = {}
        for seed in args.seeds:
            plan = make_budget_plan(analysis, target_ratio=ratio, model_dir=model, seed=seed)
            path = work / "plans" / f"budget{ratio}-s{seed}.json"
            path.write_text(json.dumps(plan, indent=1) + "\n")
            plans[ratio][seed] = plan
    first = plans[args.ratios[0]][args.seeds[0]]["budget"]
    todo = budget_variants(plans)
    means = ChannelMeans.load(analysis)
    rows = [_row({"method": "dense", "ratio": 1.0, "seed": None, "dropped": []}, dense)]
    rows[0]["params"] = first["source_params"]
    for n, variant in enumerate(todo, 1):
        seed = variant["seed"] if variant["seed"] is not None else args.seeds[0]
        name = f"{variant['method']}-r{variant['ratio']}" + (
            f"-s{variant['seed']}" if variant["seed"] is not None else ""
        )
        w = variant["widths"]
        _log(
            f"[{n}/{len(todo)}] {name}: {variant['params']:,} params, layers "
            f"{w['num_hidden_layers']}, MLP {w['intermediate_size']}, heads "
            f"{w['num_attention_heads']}, hidden {w['hidden_size']}"
        )
        plan_path = work / "plans" / f"budget{variant['ratio']}-s{seed}.json"
        layers, widths = budget_strategy(
            plans[variant["ratio"]][seed], variant["strategy"], plan_path
        )
        pruned = work / "models" / name.replace("+", "-")
        if pruned.exists():
            shutil.rmtree(pruned)
        prune_checkpoint(
            model,
            pruned,
            layers,
            widths=widths,
            bias_compensation=means if variant["bias_compensation"] else None,
        )
        result = _evaluate_pruned(name, pruned, work, texts, dense, args.keep_models)
        rows.append(_row(variant, result))
        _log_row(rows[-1])
    return {
        "schema": "vllm_activations.budget_experiment/1",
        "source_params": first["source_params"],
        "source_shape": first["source_shape"],
        "ratios": list(args.ratios),
        "search": {k: v for k, v in first["search"].items() if k != "layer_drop_order"},
        "rows": rows,
    }


_RULE_OF = {"mean_perplexity_ratio": "perplexity", "factual_mean_surprisal_ratio": "factual"}


def _passes(row: dict, key: str) -> bool:
    """Whether a row passes the rule behind `key`; a catastrophic text fails perplexity."""
    if row["rules"] is None:
        return True
    ok = row["rules"][_RULE_OF[key]]["pass"]
    return ok and not (key == "mean_perplexity_ratio" and row["summary"]["catastrophic"])


def _cell(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    if not values:
        return "-"
    passed = sum(_passes(r, key) for r in rows)
    if len(values) == 1:
        return _num(values[0]) + ("" if passed else " ✗")
    mean = sum(values) / len(values)
    return f"{_num(mean)} [{_num(min(values))}-{_num(max(values))}] ({passed}/{len(rows)} pass)"


def _num(x: float) -> str:
    """Two decimals; a catastrophic ratio (perplexity x1e8) in three significant digits."""
    return f"{x:.2f}" if x < 1000 else f"{x:.3g}"


def markdown(results: dict) -> str:
    """Tables: mean-perplexity ratio and factual-surprisal ratio by method and k."""
    rows = results["rows"]
    dense = rows[0]["summary"]
    methods = [*METHODS, RANDOM]
    ks = results["ks"]
    lines = [
        f"SmolLM2-135M-Instruct ({results['model_layers']} layers, bf16), "
        f"{results['num_texts']} held-out tour texts ({dense['tokens']} scored tokens). Dense: "
        f"mean perplexity {dense['mean_perplexity']:.2f}, factual-token surprisal "
        f"{dense['factual_mean_surprisal']:.3f} nats (mean over {dense['factual_tokens']} "
        f"tokens), max {dense['factual_max_surprisal']:.2f}.",
        "",
    ]
    for key, title in (
        ("mean_perplexity_ratio", "Mean perplexity, ratio to dense (pass: at most 1.20)"),
        ("factual_mean_surprisal_ratio", "Factual-token surprisal, ratio to dense (pass: < 2)"),
    ):
        lines += [f"**{title}**", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |"]
        lines.append("|---|" + "---|" * len(ks))
        for method in methods:
            cells = [_cell([r for r in rows if r["method"] == method and r["k"] == k], key)
                     for k in ks]  # fmt: skip
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "✗: fails that rule (a text above perplexity 1000 fails the perplexity rule too). "
        f"Random: mean [min-max] over seeds {', '.join(map(str, results['seeds']))}."
    )
    for r in rows:
        if r["method"] == NEURONS:
            verdict = "passes" if r["pass"] else "fails"
            lines += [
                "",
                f"MLP neurons only (the plan's Wanda-sp neuron pruning, no layer dropped, "
                f"intermediate_size {r['intermediate_size']}): mean perplexity "
                f"x{r['mean_perplexity_ratio']:.2f}, factual-token surprisal "
                f"x{r['factual_mean_surprisal_ratio']:.2f}; {verdict} the rules.",
            ]
    lines += ["", "Dropped layers:", ""]
    for r in rows[1:]:
        if r["method"] == NEURONS:
            continue
        seed = f" seed {r['seed']}" if r["seed"] is not None else ""
        catastrophic = r["summary"]["catastrophic"]
        lines.append(
            f"- k={r['k']} {r['method']}{seed}: {r['dropped']}"
            + (f"; catastrophic texts: {len(catastrophic)}" if catastrophic else "")
        )
    t = results["timings"]
    lines += [
        "",
        f"Wall time: {t['total_s'] / 60:.1f} min (recording and analysis "
        f"{t['record_and_analyze_s'] / 60:.1f} min, pruning and evaluation "
        f"{t['evaluate_s'] / 60:.1f} min).",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path | None:
    """Ratio to dense against k per method; random as the seed mean with its min-max band."""
    from actclient.analysis.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import ScalarFormatter

    rows = results["rows"]
    ks = results["ks"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("mean_perplexity_ratio", "mean perplexity / dense", 1.2),
        ("factual_mean_surprisal_ratio", "factual-token surprisal / dense", 2.0),
    )
    for ax, (key, label, limit) in zip(axes, panels, strict=True):
        for method in METHODS:
            points = [(r["k"], r[key]) for r in rows if r["method"] == method]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        by_k = {k: [r[key] for r in rows if r["method"] == RANDOM and r["k"] == k] for k in ks}
        present = [k for k in ks if by_k[k]]
        mean = [sum(by_k[k]) / len(by_k[k]) for k in present]
        ax.plot(present, mean, color="grey", linestyle="--", marker="s", label="random (mean)")
        ax.fill_between(
            present,
            [min(by_k[k]) for k in present],
            [max(by_k[k]) for k in present],
            color="grey",
            alpha=0.25,
            label="random (min-max)",
        )
        ax.axhline(limit, color="red", linewidth=0.8, linestyle=":", label=f"pass limit {limit:g}")
        if key == "mean_perplexity_ratio":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(ks)
        ax.set_xlabel("layers dropped (of 30)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: layer deletion on held-out tour texts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def budget_markdown(results: dict) -> str:
    """Tables: perplexity and factual-surprisal ratios by strategy and budget, and the shapes."""
    rows = results["rows"]
    dense = rows[0]["summary"]
    ratios = results["ratios"]
    head = "| strategy | " + " | ".join(f"{r:g} of the parameters" for r in ratios) + " |"
    lines = [
        f"SmolLM2-135M-Instruct ({results['source_params']:,} parameters, bf16), "
        f"{results['num_texts']} held-out tour texts ({dense['tokens']} scored tokens), no "
        f"healing. Dense: mean perplexity {dense['mean_perplexity']:.2f}, factual-token "
        f"surprisal {dense['factual_mean_surprisal']:.3f} nats.",
        "",
    ]
    for key, title in (
        ("mean_perplexity_ratio", "Mean perplexity, ratio to dense (pass: at most 1.20)"),
        ("factual_mean_surprisal_ratio", "Factual-token surprisal, ratio to dense (pass: < 2)"),
    ):
        lines += [f"**{title}**", "", head, "|---|" + "---|" * len(ratios)]
        for method in BUDGET_ROWS:
            cells = [_cell([r for r in rows if r["method"] == method and r["ratio"] == ratio], key)
                     for ratio in ratios]  # fmt: skip
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "✗: fails that rule (a text above perplexity 1000 fails the perplexity rule too). "
        f"Random: mean [min-max] over seeds {', '.join(map(str, results['seeds']))}. "
        f"{FLAP}: width_only with FLAP bias compensation (`prune --bias-compensation`).",
        "",
        "Shapes (source: layers {num_hidden_layers}, MLP {intermediate_size}, heads "
        "{num_attention_heads}, hidden {hidden_size}):".format(**results["source_shape"]),
        "",
        "| budget | strategy | parameters | layers | MLP | heads | hidden | dropped layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        if r["method"] == RANDOM and r["seed"] != results["seeds"][0]:
            continue
        w = r["widths"]
        lines.append(
            f"| {r['ratio']:g} | {r['method']} | {r['params']:,} | {w['num_hidden_layers']} | "
            f"{w['intermediate_size']} | {w['num_attention_heads']} | {w['hidden_size']} | "
            f"{r['dropped'] if r['method'] != RANDOM else 'random'} |"
        )
    t = results["timings"]
    lines += [
        "",
        f"Wall time: {t['total_s'] / 60:.1f} min (recording and analysis "
        f"{t['record_and_analyze_s'] / 60:.1f} min, dense evaluation "
        f"{t['dense_evaluate_s'] / 60:.1f} min, pruning and evaluation "
        f"{t['evaluate_s'] / 60:.1f} min).",
    ]
    return "\n".join(lines) + "\n"


def budget_plot(results: dict, path: Path) -> Path | None:
    """Ratio to dense against the parameter fraction per strategy; random: mean and range."""
    from actclient.analysis.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    rows = results["rows"][1:]
    ratios = results["ratios"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("mean_perplexity_ratio", "mean perplexity / dense", 1.2),
        ("factual_mean_surprisal_ratio", "factual-token surprisal / dense", 2.0),
    )
    for ax, (key, label, limit) in zip(axes, panels, strict=True):
        for method in BUDGET_ROWS:
            by = {q: [r[key] for r in rows if r["method"] == method and r["ratio"] == q]
                  for q in ratios}  # fmt: skip
            present = [q for q in ratios if by[q]]
            if not present:
                continue
            mean = [sum(by[q]) / len(by[q]) for q in present]
            style = {"color": "grey", "linestyle": "--"} if method == RANDOM else {}
            ax.plot(present, mean, marker="o", label=method, **style)
            if method == RANDOM:
                low, high = [min(by[q]) for q in present], [max(by[q]) for q in present]
                ax.fill_between(present, low, high, color="grey", alpha=0.25)
        ax.axhline(limit, color="red", linewidth=0.8, linestyle=":", label=f"pass limit {limit:g}")
        if key == "mean_perplexity_ratio":
            ax.set_yscale("log")  # catastrophic models reach x1e9: powers of ten
        ax.set_xticks(ratios)
        ax.invert_xaxis()
        ax.set_xlabel("parameters kept (fraction of the dense model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: pruning strategies at equal parameter budgets, no healing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_WRITERS = {"layers": ("prune_experiment", markdown, plot),
            "budget": ("budget_experiment", budget_markdown, budget_plot)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from actclient.evaluate import DEFAULT_TEXTS

    parser = argparse.ArgumentParser(prog="python -m actpipeline.prune_experiment")
    parser.add_argument("--work", default="experiment-out", help="scratch dir")
    parser.add_argument("--results", default="docs/results", help="where the results go")
    parser.add_argument("--texts", default=str(DEFAULT_TEXTS), help="held-out texts (JSONL)")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--prompts", type=int, default=12, help="Phase 1 prompts to record")
    parser.add_argument("--max-tokens", type=int, default=64, help="generated per prompt")
    parser.add_argument("--keep-models", action="store_true", help="keep pruned checkpoints")
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="budget part"
    )
    parser.add_argument("--part", choices=("all", *PARTS), default="all")
    args = parser.parse_args(argv)

    results = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    for part, result in results.items():
        name, table_of, plot_of = _WRITERS[part]
        stem = out / name
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        table = table_of(result)
        stem.with_suffix(".md").write_text(table)
        picture = plot_of(result, stem.with_suffix(".png"))
        print("\n" + table)
        print(f"results: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}, {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
