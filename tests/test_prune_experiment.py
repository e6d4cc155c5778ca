"""The experiment's bookkeeping without engines: which variants, the tables, the plots."""

from __future__ import annotations

from pathlib import Path

from actclient.analysis.budget import BUDGET_STRATEGIES
from actpipeline.prune_experiment import (
    BUDGET_ROWS,
    FLAP,
    NEURONS,
    RANDOM,
    budget_markdown,
    budget_plot,
    budget_variants,
    markdown,
    plot,
    variants,
)


def _plan(k: int) -> dict:
    dropped = [{"layer": i} for i in range(10, 10 + k)]
    return {
        "layers": {
            "num_layers": 30,
            "protected": [0, 1, 29],
            "strategies": {
                "block_influence": {"dropped": dropped},
                "gromov": {"dropped": dropped},
                "alternating": {"skipped": "test"},
            },
        },
        "neurons": {"mlp": {"layers": []}},
    }


def test_variants_cover_methods_seeds_and_neurons() -> None:
    todo = variants({2: _plan(2), 4: _plan(4)}, (0, 1, 2))
    methods = [(v["method"], v["k"]) for v in todo]
    assert ("block_influence", 4) in methods and ("alternating", 2) not in methods
    randoms = [v for v in todo if v["method"] == RANDOM]
    assert len(randoms) == 6
    for v in randoms:
        assert len(set(v["dropped"])) == v["k"] and not {0, 1, 29} & set(v["dropped"])
    assert randoms == [v for v in variants({2: _plan(2), 4: _plan(4)}, (0, 1, 2)) if v in randoms]
    assert todo[-1]["method"] == NEURONS


def test_tables_and_plot(tmp_path: Path) -> None:
    def row(method: str, k: int, ratio: float, seed: int | None = None) -> dict:
        ok = ratio <= 1.2
        return {
            "method": method,
            "k": k,
            "seed": seed,
            "dropped": list(range(k)),
            "summary": {"catastrophic": [] if ratio < 100 else ["a"], "tokens": 10,
                        "mean_perplexity": 10 * ratio, "factual_mean_surprisal": 2.0,
                        "factual_tokens": 3, "factual_max_surprisal": 9.0},
            "mean_perplexity_ratio": ratio,
            "factual_mean_surprisal_ratio": 1.5,
            "pass": ok,
            "rules": {"perplexity": {"pass": ok}, "factual": {"pass": True}},
        }  # fmt: skip

    rows = [row("dense", 0, 1.0)]
    for k in (2, 4):
        rows += [row("block_influence", k, 1.1 * k), row("gromov", k, 1.0 + k / 100)]
        rows += [row("alternating", k, 200.0)]
        rows += [row(RANDOM, k, 1.5 * s + 1, seed=s) for s in range(3)]
    rows.append({**row(NEURONS, 0, 1.3), "intermediate_size": 8})
    results = {
        "model_layers": 30, "num_texts": 2, "ks": [2, 4], "seeds": [0, 1, 2], "rows": rows,
        "timings": {"total_s": 60.0, "record_and_analyze_s": 20.0, "evaluate_s": 40.0},
    }  # fmt: skip
    table = markdown(results)
    assert "| gromov | 1.02 | 1.04 |" in table
    assert "| block_influence | 2.20 ✗ | 4.40 ✗ |" in table
    assert "| random | 2.50 [1.00-4.00] (1/3 pass) |" in table
    assert "intermediate_size 8" in table and "k=2 alternating: [0, 1]; catastrophic" in table
    assert plot(results, tmp_path / "p.png").stat().st_size > 0


def _budget_plan(seed: int, skip_last: bool = False) -> dict:
    def entry(dropped: list[int]) -> dict:
        widths = {"num_hidden_layers": 30 - len(dropped), "intermediate_size": 1024,
                  "num_attention_heads": 6, "hidden_size": 540}  # fmt: skip
        return {"params": 100 + seed, "widths": widths, "dropped_layers": dropped}

    strategies = {name: entry([3 + seed]) for name in BUDGET_STRATEGIES}
    if skip_last:
        strategies["last_layers"] = {"skipped": "test"}
    return {"budget": {"target_params": 110, "strategies": strategies}}


def test_budget_variants_cover_strategies_seeds_and_flap() -> None:
    plans = {0.85: {0: _budget_plan(0), 1: _budget_plan(1)}, 0.7: {0: _budget_plan(0, True)}}
    todo = budget_variants(plans)
    names = [(v["method"], v["ratio"], v["seed"]) for v in todo]
    assert ("last_layers", 0.85, None) in names and ("last_layers", 0.7, None) not in names
    assert [n for n in names if n[0] == RANDOM and n[1] == 0.85] == [
        (RANDOM, 0.85, 0),
        (RANDOM, 0.85, 1),
    ]
    flap = [v for v in todo if v["method"] == FLAP]
    assert len(flap) == 2 and all(v["strategy"] == "width_only" for v in flap)
    assert all(v["bias_compensation"] == (v["method"] == FLAP) for v in todo)
    # non-random strategies come from the first seed's plan
    assert all(v["dropped"] == [3] for v in todo if v["method"] != RANDOM)


def test_budget_tables_and_plot(tmp_path: Path) -> None:
    def row(method: str, ratio: float, ppl: float, seed: int | None = None) -> dict:
        ok = ppl <= 1.2
        widths = {"num_hidden_layers": 28, "intermediate_size": 1024, "num_attention_heads": 6,
                  "hidden_size": 540}  # fmt: skip
        return {
            "method": method, "ratio": ratio, "seed": seed, "dropped": [3, 4], "params": 1000,
            "widths": widths,
            "summary": {"catastrophic": [], "tokens": 10, "mean_perplexity": 10 * ppl,
                        "factual_mean_surprisal": 2.0},
            "mean_perplexity_ratio": ppl, "factual_mean_surprisal_ratio": 1.5, "pass": ok,
            "rules": {"perplexity": {"pass": ok}, "factual": {"pass": True}},
        }  # fmt: skip

    rows = [row("dense", 1.0, 1.0)]
    for ratio in (0.85, 0.7):
        rows += [row(m, ratio, 2.0 / ratio) for m in BUDGET_ROWS if m != RANDOM]
        rows += [row(RANDOM, ratio, 10.0 + s, seed=s) for s in range(3)]
    results = {
        "source_params": 134515008, "num_texts": 2, "ratios": [0.85, 0.7], "seeds": [0, 1, 2],
        "source_shape": {"num_hidden_layers": 30, "intermediate_size": 1536,
                         "num_attention_heads": 9, "hidden_size": 576},
        "rows": rows,
        "timings": {"total_s": 60.0, "record_and_analyze_s": 20.0, "dense_evaluate_s": 5.0,
                    "evaluate_s": 35.0},
    }  # fmt: skip
    table = budget_markdown(results)
    assert "| strategy | 0.85 of the parameters | 0.7 of the parameters |" in table
    assert "| depth_only | 2.35 ✗ | 2.86 ✗ |" in table
    assert "| random | 11.00 [10.00-12.00] (0/3 pass) |" in table
    assert f"| 0.7 | {FLAP} | 1,000 | 28 | 1024 | 6 | 540 | [3, 4] |" in table
    assert table.count("| 0.85 | random |") == 1  # one shape row for the random seeds
    assert budget_plot(results, tmp_path / "b.png").stat().st_size > 0
