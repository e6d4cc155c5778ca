"""Streaming, mergeable statistics over activation shards: the analyzer's math, in one place.

Every accumulator keeps float64 sums only (never a token), so memory depends on the model, not
on the number of shards, and `merge` of accumulators built from any split of the shards equals
one pass over all of them (up to float64 rounding). Shards are read token block by token block
(every site of one block at once), which bounds memory within a shard as well.

Sites are ordered `embedding` (when rebuilt from the model), then `post_attention` and
`post_mlp` of every captured layer. Boundary b is the residual entering layer b: the embedding
for b = 0, the `post_mlp` of layer b - 1 otherwise. Angles use 2*atan2(|u-v|, |u+v|) on unit
vectors, which stays accurate where arccos(cos) loses all digits (cos near 1).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vllm_activations.shard import ShardError, ShardReader, from_storage

POPULATIONS: tuple[str, ...] = ("all", "content", "last")
CHANNEL_KINDS: tuple[str, ...] = ("mlp_intermediate", "attn_heads")
EMBEDDING = "embedding"
DEFAULT_BLOCK_BYTES = 256 << 20  # working memory of one token block, all sites
TOP_EVENTS = 8  # largest massive activations kept per site


@dataclass(frozen=True)
class MassiveRule:
    """Sun et al. (2024): |x| above `threshold` and `ratio` times the token's median |x|."""

    threshold: float = 100.0
    ratio: float = 1000.0


@dataclass(frozen=True)
class SiteLayout:
    """Which sites a shard set holds and where the layer boundaries are among them."""

    layers: tuple[int, ...]
    sites: tuple[str, ...]  # captured layer sites, canonical order
    has_embedding: bool

    @property
    def labels(self) -> list[str]:
        head = [EMBEDDING] if self.has_embedding else []
        return head + [f"{layer}.{site}" for layer in self.layers for site in self.sites]

    def index(self, layer: int, site: str) -> int | None:
        """Site index of (layer, site), None when it was not captured."""
        if layer not in self.layers or site not in self.sites:
            return None
        base = 1 if self.has_embedding else 0
        return base + self.layers.index(layer) * len(self.sites) + self.sites.index(site)

    def boundary_site(self, b: int) -> int | None:
        """Site index of the residual entering layer b (b = 0: the embedding)."""
        if b == 0:
            return 0 if self.has_embedding else None
        return self.index(b - 1, "post_mlp")

    @property
    def boundaries(self) -> list[int]:
        """Boundary numbers b (0..max layer + 1) whose residual is available."""
        top = max(self.layers) + 2 if self.layers else 0
        return [b for b in range(top) if self.boundary_site(b) is not None]


def unit_angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle between unit vectors along the last axis: 2*atan2(|u-v|, |u+v|), float64."""
    diff = np.sqrt(np.einsum("...h,...h->...", u - v, u - v))
    total = np.sqrt(np.einsum("...h,...h->...", u + v, u + v))
    return 2.0 * np.arctan2(diff, total)


def chan_merge(
    n_a: float,
    mean_a: np.ndarray,
    m2_a: np.ndarray,
    n_b: float,
    mean_b: np.ndarray,
    m2_b: np.ndarray,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Chan et al. parallel merge of (count, mean, sum of squared deviations)."""
    n = n_a + n_b
    if n == 0:
        return 0, mean_a, m2_a
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


class TokenBlock:
    """Per-token quantities of one block of tokens, computed once for every population.

    `x` is [sites, tokens, hidden] float64. Holds the per-token cosine matrix [T, S, S],
    boundary angles [T, B, B] (upper triangle), norms, update ratios, kurtosis, Hoyer sparsity,
    |x| and the massive-activation flags.
    """

    def __init__(
        self,
        x: np.ndarray,
        positions: np.ndarray,
        tokens: np.ndarray,
        shard: str,
        boundary_sites: list[int],
        rule: MassiveRule,
    ) -> None:
        self.x, self.positions, self.tokens, self.shard = x, positions, tokens, shard
        num_sites, t, hidden = x.shape
        self.sq = np.einsum("sth,sth->st", x, x)
        self.norms = np.sqrt(self.sq)
        safe = np.where(self.norms > 0, self.norms, 1.0)
        unit = x / safe[..., None]
        self.gram = np.matmul(unit.transpose(1, 0, 2), unit.transpose(1, 2, 0))
        np.clip(self.gram, -1.0, 1.0, out=self.gram)
        nb = len(boundary_sites)
        self.angle = np.zeros((t, nb, nb))
        ub = unit[boundary_sites]
        for i in range(nb - 1):
            self.angle[:, i, i + 1 :] = unit_angle(ub[i + 1 :], ub[i][None]).T
        del ub, unit
        if num_sites > 1:
            diff = x[1:] - x[:-1]
            self.update_ratio = np.sqrt(np.einsum("sth,sth->st", diff, diff)) / safe[:-1]
            del diff
        else:
            self.update_ratio = np.zeros((0, t))
        centred = x - x.mean(2, keepdims=True)
        centred *= centred
        m2 = centred.mean(2)
        m4 = np.einsum("sth,sth->st", centred, centred) / hidden
        del centred
        self.kurtosis = np.where(m2 > 0, m4 / np.where(m2 > 0, m2, 1.0) ** 2 - 3.0, 0.0)
        self.mag = np.abs(x)
        root_h = np.sqrt(hidden)
        ratio = np.where(self.norms > 0, self.mag.sum(2) / safe, root_h)
        self.hoyer = (root_h - ratio) / max(root_h - 1.0, 1e-12)
        median = np.median(self.mag, axis=2, keepdims=True)
        self.flagged = (self.mag > rule.threshold) & (self.mag > rule.ratio * median)


@dataclass
class ResidualStats:
    """Residual-stream statistics of one token population over all sites.

    Sums over tokens: cosine matrix and its square, boundary angles, L2 norms, per-token
    excess kurtosis and Hoyer sparsity across channels, relative update norms between
    consecutive sites, per-channel mean/M2 (Chan), per-channel max |x| with its position and
    token, and massive-activation counts with the largest events.
    """

    num_sites: int
    hidden_size: int
    boundary_sites: list[int]
    rule: MassiveRule = field(default_factory=MassiveRule)
    count: int = 0

    def __post_init__(self) -> None:
        s, h, b = self.num_sites, self.hidden_size, len(self.boundary_sites)
        self.cos_sum = np.zeros((s, s))
        self.cos_sq_sum = np.zeros((s, s))
        self.angle_sum = np.zeros((b, b))
        self.norm_sum = np.zeros(s)
        self.norm_sq_sum = np.zeros(s)
        self.kurtosis_sum = np.zeros(s)
        self.hoyer_sum = np.zeros(s)
        self.update_ratio_sum = np.zeros(max(s - 1, 0))
        self.channel_mean = np.zeros((s, h))
        self.channel_m2 = np.zeros((s, h))
        self.absmax = np.zeros((s, h))
        self.absmax_position = np.full((s, h), -1, dtype=np.int64)
        self.absmax_token = np.full((s, h), -1, dtype=np.int64)
        self.massive_count = np.zeros((s, h), dtype=np.int64)
        self.massive_tokens = np.zeros(s, dtype=np.int64)
        self.massive_positions: Counter[int] = Counter()
        self.massive_token_ids: Counter[int] = Counter()
        # per site: (|value|, value, channel, shard, position, token), largest first
        self.massive_events: list[list[tuple[float, float, int, str, int, int]]] = [
            [] for _ in range(s)
        ]

    def add(self, x: np.ndarray, positions: np.ndarray, tokens: np.ndarray, shard: str) -> None:
        """Add a token block: `x` is [sites, tokens, hidden], already float64."""
        block = TokenBlock(x, positions, tokens, shard, self.boundary_sites, self.rule)
        self.add_block(block, np.ones(x.shape[1], dtype=bool))

    def add_block(self, block: TokenBlock, mask: np.ndarray) -> None:
        """Add the tokens of `block` selected by `mask` (per-token values are computed once)."""
        t = int(mask.sum())
        if t == 0:
            return
        x = block.x[:, mask]
        gram = block.gram[mask]
        self.cos_sum += gram.sum(0)
        self.cos_sq_sum += np.einsum("tij,tij->ij", gram, gram)
        self.angle_sum += block.angle[mask].sum(0)
        self.norm_sum += block.norms[:, mask].sum(1)
        self.norm_sq_sum += block.sq[:, mask].sum(1)
        self.update_ratio_sum += block.update_ratio[:, mask].sum(1)
        self.kurtosis_sum += block.kurtosis[:, mask].sum(1)
        self.hoyer_sum += block.hoyer[:, mask].sum(1)
        block_mean = x.mean(1)
        centred = x - block_mean[:, None]
        block_m2 = np.einsum("sth,sth->sh", centred, centred)
        n, self.channel_mean, self.channel_m2 = chan_merge(
            self.count, self.channel_mean, self.channel_m2, t, block_mean, block_m2
        )
        self.count = int(n)
        mag = block.mag[:, mask]
        positions, tokens = block.positions[mask], block.tokens[mask]
        arg = mag.argmax(1)
        peak = np.take_along_axis(mag, arg[:, None, :], 1)[:, 0, :]
        self._update_absmax(peak, positions[arg], tokens[arg])
        flagged = block.flagged[:, mask]
        if flagged.any():
            self._add_massive(x, mag, flagged, positions, tokens, block.shard)

    def _update_absmax(self, peak: np.ndarray, position: np.ndarray, token: np.ndarray) -> None:
        # Ties go to the smaller (position, token), so the result is independent of shard order.
        tie = (
            (peak == self.absmax)
            & (self.absmax_position >= 0)
            & (
                (position < self.absmax_position)
                | ((position == self.absmax_position) & (token < self.absmax_token))
            )
        )
        better = (peak > self.absmax) | tie
        self.absmax = np.where(better, peak, self.absmax)
        self.absmax_position = np.where(better, position, self.absmax_position)
        self.absmax_token = np.where(better, token, self.absmax_token)

    def _add_massive(
        self,
        x: np.ndarray,
        mag: np.ndarray,
        flagged: np.ndarray,
        positions: np.ndarray,
        tokens: np.ndarray,
        shard: str,
    ) -> None:
        self.massive_count += flagged.sum(1)
        token_hit = flagged.any(2)  # [S, T]
        self.massive_tokens += token_hit.sum(1)
        any_site = token_hit.any(0)
        self.massive_positions.update(positions[any_site].tolist())
        self.massive_token_ids.update(tokens[any_site].tolist())
        for s in np.nonzero(token_hit.any(1))[0]:
            t_idx, h_idx = np.nonzero(flagged[s])
            values = mag[s, t_idx, h_idx]
            keep = np.argsort(-values, kind="stable")[:TOP_EVENTS]
            events = [
                (
                    float(values[k]),
                    float(x[s, t_idx[k], h_idx[k]]),
                    int(h_idx[k]),
                    shard,
                    int(positions[t_idx[k]]),
                    int(tokens[t_idx[k]]),
                )
                for k in keep
            ]
            self.massive_events[s] = _top(self.massive_events[s] + events)

    def merge(self, other: ResidualStats) -> None:
        """Fold `other` (same layout) into this accumulator."""
        if (other.num_sites, other.hidden_size) != (self.num_sites, self.hidden_size):
            raise ValueError("cannot merge statistics of different site layouts")
        for name in (
            "cos_sum",
            "cos_sq_sum",
            "angle_sum",
            "norm_sum",
            "norm_sq_sum",
            "kurtosis_sum",
            "hoyer_sum",
            "update_ratio_sum",
            "massive_count",
            "massive_tokens",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        n, self.channel_mean, self.channel_m2 = chan_merge(
            self.count,
            self.channel_mean,
            self.channel_m2,
            other.count,
            other.channel_mean,
            other.channel_m2,
        )
        self.count = int(n)
        self._update_absmax(other.absmax, other.absmax_position, other.absmax_token)
        self.massive_positions.update(other.massive_positions)
        self.massive_token_ids.update(other.massive_token_ids)
        for s in range(self.num_sites):
            self.massive_events[s] = _top(self.massive_events[s] + other.massive_events[s])

    # Read-outs ----------------------------------------------------------------------------

    def similarity(self) -> np.ndarray:
        """Mean per-token cosine similarity between every pair of sites [S, S]."""
        return (
            self.cos_sum / max(self.count, 1) if self.count else np.full_like(self.cos_sum, np.nan)
        )

    def similarity_std(self) -> np.ndarray:
        """Standard deviation over tokens of the per-token cosine [S, S]."""
        if not self.count:
            return np.full_like(self.cos_sum, np.nan)
        mean = self.cos_sum / self.count
        return np.sqrt(np.maximum(self.cos_sq_sum / self.count - mean * mean, 0.0))

    def mean_angle(self) -> np.ndarray:
        """Mean angle in radians between boundary residuals [B, B] (symmetric)."""
        if not self.count:
            return np.full_like(self.angle_sum, np.nan)
        upper = self.angle_sum / self.count
        return upper + upper.T

    def channel_variance(self) -> np.ndarray:
        """Per-site, per-channel population variance over tokens [S, H]."""
        return self.channel_m2 / max(self.count, 1)

    def site_summary(self) -> dict[str, np.ndarray]:
        """Per-site means over tokens: norm, norm std, variance, kurtosis, sparsity, update."""
        n = max(self.count, 1)
        norm = self.norm_sum / n
        return {
            "mean_norm": norm,
            "norm_std": np.sqrt(np.maximum(self.norm_sq_sum / n - norm * norm, 0.0)),
            "mean_channel_variance": self.channel_variance().mean(1),
            "kurtosis": self.kurtosis_sum / n,
            "hoyer_sparsity": self.hoyer_sum / n,
            "max_abs": self.absmax.max(1),
            "massive_token_fraction": self.massive_tokens / n,
        }


def _top(events: list[tuple[float, float, int, str, int, int]]) -> list:
    # Ties broken on the whole tuple, so the kept set does not depend on the order of shards.
    return heapq.nlargest(TOP_EVENTS, events, key=lambda e: (e[0], e[3], e[4], e[2]))


@dataclass
class ChannelStats:
    """Per-neuron sums from shards' `channel_stats/<kind>/{sum,sum_sq,count}` (float64)."""

    layers: dict[str, np.ndarray] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    sum_sqs: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def add_shard(self, reader: ShardReader) -> None:
        """Add the channel statistics a shard holds (shards without them add nothing)."""
        for kind in CHANNEL_KINDS:
            base = f"channel_stats/{kind}"
            if f"{base}/sum" not in reader:
                continue
            total = np.asarray(reader.dataset(f"{base}/sum"), dtype=np.float64)
            total_sq = np.asarray(reader.dataset(f"{base}/sum_sq"), dtype=np.float64)
            count = np.asarray(reader.dataset(f"{base}/count"), dtype=np.int64)
            if total.shape != total_sq.shape or total.shape[:1] != count.shape:
                raise ShardError(f"{reader.path}: {base} has inconsistent shapes")
            self._add(kind, reader.layers, total, total_sq, count, reader.path)

    def _add(
        self,
        kind: str,
        layers: np.ndarray,
        total: np.ndarray,
        total_sq: np.ndarray,
        count: np.ndarray,
        where: Path | str,
    ) -> None:
        if kind not in self.sums:
            self.layers[kind] = np.asarray(layers, dtype=np.int64).copy()
            self.sums[kind] = np.zeros_like(total)
            self.sum_sqs[kind] = np.zeros_like(total_sq)
            self.counts[kind] = np.zeros_like(count)
        if not np.array_equal(self.layers[kind], layers) or self.sums[kind].shape != total.shape:
            raise ShardError(
                f"{where}: channel_stats/{kind} covers layers {list(layers)} with shape "
                f"{total.shape}; earlier shards had {list(self.layers[kind])} "
                f"{self.sums[kind].shape}. Analyze shards of one capture spec together."
            )
        self.sums[kind] += total
        self.sum_sqs[kind] += total_sq
        self.counts[kind] += count

    def merge(self, other: ChannelStats) -> None:
        for kind in other.sums:
            self._add(
                kind,
                other.layers[kind],
                other.sums[kind],
                other.sum_sqs[kind],
                other.counts[kind],
                "merged statistics",
            )

    def mean(self, kind: str) -> np.ndarray:
        return self.sums[kind] / np.maximum(self.counts[kind], 1)[:, None]

    def rms(self, kind: str) -> np.ndarray:
        """sqrt(E[x^2]) per channel: Wanda's ||X_j||_2 up to the token count."""
        return np.sqrt(self.sum_sqs[kind] / np.maximum(self.counts[kind], 1)[:, None])

    def variance(self, kind: str) -> np.ndarray:
        """E[x^2] - E[x]^2 (the stored contract is raw sums), clipped at 0."""
        mean = self.mean(kind)
        return np.maximum(
            self.sum_sqs[kind] / np.maximum(self.counts[kind], 1)[:, None] - mean * mean, 0.0
        )


EmbedFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class AnalysisAccumulator:
    """Everything `analyze` needs, accumulated shard by shard; mergeable across splits.

    `embed(token_ids) -> float32 [T, H]` rebuilds layer 0's input (None: no embedding site).
    Content tokens exclude position 0 and `special_ids`; `last` is each shard's last position.
    """

    embed: EmbedFn | None = None
    special_ids: frozenset[int] = frozenset()
    rule: MassiveRule = field(default_factory=MassiveRule)
    block_bytes: int = DEFAULT_BLOCK_BYTES
    layout: SiteLayout | None = None
    hidden_size: int = 0
    populations: dict[str, ResidualStats] = field(default_factory=dict)
    channels: ChannelStats = field(default_factory=ChannelStats)
    num_shards: int = 0
    bytes_read: int = 0
    attrs: dict = field(default_factory=dict)

    def _init_layout(self, reader: ShardReader) -> None:
        layout = SiteLayout(
            layers=tuple(int(x) for x in reader.layers),
            sites=tuple(reader.sites),
            has_embedding=self.embed is not None,
        )
        self.layout = layout
        self.hidden_size = reader.hidden_size
        num_sites = len(layout.labels)
        bsites = [layout.boundary_site(b) for b in layout.boundaries]
        self.populations = {
            name: ResidualStats(num_sites, self.hidden_size, bsites, self.rule)
            for name in POPULATIONS
        }
        self.attrs = {k: v for k, v in reader.attrs.items() if k not in ("created",)}

    def add_shard(self, path: str | Path) -> None:
        """Stream one shard into the accumulators, one token block at a time."""
        with ShardReader(path) as reader:
            if self.layout is None:
                self._init_layout(reader)
            layout = self.layout
            assert layout is not None
            if (
                tuple(int(x) for x in reader.layers) != layout.layers
                or tuple(reader.sites) != layout.sites
                or reader.hidden_size != self.hidden_size
            ):
                raise ShardError(
                    f"{reader.path}: layers {reader.layers.tolist()}, sites {reader.sites}, "
                    f"hidden {reader.hidden_size} differ from the first shard's "
                    f"({list(layout.layers)}, {list(layout.sites)}, {self.hidden_size}); "
                    "analyze shards of one model and capture spec together"
                )
            self.channels.add_shard(reader)
            positions = reader.positions
            tokens = np.concatenate([reader.input_tokens, reader.output_tokens])[positions]
            special = np.fromiter(self.special_ids, dtype=np.int64, count=len(self.special_ids))
            content = (positions != 0) & ~np.isin(tokens, special)
            last = positions == positions.max() if len(positions) else content
            masks = {"all": np.ones(len(positions), bool), "content": content, "last": last}
            per_token = len(layout.labels) * self.hidden_size * 8 * 5  # x, |x|, flags, temps
            step = max(1, self.block_bytes // per_token)
            for start in range(0, len(positions), step):
                stop = min(start + step, len(positions))
                x = self._read_block(reader, start, stop, tokens[start:stop])
                first = next(iter(self.populations.values()))
                block = TokenBlock(
                    x,
                    positions[start:stop],
                    tokens[start:stop],
                    reader.path.name,
                    first.boundary_sites,
                    self.rule,
                )
                for name, stats in self.populations.items():
                    stats.add_block(block, masks[name][start:stop])
                del block, x
            self.num_shards += 1
            self.bytes_read += reader.path.stat().st_size

    def _read_block(
        self, reader: ShardReader, start: int, stop: int, tokens: np.ndarray
    ) -> np.ndarray:
        layout = self.layout
        assert layout is not None
        x = np.empty((len(layout.labels), stop - start, self.hidden_size))
        base = 0
        if layout.has_embedding and self.embed is not None:
            x[0] = self.embed(tokens)
            base = 1
        stride = len(layout.sites)
        for k, site in enumerate(layout.sites):
            # ShardReader reads whole layers; a token range keeps memory bounded on long shards.
            ds = reader._file["layer_outputs"][site]  # noqa: SLF001
            dtype = ds.attrs.get("dtype", "float32")
            dtype = dtype.decode() if isinstance(dtype, bytes) else str(dtype)
            x[base + k :: stride] = from_storage(ds[:, start:stop, :], dtype)
        return x

    def merge(self, other: AnalysisAccumulator) -> None:
        """Fold another accumulator (built from other shards of the same layout) into this one."""
        if other.layout is None:
            return
        if self.layout is None:
            self.layout, self.hidden_size = other.layout, other.hidden_size
            self.populations = {
                name: ResidualStats(
                    len(other.layout.labels), other.hidden_size, stats.boundary_sites, self.rule
                )
                for name, stats in other.populations.items()
            }
            self.attrs = dict(other.attrs)
        if other.layout != self.layout or other.hidden_size != self.hidden_size:
            raise ValueError("cannot merge analyses of different layers, sites or hidden sizes")
        for name, stats in self.populations.items():
            stats.merge(other.populations[name])
        self.channels.merge(other.channels)
        self.num_shards += other.num_shards
        self.bytes_read += other.bytes_read

    def add_shards(self, paths: Iterable[str | Path]) -> None:
        for path in paths:
            self.add_shard(path)


def _nan_to_none(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def layer_metrics(stats: ResidualStats, layout: SiteLayout) -> dict:
    """Per-layer scores from one population's similarity and angle sums.

    block_influence[l] = 1 - mean cos(h_{l-1}, h_l) (ShortGPT); attention and MLP scores are
    1 - mean cos(h_{l-1}, a_l) and 1 - mean cos(a_l, h_l) (LLM-Drop); angular_distance[n][l] =
    mean angle(h_{l-1}, h_{l+n-1}) / pi for dropping the block [l, l+n) (Gromov et al.). A
    value is None where a site it needs was not captured (layer 0 needs the embedding).
    """
    sim = stats.similarity()
    std = stats.similarity_std()
    n = max(stats.count, 1)
    layers = list(layout.layers)
    out: dict[str, list] = {
        "layers": layers,
        "block_influence": [],
        "block_influence_stderr": [],
        "consecutive_similarity": [],
        "attention_score": [],
        "mlp_score": [],
        "attention_update_ratio": [],
        "mlp_update_ratio": [],
    }
    ratio = stats.update_ratio_sum / n
    for layer in layers:
        inp = layout.boundary_site(layer)
        mid = layout.index(layer, "post_attention")
        post = layout.index(layer, "post_mlp")

        def score(i: int | None, j: int | None) -> float | None:
            return None if i is None or j is None else _nan_to_none(1.0 - sim[i, j])

        out["block_influence"].append(score(inp, post))
        out["block_influence_stderr"].append(
            None if inp is None or post is None else _nan_to_none(std[inp, post] / np.sqrt(n))
        )
        out["consecutive_similarity"].append(
            None if inp is None or post is None else _nan_to_none(sim[inp, post])
        )
        out["attention_score"].append(score(inp, mid))
        out["mlp_score"].append(score(mid, post))
        # update ratio k is |x_{k+1} - x_k| / |x_k| for consecutive sites k, k+1
        out["attention_update_ratio"].append(
            None if inp is None or mid is None or mid != inp + 1 else _nan_to_none(ratio[inp])
        )
        out["mlp_update_ratio"].append(
            None if mid is None or post is None else _nan_to_none(ratio[mid])
        )
    out.update(gromov(stats, layout))
    return out


def gromov(stats: ResidualStats, layout: SiteLayout) -> dict:
    """Angular distance d(l, n) for every block [l, l+n) and the best block per size n."""
    angle = stats.mean_angle() / np.pi
    bounds = layout.boundaries
    pos = {b: k for k, b in enumerate(bounds)}
    num_layers = max(layout.layers) + 1 if layout.layers else 0
    table: dict[str, list[float | None]] = {}
    best: list[dict] = []
    for size in range(1, num_layers + 1):
        row: list[float | None] = []
        for start in range(0, num_layers - size + 1):
            i, j = pos.get(start), pos.get(start + size)
            row.append(None if i is None or j is None else _nan_to_none(angle[i, j]))
        table[str(size)] = row
        valid = [(d, s) for s, d in enumerate(row) if d is not None]
        if valid:
            d, s = min(valid)
            best.append(
                {
                    "n": size,
                    "start": s,
                    "drop": list(range(s, s + size)),
                    "distance": d,
                    "compares": [_boundary_label(s), _boundary_label(s + size)],
                }
            )
    return {"angular_distance": table, "best_blocks": best}


def _boundary_label(b: int) -> str:
    return EMBEDDING if b == 0 else f"{b - 1}.post_mlp"
