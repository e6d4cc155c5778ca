"""The experiment's bookkeeping without engines: which variants, the tables, the plot."""

from __future__ import annotations

from pathlib import Path

from actpipeline.prune_experiment import NEURONS, RANDOM, markdown, plot, variants


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
