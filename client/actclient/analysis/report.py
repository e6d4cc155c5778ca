"""report.md: the page a person reads first, written from analysis.json alone.

It states what was analyzed, the layers flagged redundant and why, the best contiguous blocks,
massive activations, where the all-token and content-token variants disagree, and links the
pictures and arrays. Numbers come from analysis.json so the two never disagree.
"""

from __future__ import annotations

from pathlib import Path


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def render_report(analysis: dict) -> str:
    """The Markdown text of the report."""
    lines: list[str] = []
    add = lines.append
    add("# Activation analysis")
    add("")
    cfg = analysis.get("model_config", {})
    add(
        f"- Model: {analysis.get('model') or 'unknown'}"
        + (
            f" ({cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')})"
            if cfg
            else ""
        )
    )
    add(
        f"- Shards: {analysis['num_shards']} from `{analysis.get('shards_dir')}` "
        f"({analysis['bytes_read'] / 1e6:.1f} MB)"
    )
    skipped = analysis.get("skipped_shards") or []
    if skipped:
        add(
            f"- **Skipped shards: {len(skipped)}** (--skip-bad-shards); they are not in any "
            "number below:"
        )
        for entry in skipped[:20]:
            add(f"  - `{entry['shard']}`: {entry['error']}")
        if len(skipped) > 20:
            add(f"  - ... and {len(skipped) - 20} more (analysis.json lists all)")
    tokens = analysis["tokens"]
    add(
        f"- Tokens: {tokens['all']} all, {tokens['content']} content (no position 0, "
        f"{len(analysis['special_token_ids'])} special token ids excluded), "
        f"{tokens['last']} last-token"
    )
    layers = analysis["layers"]
    add(f"- Layers captured: {layers[0]}..{layers[-1]} ({len(layers)})" if layers else "")
    add(
        "- Layer 0 input: "
        + (
            analysis["embedding"]
            or "not available (pass --model to rebuild the embedding output); layer 0 has no score"
        )
    )
    add("")
    add(
        "Conventions: block influence BI_l = 1 - mean cos(input of l, output of l) (ShortGPT); "
        "attention / MLP scores are 1 - cos across each sub-block (LLM-Drop); angular distance "
        "d(l, n) = mean angle(input of l, input of l+n) / pi for dropping layers [l, l+n), "
        "0-based, half-open (Gromov et al.). Low scores mean the layer changes the residual "
        "little. Means are token-weighted."
    )
    add("")
    add("## Redundant layers (all tokens)")
    add("")
    add("The lowest quarter by block influence; *strong* marks a BI at most half the median.")
    add("")
    red = analysis["redundant_layers"]
    content = {e["layer"]: e for e in analysis["by_tokens"]["content"]["redundant_layers"]}
    if not red:
        add("No layer has a block influence score. Pass --model so layer 0 gets one.")
    for entry in red:
        flag = " **(protected)**" if entry["protected"] else ""
        flag += " strong" if entry["strong"] else ""
        agree = (
            "also flagged on content tokens"
            if entry["layer"] in content
            else "NOT flagged on content tokens"
        )
        add(f"- Layer {entry['layer']}{flag}: BI {_fmt(entry['block_influence'])}; {agree}")
        for reason in entry["reasons"]:
            add(f"  - {reason}")
    for entry in analysis["redundant_sub_blocks"]:
        add(f"- Layer {entry['layer']} {entry['sub_block']} sub-block only: {entry['reason']}")
    add("")
    add(
        "Protected layers: "
        + "; ".join(
            f"{p['layer']} ({', '.join(p['reasons'])})" for p in analysis["protected_layers"]
        )
    )
    add("")
    add("## Per-layer scores")
    add("")
    add("| layer | BI all | BI content | attention all | MLP all | ‖Δattn‖/‖h‖ | ‖Δmlp‖/‖a‖ |")
    add("|---:|---:|---:|---:|---:|---:|---:|")
    main, cont = analysis["by_tokens"]["all"], analysis["by_tokens"]["content"]
    for k, layer in enumerate(main["layers"]):
        add(
            f"| {layer} | {_fmt(main['block_influence'][k])} | "
            f"{_fmt(cont['block_influence'][k])} | {_fmt(main['attention_score'][k])} | "
            f"{_fmt(main['mlp_score'][k])} | {_fmt(main['attention_update_ratio'][k], 3)} | "
            f"{_fmt(main['mlp_update_ratio'][k], 3)} |"
        )
    add("")
    add("## Best contiguous blocks to drop (Gromov angular distance)")
    add("")
    add("| n | all tokens: drop | d | content: drop | d | last token: drop | d |")
    add("|---:|---|---:|---|---:|---|---:|")
    best = {
        pop: {b["n"]: b for b in analysis["by_tokens"][pop]["best_blocks"]}
        for pop in ("all", "content", "last")
    }
    for n in sorted(best["all"]):
        cells = []
        for pop in ("all", "content", "last"):
            b = best[pop].get(n)
            cells += (
                [f"[{b['start']}, {b['start'] + n})", _fmt(b["distance"])] if b else ["n/a", "n/a"]
            )
        add(f"| {n} | " + " | ".join(cells) + " |")
    add("")
    add("## Massive activations")
    add("")
    for pop in ("all", "content"):
        massive = analysis["by_tokens"][pop]["massive_activations"]
        rule = analysis["massive_rule"]
        add(
            f"**{pop} tokens** (|x| > {rule['threshold']:g} and > {rule['ratio_to_token_median']:g}"
            " x the token's median |x|):"
        )
        if not massive["channels"]:
            add("none found.")
            add("")
            continue
        add(
            f"first seen at {massive['first_site']}; positions (position, tokens flagged): "
            f"{massive['positions']}; token ids: {massive['token_ids']}"
        )
        add("")
        add("| channel | max abs | at site | position | token | sites | from | to |")
        add("|---:|---:|---|---:|---:|---:|---|---|")
        for ch in massive["channels"][:12]:
            add(
                f"| {ch['channel']} | {_fmt(ch['max_abs'])} | {ch['max_site']} | "
                f"{ch['max_position']} | {ch['max_token']} | {ch['num_sites']} | "
                f"{ch['first_site']} | {ch['last_site']} |"
            )
        add("")
    if analysis.get("channel_stats"):
        add("## Neuron statistics")
        add("")
        for kind, info in analysis["channel_stats"].items():
            add(
                f"- {kind}: {info['channels']} channels x {len(info['layers'])} layers, "
                f"{info['tokens'][0] if info['tokens'] else 0} tokens per layer; "
                "`actclient plan` ranks them."
            )
        add("")
    add("## Files")
    add("")
    for picture in analysis.get("pictures", []):
        add(f"![{picture}]({picture})")
        add("")
    if not analysis.get("pictures"):
        add("No pictures (matplotlib missing or pictures disabled).")
    add("- `analysis.json`: all metrics; `by_tokens` holds the all / content / last variants.")
    add("- `arrays/*.npy`: similarity matrices, boundary angles, per-channel moments.")
    add("- Next: `actclient plan <this dir> --drop K` for layer and neuron pruning plans.")
    return "\n".join(lines) + "\n"


def write_report(analysis: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.md"
    path.write_text(render_report(analysis))
    return path
