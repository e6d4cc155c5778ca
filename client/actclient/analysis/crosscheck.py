"""A summary's device sums against the analysis of the same request's raw rows.

A `summary: true` capture that keeps its tensors (`tensors: true`, the default) holds both the
sums the device accumulated (`summary/`) and the rows they were accumulated from
(`layer_outputs/`). Analysing that one shard twice, once from each, must give the same numbers:
the device code (vllm_activations/summary.py) and the analyzer share their formulas, so any
difference is a fault on the device path (a token added twice or to the wrong request, a
stale ring entry, a CUDA graph replaying a different shape). `vllm-activations selftest`
runs this on the pod, where the device path is the one CPU tests cannot run.

Tolerances: cosines, their variance over tokens and boundary angles within `tolerance`
absolute (the equality bar of the summary tests, 1e-4; the variance rather than its square
root, which turns float32 rounding of a zero variance into 2.5e-4); per-site means (norms,
kurtosis, sparsity, update ratios) within `tolerance` relative; channel moments within
`MOMENT_TOLERANCE` of the site's largest value (they are stored with 10 mantissa bits, 2^-11
relative); max |x| and massive-activation counts exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from actclient.analysis.stats import POPULATIONS, AnalysisAccumulator, MassiveRule, ResidualStats
from actclient.progress import Progress
from vllm_activations.contract.shard import ShardError, ShardReader

TOLERANCE = 1e-4
MOMENT_TOLERANCE = 2e-3  # 4x the stored moments' rounding (2^-11 relative)
MATRICES = ("similarity", "similarity_var", "mean_angle")
SITE_MEANS = ("mean_norm", "norm_std", "kurtosis", "hoyer_sparsity", "massive_token_fraction")


def _accumulate(path: Path, special: frozenset[int], rule: MassiveRule, use_summary: bool):
    acc = AnalysisAccumulator(special_ids=special, rule=rule)
    acc.add_shard(path, use_summary=use_summary)
    return acc.populations


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    both = np.isfinite(a) & np.isfinite(b)
    if (np.isfinite(a) != np.isfinite(b)).any():
        return float("inf")
    return float(np.abs(a[both] - b[both]).max(initial=0.0))


def _max_rel(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float:
    return float((np.abs(a - b) / np.maximum(scale, 1e-30)).max(initial=0.0))


def _deviations(dev: ResidualStats, raw: ResidualStats) -> dict[str, float]:
    out = {"count": float(abs(dev.count - raw.count))}
    out["similarity"] = _max_abs(dev.similarity(), raw.similarity())
    out["similarity_var"] = _max_abs(dev.similarity_std() ** 2, raw.similarity_std() ** 2)
    out["mean_angle"] = _max_abs(dev.mean_angle(), raw.mean_angle())
    a, b = dev.site_summary(), raw.site_summary()
    for name in SITE_MEANS:
        out[name] = _max_rel(a[name], b[name], np.maximum(np.abs(b[name]), 1.0))
    update = (dev.update_ratio_sum, raw.update_ratio_sum)
    out["update_ratio"] = _max_rel(*update, np.abs(update[1]) + 1e-12) if dev.count else 0.0
    out["max_abs"] = _max_abs(a["max_abs"], b["max_abs"])
    out["massive_count"] = float(np.abs(dev.massive_count - raw.massive_count).max(initial=0))
    site_scale = np.abs(raw.channel_mean).max(1, keepdims=True)
    out["channel_mean"] = _max_rel(dev.channel_mean, raw.channel_mean, site_scale)
    var = raw.channel_variance()
    out["channel_variance"] = _max_rel(dev.channel_variance(), var, var.max(1, keepdims=True))
    return out


def limits(tolerance: float = TOLERANCE) -> dict[str, float]:
    """The largest deviation each quantity of `summary_deviations` may have."""
    exact = {"count": 0.0, "max_abs": 0.0, "massive_count": 0.0}
    return {
        **exact,
        **dict.fromkeys((*MATRICES, *SITE_MEANS, "update_ratio"), tolerance),
        "channel_mean": MOMENT_TOLERANCE,
        "channel_variance": MOMENT_TOLERANCE,
    }


def summary_deviations(path: str | Path, rule: MassiveRule | None = None) -> dict[str, float]:
    """Per `population/quantity`, the largest deviation of the shard's device summary from
    the analysis of its own raw rows (see `limits`). The shard must hold both."""
    path = Path(path)
    with ShardReader(path) as reader:
        if not (reader.has_summary and reader.has_tensors):
            raise ShardError(
                f"{path}: a cross-check needs a summary and the layer outputs "
                "(capture with summary: true, tensors: true)"
            )
        meta = reader.attrs.get("summary") or {}
    special = frozenset(int(i) for i in meta.get("special_ids", ()))
    rule = rule or MassiveRule()
    dev = _accumulate(path, special, rule, use_summary=True)
    raw = _accumulate(path, special, rule, use_summary=False)
    return {
        f"{name}/{quantity}": value
        for name in POPULATIONS
        for quantity, value in _deviations(dev[name], raw[name]).items()
    }


def summary_faults(path: str | Path, tolerance: float = TOLERANCE) -> list[str]:
    """`population/quantity: deviation > limit` for every quantity over its limit."""
    return _over(summary_deviations(path), tolerance)


def _over(deviations: dict[str, float], tolerance: float) -> list[str]:
    bounds = limits(tolerance)
    return [
        f"{key}: {value:.3g} > {bounds[key.split('/')[1]]:.3g}"
        for key, value in deviations.items()
        if not value <= bounds[key.split("/")[1]]
    ]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `crosscheck` to the top-level `actclient` parser."""
    p = subparsers.add_parser(
        "crosscheck",
        help="check summary shards' device sums against the analysis of their own rows",
        description="For shards captured with summary: true and tensors: true, analyse each "
        "twice, from its device summary and from its raw rows, and report every quantity "
        "that differs beyond its tolerance (exit status 1 if any does).",
    )
    p.add_argument("shards", nargs="+", metavar="SHARD", help="*.h5 shards")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="default %(default)s")
    p.add_argument("--json", action="store_true", help="print {shard: [faults]} as JSON")
    p.add_argument(
        "-o", "--out", metavar="FILE", help="also write {shard: {quantity: deviation}} as JSON"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a TTY")
    p.set_defaults(func=_crosscheck)


def _crosscheck(args: argparse.Namespace) -> int:
    faults, deviations = {}, {}
    with Progress(
        len(args.shards),
        desc="crosscheck",
        unit="shard",
        enabled=False if args.no_progress else None,
    ) as bar:
        for path in args.shards:
            deviations[path] = summary_deviations(path)
            faults[path] = _over(deviations[path], args.tolerance)
            bar.update(1, faults=sum(map(len, faults.values())))
    if args.out:
        Path(args.out).write_text(json.dumps(deviations, indent=1))
    if args.json:
        print(json.dumps(faults))
    else:
        for path, found in faults.items():
            print(f"{path}: " + ("; ".join(found) if found else "summary == its rows"))
    return 1 if any(faults.values()) else 0
