"""Pictures of an analysis: similarity heatmaps, Block Influence with angular distance, norms.

matplotlib is an optional dependency used only here, with the non-interactive Agg backend so it
works without a display. Without it the analysis is complete but has no PNGs, and `render` says
how to get them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

MISSING_MATPLOTLIB = (
    "pictures skipped: matplotlib is not installed (install the client's [plots] extra, "
    "e.g. pip install '.[plots]' in a checkout, then re-run analyze)"
)


def _pyplot():  # noqa: ANN202 - the module type is matplotlib's
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def render(analysis: dict, arrays: dict[str, np.ndarray], out_dir: str | Path) -> list[Path]:
    """Write the PNGs into `out_dir` and return their paths ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return []
    out = Path(out_dir)
    paths = [
        _heatmap(plt, analysis, arrays, "all", out / "similarity_all.png"),
        _heatmap(plt, analysis, arrays, "content", out / "similarity_content.png"),
        _influence(plt, analysis, out / "block_influence.png"),
        _norms(plt, analysis, out / "norms.png"),
    ]
    return [p for p in paths if p is not None]


def _heatmap(plt, analysis: dict, arrays: dict, tokens: str, path: Path) -> Path | None:  # noqa: ANN001
    matrix = arrays.get(f"similarity_{tokens}")
    if matrix is None or not np.isfinite(matrix).any():
        return None
    labels = analysis["sites"]
    size = min(4 + 0.12 * len(labels), 22)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(np.nanmin(matrix))), vmax=1.0)
    step = max(1, len(labels) // 40)
    ticks = np.arange(0, len(labels), step)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
    ax.set_title(
        f"Mean per-token cosine similarity between sites ({tokens} tokens, "
        f"n={analysis['tokens'][tokens]})"
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _influence(plt, analysis: dict, path: Path) -> Path:  # noqa: ANN001
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    for tokens, style in (("all", "-o"), ("content", "--s")):
        metrics = analysis["by_tokens"][tokens]
        layers = metrics["layers"]
        top.plot(
            layers,
            _series(metrics["block_influence"]),
            style,
            ms=3,
            label=f"block influence ({tokens})",
        )
        top.plot(
            layers,
            _series(metrics["attention_score"]),
            style,
            ms=2,
            alpha=0.6,
            label=f"attention 1-cos ({tokens})",
        )
        top.plot(
            layers,
            _series(metrics["mlp_score"]),
            style,
            ms=2,
            alpha=0.6,
            label=f"MLP 1-cos ({tokens})",
        )
    for entry in analysis["redundant_layers"]:
        top.axvline(entry["layer"], color="red", alpha=0.2)
    top.set_xlabel("layer")
    top.set_ylabel("1 - mean cos (higher = layer changes more)")
    top.set_yscale("symlog", linthresh=1e-3)
    top.set_ylim(bottom=0)
    top.set_title("Block Influence and sub-block scores (red: flagged redundant)")
    top.legend(fontsize=7, ncol=2)
    table = analysis["by_tokens"]["all"]["angular_distance"]
    sizes = sorted(int(n) for n in table)
    if sizes:
        starts = len(table["1"])
        grid = np.full((len(sizes), starts), np.nan)
        for n in sizes:
            row = _series(table[str(n)])
            grid[n - 1, : len(row)] = row
        image = bottom.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="magma_r",
            extent=(-0.5, starts - 0.5, 0.5, len(sizes) + 0.5),
        )
        fig.colorbar(image, ax=bottom, label="angular distance / pi")
        for best in analysis["best_blocks"]:
            bottom.plot(best["start"], best["n"], "c.", ms=4)
    bottom.set_xlabel("first dropped layer l")
    bottom.set_ylabel("block size n")
    bottom.set_title(
        "Gromov angular distance d(l, n) of dropping [l, l+n), all tokens (dots: best l per n)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _norms(plt, analysis: dict, path: Path) -> Path:  # noqa: ANN001
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    keys = (
        ("mean_norm", "mean L2 norm"),
        ("kurtosis", "excess kurtosis across channels"),
        ("hoyer_sparsity", "Hoyer sparsity"),
        ("max_abs", "max |x|"),
    )
    labels = analysis["sites"]
    x = np.arange(len(labels))
    for ax, (key, title) in zip(axes.flat, keys, strict=True):
        for tokens in ("all", "content"):
            ax.plot(
                x, _series(analysis["by_tokens"][tokens]["sites"][key]), ".-", ms=3, label=tokens
            )
        if key in ("mean_norm", "max_abs", "kurtosis"):
            ax.set_yscale("symlog")
        step = max(1, len(labels) // 12)
        ax.set_xticks(x[::step], [labels[i] for i in x[::step]], rotation=45, fontsize=6)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("Per-site statistics of the residual stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
