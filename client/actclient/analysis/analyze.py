"""`analyze`: stream a directory of activation shards into analysis.json, arrays, pictures, report.

All accumulation happens in `stats` (float64, mergeable, one token block in memory at a time);
this module picks the inputs (embedding table, special tokens), turns the sums into the JSON a
person and `actclient plan` read, and flags redundant layers with the reasons behind each flag.
Top-level metrics are over all tokens, as the papers define them; `by_tokens` repeats every
metric for content tokens (no position 0, no special tokens) and for each shard's last token.

Shards are analysed by `jobs` worker processes (spawned, each with its own accumulator and a
share of the BLAS threads); each worker pulls shard paths from a queue and hands back one
accumulator, which the parent merges, so memory grows with `jobs`, never with the shard count.
Outputs are written to a temporary sibling directory and swapped in at the end, so an
existing `out_dir` (only replaced with `force`) never keeps files of an earlier run.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actclient.analysis.embedding import (
    EmbeddingTable,
    ModelFilesError,
    load_config,
    resolve_model_dir,
    special_token_ids,
)
from actclient.analysis.importance import minitron_summary
from actclient.analysis.stats import (
    DEFAULT_BLOCK_BYTES,
    POPULATIONS,
    AnalysisAccumulator,
    MassiveRule,
    ResidualStats,
    SiteLayout,
    layer_metrics,
    layout_of,
    shard_attrs,
)
from actclient.progress import Progress
from vllm_activations.contract.shard import ShardError, ShardReader, iter_shard_paths

ANALYSIS_SCHEMA = "actclient.analysis/1"
ANALYSIS_BLOCK_BYTES = 1 << 30  # token-block memory of one analysis, split among the workers
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


BAD_SHARD_ERRORS = (ShardError, OSError, KeyError)  # what a corrupt or truncated shard raises
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_POLL_S = 1.0  # how often the parent checks that its workers are still alive


class AnalysisError(ValueError):
    """Inputs that cannot be analyzed; the message says what to change."""


@dataclass(frozen=True)
class AccumulatorSettings:
    """What a worker process needs to build the same accumulator as the parent (picklable)."""

    model_dir: str | None
    special_ids: frozenset[int]
    rule: MassiveRule
    block_bytes: int
    layout: SiteLayout
    hidden_size: int
    attrs: dict
    skip_bad_shards: bool

    def accumulator(self) -> AnalysisAccumulator:
        embed = EmbeddingTable(self.model_dir) if self.model_dir is not None else None
        return AnalysisAccumulator(
            embed=embed,
            special_ids=self.special_ids,
            rule=self.rule,
            block_bytes=self.block_bytes,
            layout=self.layout,
            hidden_size=self.hidden_size,
            attrs=dict(self.attrs),
        )


def default_jobs() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _add_one(acc: AnalysisAccumulator, path: Path, settings: AccumulatorSettings) -> str | None:
    """Add one shard; with skip_bad_shards a failing shard leaves `acc` untouched."""
    if not settings.skip_bad_shards:
        acc.add_shard(path)
        return None
    one = settings.accumulator()
    try:
        one.add_shard(path)
    except BAD_SHARD_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    acc.merge(one)
    return None


def _worker(settings: AccumulatorSettings, tasks, results) -> None:  # noqa: ANN001 - mp queues
    """Worker process: add the shards it pulls from `tasks`, then send its accumulator."""
    try:
        acc = settings.accumulator()
        while (item := tasks.get()) is not None:
            index, path = item
            try:
                error = _add_one(acc, Path(path), settings)
            except BAD_SHARD_ERRORS as exc:
                results.put(("failed", index, f"{type(exc).__name__}: {exc}"))
                return
            results.put(("shard", index, error))
        acc.release_buffers()  # the parent's merge needs the memory more
        results.put(("done", None, acc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        results.put(("crashed", None, f"{type(exc).__name__}: {exc}"))


@contextlib.contextmanager
def _blas_threads(count: int) -> Iterator[None]:
    # Spawned workers read these when they import numpy; the parent's own BLAS is unaffected.
    saved = {name: os.environ.get(name) for name in BLAS_THREAD_VARS}
    os.environ.update({name: str(count) for name in BLAS_THREAD_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def accumulate(
    paths: list[Path],
    settings: AccumulatorSettings,
    jobs: int,
    bar: Progress | None = None,
) -> tuple[AnalysisAccumulator, list[dict]]:
    """Add every shard in `paths` with `jobs` processes; return the merged accumulator and the
    skipped shards ({"shard", "error"}; empty unless settings.skip_bad_shards)."""
    skipped: list[dict] = []

    def finished(index: int, error: str | None) -> None:
        if error is not None:
            skipped.append({"shard": paths[index].name, "error": error})
        if bar is not None:
            bar.update(1)

    total = settings.accumulator()
    jobs = max(1, min(jobs, len(paths)))
    if jobs == 1:
        for index, path in enumerate(paths):
            finished(index, _add_one(total, path, settings))
        total.release_buffers()
        return total, sorted(skipped, key=lambda s: s["shard"])
    merged: AnalysisAccumulator | None = None
    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(str(p) for p in paths):
        tasks.put(item)
    for _ in range(jobs):
        tasks.put(None)
    workers = [ctx.Process(target=_worker, args=(settings, tasks, results)) for _ in range(jobs)]
    with _blas_threads(max(1, default_jobs() // jobs)):
        for worker in workers:
            worker.start()
    try:
        remaining = jobs
        while remaining:
            try:
                kind, index, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    code = dead[0].exitcode
                    why = (
                        f"was killed by signal {-code} (out of memory? retry with fewer --jobs)"
                        if code < 0
                        else f"exited with status {code} (its error is above; a script that "
                        "calls analyze() with jobs > 1 needs `if __name__ == '__main__':`)"
                    )
                    raise AnalysisError(f"an analysis worker {why}") from None
                continue
            if kind == "shard":
                finished(index, payload)
            elif kind == "done":
                if merged is None:
                    merged = payload  # the first one is the total: no merge into zeros
                else:
                    merged.merge(payload)
                remaining -= 1
            elif kind == "failed":
                raise ShardError(f"{payload} (pass --skip-bad-shards to go on without it)")
            else:
                raise AnalysisError(f"an analysis worker failed: {payload}")
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return (total if merged is None else merged), sorted(skipped, key=lambda s: s["shard"])


def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse a non-empty `out_dir` unless `force`; even then, only an earlier analysis."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} is a file; give a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise AnalysisError(
            f"--out {out} is not empty; pass --force to replace the analysis there, or choose "
            "a new directory"
        )
    if not (out / "analysis.json").is_file():
        raise AnalysisError(
            f"--out {out} holds files but no analysis.json; --force only replaces an earlier "
            "analysis, so choose an empty or new directory"
        )


def _first_readable(
    paths: list[Path], has_embedding: bool, skip: bool
) -> tuple[SiteLayout, int, dict]:
    for path in paths:
        try:
            with ShardReader(path) as reader:
                return layout_of(reader, has_embedding), reader.hidden_size, shard_attrs(reader)
        except BAD_SHARD_ERRORS:
            if not skip:
                raise
    raise AnalysisError(f"none of the {len(paths)} shards could be read")


def analyze(
    shards_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    *,
    special_ids: Iterable[int] | None = None,
    rule: MassiveRule | None = None,
    block_bytes: int | None = None,
    pictures: bool = True,
    progress: bool = True,
    jobs: int | None = None,
    skip_bad_shards: bool = False,
    force: bool = False,
) -> dict:
    """Analyze every shard in `shards_dir`, write outputs to `out_dir`, return analysis.json.

    `model_dir` (a Hugging Face checkpoint with safetensors) rebuilds the embedding output so
    layer 0 gets scores, and supplies the special token ids unless `special_ids` is given.
    `jobs` worker processes (default: every core) share the shards and `block_bytes` of
    token-block memory (default ANALYSIS_BLOCK_BYTES; at least DEFAULT_BLOCK_BYTES / 2 each;
    each also holds its accumulators, ~170 x sites x hidden bytes). A shard that cannot be
    read stops the analysis unless `skip_bad_shards`, which lists it in the report instead.
    A non-empty `out_dir` is refused unless `force` (then replaced as a whole at the end).
    """
    check_out_dir(out_dir, force)
    paths = list(iter_shard_paths(shards_dir))
    if not paths:
        raise AnalysisError(f"{shards_dir}: no *.h5 shards; run `actclient record` first")
    if model_dir is not None:
        # A hub id becomes its cached snapshot here, once: the special tokens, the embedding
        # and analysis.json's model_dir (which `plan` reads) all need the folder.
        model_dir = resolve_model_dir(model_dir)
    if special_ids is None:
        special_ids = special_token_ids(model_dir) if model_dir is not None else set()
    if model_dir is not None:
        EmbeddingTable(model_dir)  # fail on a bad checkpoint before starting workers
    layout, hidden_size, attrs = _first_readable(paths, model_dir is not None, skip_bad_shards)
    jobs = max(1, min(jobs or default_jobs(), len(paths)))
    if block_bytes is None:
        block_bytes = max(ANALYSIS_BLOCK_BYTES // jobs, DEFAULT_BLOCK_BYTES // 2)
    settings = AccumulatorSettings(
        model_dir=str(model_dir) if model_dir is not None else None,
        special_ids=frozenset(int(i) for i in special_ids),
        rule=rule or MassiveRule(),
        block_bytes=block_bytes,
        layout=layout,
        hidden_size=hidden_size,
        attrs=attrs,
        skip_bad_shards=skip_bad_shards,
    )
    with Progress(
        len(paths), desc="analyze", unit="shard", enabled=None if progress else False
    ) as bar:
        acc, skipped = accumulate(paths, settings, jobs, bar)
    if not acc.num_shards:
        raise AnalysisError(f"{shards_dir}: every shard failed; see skipped_shards")
    return write_analysis(
        acc,
        out_dir,
        shards_dir=shards_dir,
        model_dir=model_dir,
        pictures=pictures,
        skipped=skipped,
    )


def write_analysis(
    acc: AnalysisAccumulator,
    out_dir: str | Path,
    *,
    shards_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
    pictures: bool = True,
    skipped: list[dict] | None = None,
) -> dict:
    """Turn a filled accumulator into analysis.json, arrays/*.npy, pictures and report.md.

    Everything is written to a temporary sibling of `out_dir`, which then replaces it.
    """
    if acc.layout is None or not acc.num_shards:
        raise AnalysisError("no shard was added")
    final = Path(out_dir).resolve()  # "." has no name to rename
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        analysis = _write_outputs(acc, out, shards_dir, model_dir, pictures, skipped or [])
        _replace_dir(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return analysis


def _replace_dir(new: Path, final: Path) -> None:
    # Entry by entry, so `final` stays the same directory (it may be the working directory).
    final.mkdir(exist_ok=True)
    for entry in list(final.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in list(new.iterdir()):
        entry.rename(final / entry.name)


def _write_outputs(
    acc: AnalysisAccumulator,
    out: Path,
    shards_dir: str | Path | None,
    model_dir: str | Path | None,
    pictures: bool,
    skipped: list[dict],
) -> dict:
    layout = acc.layout
    assert layout is not None
    arrays_dir = out / "arrays"
    arrays_dir.mkdir(parents=True, exist_ok=True)
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
        arrays[f"channel_stats_{kind}_abs_sum"] = acc.channels.abs_sums[kind]
        arrays[f"channel_stats_{kind}_count"] = acc.channels.counts[kind]
    model_config = _model_config(acc.attrs, model_dir)
    minitron, minitron_arrays = minitron_summary(acc.channels, model_config)
    arrays.update(minitron_arrays)
    for key, value in arrays.items():
        np.save(arrays_dir / f"{key}.npy", value)

    main = by_tokens["all"]
    analysis = {
        "schema": ANALYSIS_SCHEMA,
        "shards_dir": str(shards_dir) if shards_dir is not None else None,
        "num_shards": acc.num_shards,
        "skipped_shards": skipped,
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
        "minitron": minitron if acc.channels.sums else None,
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
