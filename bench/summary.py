"""The headline of every benchmark, from the JSON files in bench/results, with their targets.

Reads what the benchmarks wrote (it measures nothing) and prints one line per figure, each
file's finish time first, so a stale or missing result shows.

    python bench/summary.py
"""

from __future__ import annotations

import json
import sys

from workload import RESULTS


def load(name: str) -> dict | None:
    path = RESULTS / name
    if not path.exists():
        print(f"\n{name}: missing")
        return None
    data = json.loads(path.read_text())
    print(f"\n{name} (finished {data.get('finished', 'unknown')}):")
    return data


def main() -> int:
    if capture := load("capture.json"):
        print(
            f"  {capture['requests']} requests x {capture['max_tokens']} generated tokens, "
            f"medians of {capture['rounds']} interleaved rounds"
        )
        for name, r in capture["results"].items():
            print(
                f"  {name:30s} {r['wall_s']['median']:7.2f} s {r['gen_tok_per_s']:7.1f} tok/s "
                f"{r['ratio_to_baseline']['median']:6.3f}x {capture['baseline']}, "
                f"{r['ratio_to_plain']['median']:6.3f}x plain"
            )
    if hf := load("hf.json"):
        print(
            f"  HF best: {hf['best']}, {hf['best_gen_tok_per_s']:.1f} tok/s "
            f"({hf['prompts']} prompts x {hf['max_tokens']} tokens)"
        )
        comparison = hf.get("capture_comparison")
        for name, ratio in (comparison or {}).get("ratio_to_best_hf", {}).items():
            print(f"  {name:28s} {ratio:6.3f}x HF best tokens/s (target >= 1.45x)")
        if comparison is None:
            print("  no capture.json of the same workload to compare with")
    if shards := load("shard_write.json"):
        for r in shards["results"]:
            w = r["writers"]["write_shard"]
            print(
                f"  {r['bytes'] / 1e6:5.0f} MB shard: {w['mb_per_s']:6.0f} MB/s, "
                f"{w['ratio_to_raw']:.2f}x raw (target >= {shards['target_ratio']:.2f}x)"
            )
    if analyzer := load("analyzer.json"):
        for r in analyzer["rows"]:
            print(
                f"  {r['shards']:5d} shards: {r['mb_per_s']:6.1f} MB/s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
