"""Streaming, mergeable statistics over activation shards: the analyzer's math, in one place.

Every accumulator keeps float64 sums only (never a token), so memory depends on the model, not
on the number of shards, and `merge` of accumulators built from any split of the shards equals
one pass over all of them (up to float64 rounding). Shards are read token block by token block
(every site of one block at once), which bounds memory within a shard as well.

Sites are ordered `embedding` (when rebuilt from the model), then `post_attention` and
`post_mlp` of every captured layer. Boundary b is the residual entering layer b: the embedding
for b = 0, the `post_mlp` of layer b - 1 otherwise.

The per-token formulas live in `formulas` (array in, array out; float32 compute by default,
see its docstring for the precision); this module sums them over tokens in float64, splits
them into token populations and merges accumulators.
"""

from __future__ import annotations

import copy
import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actclient.analysis import formulas
from vllm_activations.contract.shard import ShardError, ShardReader, from_storage
from vllm_activations.contract.spec import CHANNEL_KINDS

POPULATIONS: tuple[str, ...] = ("all", "content", "last")
# Where the accumulator adds each token set of a raw shard's blocks, and each population of a
# summary shard (see AnalysisAccumulator).
RAW_PARTS = {"content": "content", "other": "rest", "last": "last"}
# A schema-2 summary's populations: its `all` is added to `rest` and its `content` kept apart.
SUMMARY_PARTS = {"all": "rest", "content": "summary_content", "last": "last"}
PARTS: tuple[str, ...] = ("content", "rest", "last")  # summary_content: made when needed
EMBEDDING = "embedding"
DEFAULT_BLOCK_BYTES = 256 << 20  # working memory of one token block, all sites
COMPUTE_DTYPE = np.float32  # per-token arithmetic; sums are float64 whatever this is
POWER_SUM_ROWS = 8  # fewer content tokens in a block: their channel sums are taken exactly
POWER_SUM_CONDITION = 2.0  # mean^2 + var above this x var: a channel's sums are taken exactly
REBASE_TOKENS = 64  # tokens after which blocks take the running mean as the moments' shift
CACHE_CHUNK_BYTES = 512 << 10  # sites of one token whose per-site formulas run together
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


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True in a 1-d mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, stops = np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()
    return list(zip(starts, stops, strict=True))


def _exact_sums(flat: np.ndarray, rows: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum d, sum d^2) with d = x - k over a few token rows of flat [T, S*H], in float64."""
    if not len(rows):
        return np.zeros_like(k), np.zeros_like(k)
    d = flat[rows].astype(np.float64) - k
    return d.sum(0), np.einsum("tk,tk->k", d, d)


def _power_sums(
    flat: np.ndarray, flat2: np.ndarray, mask: np.ndarray, k: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(sum d, sum d^2), d = x - k, over the `mask` rows from the token sums S1 of x and S2 of
    x^2 (BLAS, x's dtype): sum d = S1 - n k, sum d^2 = S2 - 2 k S1 + n k^2.

    Their rounding is relative to S2 = n (mean^2 + var), so channels whose S2 exceeds
    POWER_SUM_CONDITION x n var (a mean far from 0 for its spread) are summed exactly.
    """
    rows = np.flatnonzero(mask)
    runs = _runs(mask)
    n = len(rows)
    if n < POWER_SUM_ROWS or len(runs) > 8:
        return _exact_sums(flat, rows, k)
    ones = np.ones(len(flat), dtype=flat.dtype)
    (a, b), rest = runs[0], runs[1:]
    s1, s2 = ones[: b - a] @ flat[a:b], ones[: b - a] @ flat2[a:b]
    for a, b in rest:
        s1 += ones[: b - a] @ flat[a:b]
        s2 += ones[: b - a] @ flat2[a:b]
    # Which channels cancel, tested in x's dtype (it only picks the ones summed exactly).
    spread = np.multiply(s1, s1)
    spread /= n
    np.subtract(s2, spread, out=spread)
    spread *= POWER_SUM_CONDITION
    bad = np.flatnonzero(spread < s2)
    del spread
    # float64, in place: sum d = S1 - n k; sum d^2 = S2 - (S1 + sum d) k
    s1, dev_sq = s1.astype(np.float64), s2.astype(np.float64)
    dev_sum = np.multiply(k, -n)
    dev_sum += s1
    s1 += dev_sum
    s1 *= k
    dev_sq -= s1
    if len(bad):
        d = flat[np.ix_(rows, bad)].astype(np.float64) - k[bad]
        dev_sum[bad] = d.sum(0)
        dev_sq[bad] = (d * d).sum(0)
    return dev_sum, dev_sq


def _first_row_equal(rows: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Per column of rows [N, F], the first row index equal to `value` [F] (N where none).

    Equal rows weighted N - row in the narrowest unsigned type, then one max across rows:
    two light passes (numpy's argmax across rows copies the array to transpose it).
    """
    n = len(rows)
    eq = np.equal(rows, value)
    kind = np.uint8 if n < 1 << 8 else np.uint16 if n < 1 << 16 else np.uint32
    weights = np.arange(n, 0, -1, dtype=kind)[:, None]
    score = eq.view(np.uint8) if kind is np.uint8 else eq.astype(kind)
    np.multiply(score, weights, out=score)
    return n - np.maximum.reduce(score, axis=0).astype(np.int64)


def _column_peak(mag: np.ndarray, runs: list[tuple[int, int]], rows: np.ndarray) -> np.ndarray:
    """max over the selected token rows of |x| [S, H] (zeros when none): runs or a gather."""
    if runs and len(runs) <= 8:
        return np.maximum.reduce([np.maximum.reduce(mag[a:b], axis=0) for a, b in runs])
    if len(rows):
        return np.maximum.reduce(mag[rows], axis=0)
    return np.zeros(mag.shape[1:], dtype=mag.dtype)


class TokenBlock:
    """Per-token quantities of one block of tokens, computed once for every population.

    `x` is [tokens, sites, hidden] in the compute dtype. Holds the cosine matrix [T, S, S],
    boundary angles [T, B, B] (upper triangle), norms, update ratios, kurtosis, Hoyer
    sparsity (all from `formulas`), and for the token sets `content`, `other` (the rest:
    position 0, special tokens) and `last` (`masks` gives content and last) their per-channel
    sums of deviations from the block's `shift` [S, H] and column peaks of |x|, and the rows
    holding massive activations. The `all` population is content + other, merged once by the
    accumulator rather than summed block by block.
    """

    def __init__(
        self,
        x: np.ndarray,
        positions: np.ndarray,
        tokens: np.ndarray,
        shard: str,
        boundary_sites: list[int],
        rule: MassiveRule,
        masks: dict[str, np.ndarray],
        shift: np.ndarray | None = None,
        scratch: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.positions, self.tokens, self.shard = positions, tokens, shard
        t, num_sites, hidden = x.shape
        self.masks = {**masks, "other": ~masks["content"]}
        # two buffers like x (|x| and x^2), reused across blocks when given
        mag_buf, temp = scratch if scratch is not None else (np.empty_like(x), np.empty_like(x))
        self.mag = mag_buf
        peak = np.empty((t, num_sites), x.dtype)
        self.sq = np.empty((t, num_sites))
        gram, rest = np.empty((t, num_sites, num_sites)), np.empty((t, num_sites))
        update = np.empty((t, max(num_sites - 1, 0)))
        self.kurtosis, abs_sum = np.empty((t, num_sites)), np.empty((t, num_sites))
        # One token at a time, and its per-site formulas a few sites at a time: those rows,
        # their |x| and x^2 stay in the core's cache across the formulas, where whole-block
        # passes would each stream the block from memory again. Then the token's Gram.
        diff = np.empty((1, *x.shape[1:]), x.dtype)
        chunk = max(2, CACHE_CHUNK_BYTES // (hidden * x.dtype.itemsize))
        for i in range(t):
            for a in range(0, num_sites, chunk):
                b = min(a + chunk, num_sites)
                part, sq = x[i : i + 1, a:b], self.sq[i : i + 1, a:b]
                mag = np.abs(part, out=mag_buf[i : i + 1, a:b])
                np.maximum.reduce(mag, axis=2, out=peak[i : i + 1, a:b])
                sq[...] = formulas.squared_norms(part)
                self.kurtosis[i, a:b] = formulas.excess_kurtosis(part, sq, temp[i : i + 1, a:b])[0]
                abs_sum[i, a:b] = formulas.channel_sums(mag)[0]
                lo = max(a - 1, 0)  # the update into this chunk's first site, too
                update[i, lo : b - 1] = formulas.update_norms(
                    x[i : i + 1, lo:b], diff[:, : b - lo]
                )[0]
            one = x[i : i + 1]
            gram_one, rest_one = formulas.site_gram(one, self.sq[i : i + 1], peak[i : i + 1])
            gram[i], rest[i] = gram_one[0], rest_one[0]
        self.norms = np.sqrt(self.sq)
        self.gram = formulas.gram_cosines(gram)
        del gram
        formulas.exact_near_cosines(x, self.gram, rest)
        self.gram_sq = self.gram * self.gram
        self.angle = formulas.boundary_angles(x, self.gram, rest, boundary_sites)
        safe = np.where(self.norms > 0, self.norms, 1.0)
        self.update_ratio = update / safe[:, :-1]
        self.hoyer = formulas.hoyer_sparsity(abs_sum, self.norms, hidden)
        self._moments(x, masks, shift, temp)
        self._peaks()
        rows_t, rows_s = np.nonzero(peak > rule.threshold)
        if len(rows_t):
            flagged = formulas.massive_flags(self.mag[rows_t, rows_s], rule.threshold, rule.ratio)
            hit = flagged.any(1)
            self.massive = (rows_t[hit], rows_s[hit], flagged[hit], x[rows_t[hit], rows_s[hit]])
        else:
            self.massive = None

    def _moments(
        self,
        x: np.ndarray,
        masks: dict[str, np.ndarray],
        shift: np.ndarray | None,
        x2: np.ndarray,
    ) -> None:
        # Per-channel sums over tokens of d = x - shift and d^2 for each population, where the
        # shift is near the channel means (the accumulator's once it has seen enough tokens,
        # else this block's content mean). Content tokens: from the BLAS token sums of x and
        # of x^2 (`x2`, left by the kurtosis), exactly where that would cancel; the few
        # other and last tokens: exactly. Content and other partition the block.
        content = masks["content"]
        t = len(x)
        flat, flat2 = x.reshape(t, -1), x2.reshape(t, -1)
        if shift is None:
            rows = content if content.any() else np.ones(t, dtype=bool)
            # summed run by run: a gather of the rows would copy the block
            total = sum(np.add.reduce(flat[a:b], axis=0, dtype=np.float64) for a, b in _runs(rows))
            mean = total / np.count_nonzero(rows)
            shift = mean.astype(x.dtype).astype(np.float64).reshape(x.shape[1:])
        self.shift = shift
        k = shift.reshape(-1)
        shape = x.shape[1:]
        sums = {"content": _power_sums(flat, flat2, content, k)}
        for name in ("other", "last"):  # empty sets have no sums (add_block skips them)
            rows = np.flatnonzero(self.masks[name])
            if len(rows):
                sums[name] = _exact_sums(flat, rows, k)
        self.deviation_sums = {
            name: (dev.reshape(shape), dev_sq.reshape(shape))
            for name, (dev, dev_sq) in sums.items()
        }

    def _peaks(self) -> None:
        # column peaks of the non-empty token sets (add_block skips empty ones)
        self.peaks = {}
        for name in RAW_PARTS:
            mask = self.masks[name]
            rows = np.flatnonzero(mask)
            if len(rows):
                runs = _runs(mask) if name == "content" else []
                self.peaks[name] = _column_peak(self.mag, runs, rows)
        self._content_row: np.ndarray | None = None  # first content row at the peak, cached

    def locate(self, population: str, flat: np.ndarray | None, peak: np.ndarray) -> np.ndarray:
        """Block row of the first |x| equal to `peak` (the population's column peak) among
        the population's rows, per flat (site, channel) index (`flat` None: every one, on
        whole arrays rather than gathers). Content rows are searched once per channel and
        cached."""
        mask = self.masks[population]
        rows = np.flatnonzero(mask)
        if len(rows) == 1:  # the last-token population: one row per shard
            return np.full(len(peak), rows[0])
        if population == "content":
            return self._content_first(flat)
        return self._first_equal(mask, flat, peak)

    def _content_first(self, flat: np.ndarray | None) -> np.ndarray:
        size = self.mag[0].size
        mask, peaks = self.masks["content"], self.peaks["content"].ravel()
        if flat is None:
            if self._content_row is None or (self._content_row < 0).any():
                self._content_row = self._first_equal(mask, None, peaks)
            return self._content_row
        if self._content_row is None:
            self._content_row = np.full(size, -1, dtype=np.int64)
        missing = flat[self._content_row[flat] < 0]
        if len(missing):
            self._content_row[missing] = self._first_equal(mask, missing, peaks[missing])
        return self._content_row[flat]

    def _first_equal(
        self, mask: np.ndarray, flat: np.ndarray | None, peak: np.ndarray
    ) -> np.ndarray:
        # The mask's runs of rows in order (its rows gathered when there are many), the first
        # run holding the peak wins; T where no mask row holds it. `flat` None: every column.
        t = self.mag.shape[0]
        table = self.mag.reshape(t, -1)
        full = flat is None
        row = np.full(len(peak), t, dtype=np.int64)
        runs = _runs(mask)
        if len(runs) > 8:
            rows = np.flatnonzero(mask)
            part = table[rows] if full else table[np.ix_(rows, flat)]
            first = _first_row_equal(part, peak)
            hit = first < len(rows)
            row[hit] = rows[first[hit]]
            return row
        for k, (a, b) in enumerate(runs):
            first = _first_row_equal(table[a:b] if full else table[a:b, flat], peak)
            if k == 0:
                np.copyto(row, first + a, where=first < b - a)
            else:
                np.copyto(row, first + a, where=(first < b - a) & (row == t))
        return row


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
        # per-channel moments as sums of deviations from a fixed shift near the mean
        self.channel_shift: np.ndarray | None = None
        self.channel_dev_sum = np.zeros((s, h))
        self.channel_dev_sq = np.zeros((s, h))
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

    def add_block(self, block: TokenBlock, population: str) -> None:
        """Add the tokens of `block` in `population` (per-token values are computed once)."""
        mask = block.masks[population]
        t = int(mask.sum())
        if t == 0:
            return
        w = mask.astype(np.float64)
        tokens = len(w)
        self.cos_sum += (w @ block.gram.reshape(tokens, -1)).reshape(self.cos_sum.shape)
        self.cos_sq_sum += (w @ block.gram_sq.reshape(tokens, -1)).reshape(self.cos_sq_sum.shape)
        self.angle_sum += (w @ block.angle.reshape(tokens, -1)).reshape(self.angle_sum.shape)
        self.norm_sum += w @ block.norms
        self.norm_sq_sum += w @ block.sq
        self.update_ratio_sum += w @ block.update_ratio
        self.kurtosis_sum += w @ block.kurtosis
        self.hoyer_sum += w @ block.hoyer
        dev_sum, dev_sq = block.deviation_sums[population]
        if self.channel_shift is None:
            self.channel_shift = block.shift
        elif block.shift is not self.channel_shift:
            # the same sums about this accumulator's shift (exact algebra, in float64)
            offset = block.shift - self.channel_shift
            dev_sq = dev_sq + (2.0 * dev_sum + t * offset) * offset
            dev_sum = dev_sum + t * offset
        self.channel_dev_sum += dev_sum
        self.channel_dev_sq += dev_sq
        self.count += t
        peak = block.peaks[population].ravel()
        flat = np.flatnonzero(peak >= self.absmax.ravel())  # better or tied: _update_absmax
        if 4 * len(flat) > len(peak):
            flat = None  # most channels: whole arrays beat fancy indexing
        if flat is None or len(flat):
            value = peak if flat is None else peak[flat]
            row = block.locate(population, flat, value)
            self._update_absmax(
                flat, value.astype(np.float64), block.positions[row], block.tokens[row]
            )
        if block.massive is not None:
            rows_t, rows_s, flagged, values = block.massive
            keep = mask[rows_t]
            if keep.any():
                self._add_massive(
                    rows_t[keep],
                    rows_s[keep],
                    flagged[keep],
                    values[keep],
                    block.positions,
                    block.tokens,
                    block.shard,
                )

    def _update_absmax(
        self, flat: np.ndarray | None, peak: np.ndarray, position: np.ndarray, token: np.ndarray
    ) -> None:
        # Ties go to the smaller (position, token), so the result is independent of shard order.
        # `flat` None: every (site, channel), on whole arrays rather than fancy indexing.
        absmax, pos, tok = (
            a.reshape(-1) for a in (self.absmax, self.absmax_position, self.absmax_token)
        )
        everything = flat is None
        if everything:
            cur, cur_pos, cur_tok = absmax, pos, tok
        else:
            cur, cur_pos, cur_tok = absmax[flat], pos[flat], tok[flat]
        better = peak > cur
        tie = np.flatnonzero(peak == cur)  # few: the order test only where it is needed
        if len(tie):
            p, q = position[tie], cur_pos[tie]
            earlier = (q >= 0) & ((p < q) | ((p == q) & (token[tie] < cur_tok[tie])))
            better[tie[earlier]] = True
        if everything:
            np.copyto(absmax, peak, where=better)
            np.copyto(pos, position, where=better)
            np.copyto(tok, token, where=better)
            return
        idx = flat[better]
        absmax[idx], pos[idx], tok[idx] = peak[better], position[better], token[better]

    def _add_massive(
        self,
        rows_t: np.ndarray,
        rows_s: np.ndarray,
        flagged: np.ndarray,
        values: np.ndarray,
        positions: np.ndarray,
        tokens: np.ndarray,
        shard: str,
    ) -> None:
        # rows are (token, site) pairs with at least one flagged channel, token-major order
        np.add.at(self.massive_count, rows_s, flagged.astype(np.int64))
        self.massive_tokens += np.bincount(rows_s, minlength=self.num_sites)
        hit_tokens = np.unique(rows_t)
        self.massive_positions.update(positions[hit_tokens].tolist())
        self.massive_token_ids.update(tokens[hit_tokens].tolist())
        for s in np.unique(rows_s):
            mine = np.nonzero(rows_s == s)[0]
            k_idx, h_idx = np.nonzero(flagged[mine])
            picked = values[mine[k_idx], h_idx].astype(np.float64)
            magnitude = np.abs(picked)
            keep = np.argsort(-magnitude, kind="stable")[:TOP_EVENTS]
            events = [
                (
                    float(magnitude[k]),
                    float(picked[k]),
                    int(h_idx[k]),
                    shard,
                    int(positions[rows_t[mine[k_idx[k]]]]),
                    int(tokens[rows_t[mine[k_idx[k]]]]),
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
        if other.count:
            n, mean, m2 = chan_merge(
                self.count,
                self.channel_mean,
                self.channel_m2,
                other.count,
                other.channel_mean,
                other.channel_m2,
            )
            if self.channel_shift is None:
                self.channel_shift = other.channel_shift
            self.count = int(n)
            self.set_moments(mean, m2)
        self._update_absmax(
            None,
            other.absmax.ravel(),
            other.absmax_position.ravel(),
            other.absmax_token.ravel(),
        )
        self.massive_positions.update(other.massive_positions)
        self.massive_token_ids.update(other.massive_token_ids)
        for s in range(self.num_sites):
            self.massive_events[s] = _top(self.massive_events[s] + other.massive_events[s])

    @property
    def channel_mean(self) -> np.ndarray:
        """Per-site, per-channel mean over tokens [S, H]."""
        if not self.count or self.channel_shift is None:
            return np.zeros_like(self.channel_dev_sum)
        return self.channel_shift + self.channel_dev_sum / self.count

    @property
    def channel_m2(self) -> np.ndarray:
        """Per-site, per-channel sum of squared deviations from the mean [S, H]."""
        if not self.count:
            return np.zeros_like(self.channel_dev_sq)
        m2 = self.channel_dev_sq - self.channel_dev_sum * self.channel_dev_sum / self.count
        return np.maximum(m2, 0.0)

    def rebase(self, shift: np.ndarray) -> None:
        """Hold the channel moments as deviations from `shift` (a value near the mean)."""
        mean, m2 = self.channel_mean, self.channel_m2
        self.channel_shift = shift
        self.set_moments(mean, m2)

    def set_moments(self, mean: np.ndarray, m2: np.ndarray) -> None:
        """Re-express (mean, M2) of `count` tokens as deviation sums from the shift."""
        if self.channel_shift is None:
            self.channel_shift = mean.astype(np.float32).astype(np.float64)
        offset = mean - self.channel_shift
        self.channel_dev_sum = offset * self.count
        self.channel_dev_sq = m2 + offset * offset * self.count

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
    """Per-channel sums from shards' `channel_stats/<kind>/{sum,sum_sq,abs_sum,count}` (float64).

    Each shard is one request, so besides the token sums this keeps Minitron's per-request
    statistic: `request_mean_abs_sq` is the sum over requests of (abs_sum / count)^2, whose
    square root is the channel's Minitron importance (L2 over requests of the mean |x|).
    """

    layers: dict[str, np.ndarray] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    sum_sqs: dict[str, np.ndarray] = field(default_factory=dict)
    abs_sums: dict[str, np.ndarray] = field(default_factory=dict)
    request_mean_abs_sq: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)

    def add_shard(self, reader: ShardReader) -> None:
        """Add the channel statistics a shard holds (shards without them add nothing)."""
        for kind in CHANNEL_KINDS:
            base = f"channel_stats/{kind}"
            if f"{base}/sum" not in reader:
                continue
            total = np.asarray(reader.dataset(f"{base}/sum"), dtype=np.float64)
            total_sq = np.asarray(reader.dataset(f"{base}/sum_sq"), dtype=np.float64)
            if f"{base}/abs_sum" not in reader:
                raise ShardError(
                    f"{reader.path}: {base} has no abs_sum (recorded by an older "
                    "vllm-activations); record it again for Minitron importance"
                )
            total_abs = np.asarray(reader.dataset(f"{base}/abs_sum"), dtype=np.float64)
            count = np.asarray(reader.dataset(f"{base}/count"), dtype=np.int64)
            if (
                not total.shape == total_sq.shape == total_abs.shape
                or total.shape[:1] != count.shape
            ):
                raise ShardError(f"{reader.path}: {base} has inconsistent shapes")
            mean_abs = total_abs / np.maximum(count, 1)[:, None]
            sums = (total, total_sq, total_abs, mean_abs * mean_abs)
            self._add(kind, reader.layers, sums, count, 1, reader.path)

    def _add(
        self,
        kind: str,
        layers: np.ndarray,
        sums: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        count: np.ndarray,
        requests: int,
        where: Path | str,
    ) -> None:
        groups = (self.sums, self.sum_sqs, self.abs_sums, self.request_mean_abs_sq)
        total = sums[0]
        if kind not in self.sums:
            self.layers[kind] = np.asarray(layers, dtype=np.int64).copy()
            for group, value in zip(groups, sums, strict=True):
                group[kind] = np.zeros_like(value)
            self.counts[kind] = np.zeros_like(count)
            self.requests[kind] = 0
        if not np.array_equal(self.layers[kind], layers) or self.sums[kind].shape != total.shape:
            raise ShardError(
                f"{where}: channel_stats/{kind} covers layers {list(layers)} with shape "
                f"{total.shape}; earlier shards had {list(self.layers[kind])} "
                f"{self.sums[kind].shape}. Analyze shards of one capture spec together."
            )
        for group, value in zip(groups, sums, strict=True):
            group[kind] += value
        self.counts[kind] += count
        self.requests[kind] += requests

    def merge(self, other: ChannelStats) -> None:
        for kind in other.sums:
            sums = (
                other.sums[kind],
                other.sum_sqs[kind],
                other.abs_sums[kind],
                other.request_mean_abs_sq[kind],
            )
            self._add(
                kind,
                other.layers[kind],
                sums,
                other.counts[kind],
                other.requests[kind],
                "merged statistics",
            )

    def minitron(self, kind: str) -> np.ndarray:
        """Minitron importance per layer and channel [L, C]: sqrt(sum_r (mean_r |x|)^2)."""
        return np.sqrt(self.request_mean_abs_sq[kind])

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


def decode_into(stored: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Write stored activations (`from_storage` semantics) into `out`, a view of any strides.

    bfloat16 bits widen straight into a float32 destination (one pass, no temporary).
    """
    if dtype == "bfloat16" and out.dtype == np.float32:
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = from_storage(stored, dtype)


@dataclass
class AnalysisAccumulator:
    """Everything `analyze` needs, accumulated shard by shard; mergeable across splits.

    Token blocks of raw shards add to three disjoint parts, `content`, `rest` (the other raw
    tokens, and summary shards' `all` population) and `last`; summary shards' `content` goes
    to `summary_content`. `populations` merges them once per read-out: all = content + rest,
    content = content + summary_content, so no block pays for `all` a second time.

    `embed(token_ids) -> float32 [T, H]` rebuilds layer 0's input (None: no embedding site).
    Content tokens exclude position 0 and `special_ids`; `last` is each shard's last position.
    `compute_dtype` is the per-token arithmetic type (float32; float64 for audits); after
    `warm_tokens` tokens the channel moments use the running mean as their shift. A preset
    `layout` and `hidden_size` make every shard that differs a ShardError (parallel workers
    get the layout of the first shard this way).
    """

    embed: EmbedFn | None = None
    special_ids: frozenset[int] = frozenset()
    rule: MassiveRule = field(default_factory=MassiveRule)
    block_bytes: int = DEFAULT_BLOCK_BYTES
    compute_dtype: type = COMPUTE_DTYPE
    warm_tokens: int = REBASE_TOKENS
    layout: SiteLayout | None = None
    hidden_size: int = 0
    parts: dict[str, ResidualStats] = field(default_factory=dict)
    channels: ChannelStats = field(default_factory=ChannelStats)
    num_shards: int = 0
    bytes_read: int = 0
    attrs: dict = field(default_factory=dict)
    # token-block memory kept across blocks and shards (fresh memory costs page faults)
    _buffers: dict[str, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _merged: dict[str, ResidualStats] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.layout is not None and not self.parts:
            self._init_parts()

    def __getstate__(self) -> dict:
        # a worker sends sums, not its buffers or read-outs
        return {**self.__dict__, "_buffers": {}, "_merged": None}

    @property
    def populations(self) -> dict[str, ResidualStats]:
        """The token populations of POPULATIONS, merged from the parts (cached until the
        next shard or merge)."""
        if self._merged is None:
            if not self.parts:
                return {}
            parts = self.parts
            self._merged = {
                "all": _merged(parts["content"], parts["rest"]),
                "content": _merged(parts["content"], parts.get("summary_content")),
                "last": parts["last"],
            }
        return self._merged

    def release_buffers(self) -> None:
        """Free the token-block memory kept between shards (before sending or merging)."""
        self._buffers.clear()

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A C-contiguous array of `shape` on memory kept under `key` (grown when too small)."""
        size = int(np.prod(shape))
        held = self._buffers.get(key)
        if held is None or held.dtype != dtype or held.size < size:
            held = self._buffers[key] = np.empty(size, dtype)
        return held[:size].reshape(shape)

    def _init_parts(self) -> None:
        self.parts = {name: self._new_stats() for name in PARTS}

    def _new_stats(self) -> ResidualStats:
        layout = self.layout
        assert layout is not None
        bsites = [layout.boundary_site(b) for b in layout.boundaries]
        return ResidualStats(len(layout.labels), self.hidden_size, bsites, self.rule)

    def _init_layout(self, reader: ShardReader) -> None:
        self.layout = layout_of(reader, self.embed is not None)
        self.hidden_size = reader.hidden_size
        self._init_parts()
        self.attrs = shard_attrs(reader)

    def add_shard(self, path: str | Path, use_summary: bool = True) -> None:
        """Stream one shard into the accumulators, one token block at a time. A shard with
        a device summary adds that (no token pass) unless `use_summary` is false; then its
        raw layer outputs are read (the summary's cross-check, `crosscheck.py`)."""
        with ShardReader(path) as reader:
            if self.layout is None:
                self._init_layout(reader)
            elif not self.attrs:
                self.attrs = shard_attrs(reader)
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
            if not use_summary and not reader.has_tensors:
                raise ShardError(f"{reader.path}: no layer outputs stored (tensors: false)")
            self.channels.add_shard(reader)
            self._merged = None
            if reader.has_summary and use_summary:  # summed on the device: no token pass
                self._add_summary(reader)
                return
            positions = reader.positions
            tokens = np.concatenate([reader.input_tokens, reader.output_tokens])[positions]
            special = np.fromiter(self.special_ids, dtype=np.int64, count=len(self.special_ids))
            content = (positions != 0) & ~np.isin(tokens, special)
            last = positions == positions.max() if len(positions) else content
            itemsize = np.dtype(self.compute_dtype).itemsize
            per_token = len(layout.labels) * self.hidden_size * itemsize * 6  # x, |x|, temps
            step = max(1, self.block_bytes // per_token)
            parts = self.parts
            first, raw = parts["content"], [parts[name] for name in RAW_PARTS.values()]
            shape = (min(step, len(positions)), len(layout.labels), self.hidden_size)
            work = [self._buffer(key, shape, self.compute_dtype) for key in ("x", "|x|", "x^2")]
            for start in range(0, len(positions), step):
                stop = min(start + step, len(positions))
                x = self._read_block(reader, start, stop, tokens[start:stop], work[0])
                masks = {"content": content[start:stop], "last": last[start:stop]}
                seen = first.count + parts["rest"].count
                warm = seen >= self.warm_tokens and all(
                    p.channel_shift is first.channel_shift for p in raw
                )
                block = TokenBlock(
                    x,
                    positions[start:stop],
                    tokens[start:stop],
                    reader.path.name,
                    first.boundary_sites,
                    self.rule,
                    masks,
                    first.channel_shift if warm else None,
                    (work[1][: stop - start], work[2][: stop - start]),
                )
                for token_set, part in RAW_PARTS.items():
                    parts[part].add_block(block, token_set)
                del block
                if seen < self.warm_tokens:
                    self._rebase()
            self.num_shards += 1
            self.bytes_read += reader.path.stat().st_size

    def _add_summary(self, reader: ShardReader) -> None:
        """Merge a summary shard's per-population sums (summary capture) into the analysis."""
        layout = self.layout
        assert layout is not None
        meta = reader.attrs.get("summary") or {}
        rule = (meta.get("massive_threshold"), meta.get("massive_ratio"))
        if rule != (self.rule.threshold, self.rule.ratio):
            raise ShardError(
                f"{reader.path}: summarised with the massive-activation rule {rule}; this "
                f"analysis uses ({self.rule.threshold}, {self.rule.ratio})"
            )
        special = frozenset(int(i) for i in meta.get("special_ids", ()))
        if not self.special_ids and not self.num_shards:
            self.special_ids = special  # its content population defines this analysis'
        elif special != self.special_ids:
            raise ShardError(
                f"{reader.path}: its content population leaves out special ids "
                f"{sorted(special)[:8]}..., this analysis {sorted(self.special_ids)[:8]}...; "
                "analyze with --model of the served model"
            )
        # The summary always has the embedding site (and boundary 0); drop them without one.
        first = 0 if layout.has_embedding else 1
        data = reader.summary()
        # Since schema 3 a summary holds disjoint `content` and `rest` parts, as here.
        stored = {"content": "content", "rest": "rest", "last": "last"}
        for name, part in (stored if "rest" in data else SUMMARY_PARTS).items():
            if part not in self.parts:
                self.parts[part] = self._new_stats()
            stats = self.parts[part]
            stats.merge(_summary_stats(data[name], stats, first))
        self.num_shards += 1
        self.bytes_read += reader.path.stat().st_size

    def _rebase(self) -> None:
        # Early on, move the moments' shift to the running mean (content tokens, else the
        # rest), so the float64 deviation sums stay well conditioned whatever the first block
        # held.
        source = self.parts["content"]
        if not source.count:
            source = self.parts["rest"]
        shift = source.channel_mean.astype(np.float32).astype(np.float64)
        for stats in self.parts.values():
            stats.rebase(shift)

    def _read_block(
        self,
        reader: ShardReader,
        start: int,
        stop: int,
        tokens: np.ndarray,
        buffer: np.ndarray | None = None,
    ) -> np.ndarray:
        """Site vectors of tokens [start, stop) as [T, S, H] in the compute dtype (written
        into the leading rows of `buffer` when given)."""
        layout = self.layout
        assert layout is not None
        shape = (stop - start, len(layout.labels), self.hidden_size)
        x = np.empty(shape, self.compute_dtype) if buffer is None else buffer[: stop - start]
        base = 0
        if layout.has_embedding and self.embed is not None:
            x[:, 0] = self.embed(tokens)
            base = 1
        stride = len(layout.sites)
        for k, site in enumerate(layout.sites):
            # ShardReader reads whole layers; a token range keeps memory bounded on long shards.
            ds = reader._file["layer_outputs"][site]  # noqa: SLF001
            dtype = ds.attrs.get("dtype", "float32")
            dtype = dtype.decode() if isinstance(dtype, bytes) else str(dtype)
            raw = self._buffer("stored", (ds.shape[0], stop - start, ds.shape[2]), ds.dtype)
            ds.read_direct(raw, np.s_[:, start:stop, :])
            decode_into(raw.transpose(1, 0, 2), dtype, x[:, base + k :: stride])
        return x

    def merge(self, other: AnalysisAccumulator) -> None:
        """Fold another accumulator (built from other shards of the same layout) into this one."""
        if other.layout is None:
            return
        if self.layout is None:
            self.layout, self.hidden_size = other.layout, other.hidden_size
            self._init_parts()
        if not self.attrs:
            self.attrs = dict(other.attrs)
        if other.layout != self.layout or other.hidden_size != self.hidden_size:
            raise ValueError("cannot merge analyses of different layers, sites or hidden sizes")
        for name, stats in other.parts.items():
            if name in self.parts:
                self.parts[name].merge(stats)
            else:
                self.parts[name] = copy.deepcopy(stats)
        self._merged = None
        self.channels.merge(other.channels)
        self.num_shards += other.num_shards
        self.bytes_read += other.bytes_read

    def add_shards(self, paths: Iterable[str | Path]) -> None:
        for path in paths:
            self.add_shard(path)


def _merged(a: ResidualStats, b: ResidualStats | None) -> ResidualStats:
    """a + b as a new accumulator (a copy of a when b is empty or None)."""
    out = copy.deepcopy(a)
    if b is not None and b.count:
        out.merge(b)
    return out


def _summary_stats(sums: dict[str, np.ndarray], like: ResidualStats, first: int) -> ResidualStats:
    """A ResidualStats holding one summary population's sums (sites from `first` on).

    The `last` population is one token, stored as its vector `x`. What a summary cannot
    carry stays empty: the positions and token ids of each channel's max |x| and of massive
    activations, and the largest massive events."""
    out = ResidualStats(like.num_sites, like.hidden_size, like.boundary_sites, like.rule)
    count = int(sums["count"])
    out.cos_sum = sums["cos_sum"][first:, first:].astype(np.float64)
    out.cos_sq_sum = sums["cos_sq_sum"][first:, first:].astype(np.float64)
    out.angle_sum = sums["angle_sum"][first:, first:].astype(np.float64)
    out.update_ratio_sum = sums["update_ratio_sum"][first:].astype(np.float64)
    for name in ("norm_sum", "norm_sq_sum", "kurtosis_sum", "hoyer_sum"):
        setattr(out, name, sums[name][first:].astype(np.float64))
    out.massive_tokens = sums["massive_tokens"][first:].astype(np.int64)
    out.count = count
    if "x" in sums:  # one token
        x = sums["x"][first:].astype(np.float64)
        mag = np.abs(x)
        out.absmax = mag if count else np.zeros_like(mag)
        flags = formulas.massive_flags(mag, like.rule.threshold, like.rule.ratio)
        out.massive_count = flags.astype(np.int64) if count else np.zeros(mag.shape, np.int64)
        mean, m2 = x, np.zeros_like(x)
    else:
        out.absmax = sums["absmax"][first:].astype(np.float64)
        out.massive_count = sums["massive_count"][first:].astype(np.int64)
        mean = sums["channel_mean"][first:].astype(np.float64)
        m2 = sums["channel_m2"][first:].astype(np.float64)
    if count:
        out.set_moments(mean, m2)
    return out


def layout_of(reader: ShardReader, has_embedding: bool) -> SiteLayout:
    """The site layout of a shard (plus the rebuilt embedding site when `has_embedding`)."""
    return SiteLayout(
        layers=tuple(int(x) for x in reader.layers),
        sites=tuple(reader.sites),
        has_embedding=has_embedding,
    )


def shard_attrs(reader: ShardReader) -> dict:
    """A shard's attributes that describe the run (not the one file)."""
    return {k: v for k, v in reader.attrs.items() if k not in ("created",)}


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
