"""Summary capture: the layer analysis accumulated on the device, per request, in torch alone.

Why on the device: the analyzer (`actclient analyze`) needs only sums over tokens of per-token
quantities, and full capture of Qwen3-32B costs 1.25 MiB per token. Here every kept token of a
`summary: true` request adds, on the device and right after the forward that computed it:
its site Gram (embedding + both sites of every layer, S = 1 + 2L sites) as cosines and their
squares, the angle between every pair of layer boundaries (B = L + 1), the relative update
|x_b - x_a| / |x_a| of every site pair, norms and squared norms, excess kurtosis and Hoyer
sparsity across channels, per-channel sums and squares, per-channel max |x| and massive
activation counts (Sun et al.: |x| > threshold and > ratio x the token's median |x|). A
shard then holds O(S^2 + S*H) numbers per request instead of O(T*S*H).

The per-token formulas are those of `client/actclient/analysis/formulas.py`, written in torch
(the Gram and what derives from it in float64, so angles stay accurate near cos = 1
without the analyzer's exact recomputation; the per-channel work in float32; every sum in
float64); `tests/test_summary.py` checks them against the analyzer's
own on the same vectors, including massive channels and near-identical sites.

Populations, as the analyzer reports them: `all` kept tokens, `content` (not position 0 and
not a special token id), and `last` (the request's last kept position). The device sums two
disjoint parts, `content` and `rest` (each token added once); `all` is their sum. The end of a
request is known only after async scheduling may have forwarded one token past it, so each
slot keeps its two newest kept tokens' site vectors in a ring (index = kept-order parity) and
adds a token to its sums only when a newer one evicts it (its quantities computed then); at
the end the ring's valid entries are added and the newest is the `last` population. Token
blocks are bounded (`block_tokens`).

Where it runs: after the forward, in the connector's `wait_for_save` (eager, never inside a
CUDA graph), only on steps that schedule a summary request and only on the rows that need
work. The connector picks a request's rows with the same function that picks a raw capture's
(its positions this step, in its KV slots), so a summary always describes the rows a raw
capture of the same request would hold. The model's forward records just the embedding and
the token ids (two graph-safe copies); a step with no summary request does no summary work
at all, as in stock vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# Position modes of the per-slot keep rule (spec.positions).
MODE_CODES = {"all": 0, "prompt": 1, "generated": 2, "last": 3, "every": 4}
# Massive-activation rule (Sun et al. 2024), the analyzer's defaults.
MASSIVE_THRESHOLD = 100.0
MASSIVE_RATIO = 1000.0
_COUNT_MARGIN = 1e-4  # relative margin of the massive rule's counting shortcut
# Disjoint populations summed on the device (each token adds to one): `content` tokens and
# the `rest` (position 0, special tokens); `all` is their sum, `last` comes from the ring.
SUMMED = ("content", "rest")
PAIR_SUMS = ("cos_sum", "cos_sq_sum", "ratio_sum")
SITE_SUMS = ("norm_sum", "norm_sq_sum", "kurtosis_sum", "hoyer_sum")


def num_sites(num_layers: int) -> int:
    return 1 + 2 * num_layers


def boundary_sites(num_layers: int) -> list[int]:
    """Site index of the residual entering layer b: the embedding, then each post_mlp."""
    return [0] + [2 + 2 * layer for layer in range(num_layers)]


def token_quantities(x: torch.Tensor, boundary: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token quantities of site vectors x [T, S, H], the analyzer's formulas: the Gram
    and everything derived from it in float64, the per-channel work in x's dtype (float32
    on the device), per-token results as float64.

    cos [T,S,S] (normalised by the Gram's own diagonal; a zero vector has cosine 0), angle
    [T,B,B] upper triangle, 2*atan2(sqrt(1-c), sqrt(1+c)); ratio [T,S,S] = |x_b - x_a| /
    |x_a|; sq, norms, kurtosis (m4/m2^2 - 3 across channels, 0 where m2 = 0), hoyer
    ((sqrt(H) - |x|_1/|x|_2) / (sqrt(H) - 1)); mag = |x|; flags = massive activations.
    """
    hidden = x.shape[2]
    x64 = x.double()  # the Gram in float64: angles near cos = 1 stay accurate
    gram = torch.matmul(x64, x64.transpose(1, 2))
    sq = torch.diagonal(gram, dim1=1, dim2=2).clone()
    norms = sq.sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = (gram / safe[:, :, None] / safe[:, None, :]).clamp_(-1.0, 1.0)
    cb = cos[:, boundary][:, :, boundary]
    angle = 2.0 * torch.atan2((1.0 - cb).clamp(min=0.0).sqrt(), (1.0 + cb).sqrt())
    angle = torch.triu(angle, diagonal=1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * gram).clamp_(min=0.0)
    ratio = d2.sqrt() / safe[:, :, None]
    # Sums of squares as squared norms: a reduction, no [T, S, H] product written first.
    centred = x - x.mean(2, keepdim=True)
    m2 = torch.linalg.vector_norm(centred, dim=2).square_() / hidden
    c2 = centred.mul_(centred)  # in place: the centred values are not needed again
    m4 = torch.linalg.vector_norm(c2, dim=2).square_() / hidden
    safe_m2 = torch.where(m2 > 0, m2, torch.ones_like(m2))
    kurtosis = torch.where(m2 > 0, m4 / (safe_m2 * safe_m2) - 3.0, torch.zeros_like(m2)).double()
    mag = x.abs()
    root_h = math.sqrt(hidden)
    # |x|_1 summed in x's dtype (a float64 accumulation is 9x slower on the CPU; 576 to 5120
    # positive terms lose about 1e-7 relative), the ratio in float64.
    l1_ratio = torch.where(norms > 0, mag.sum(2).double() / safe, torch.full_like(norms, root_h))
    hoyer = (root_h - l1_ratio) / max(root_h - 1.0, 1e-12)
    peak = mag.amax(2)
    bound = _massive_bounds(mag, peak)  # above the threshold and ratio x the median
    flag_rows = peak > bound  # the (token, site) rows with any massive activation
    flags = torch.zeros_like(mag, dtype=torch.bool)  # a few rows at most: compared only there
    at = torch.nonzero(flag_rows, as_tuple=True)
    if at[0].numel():
        flags[at] = mag[at] > bound[at][:, None]
    return {
        "cos": cos, "angle": angle, "ratio": ratio, "sq": sq, "norms": norms,
        "kurtosis": kurtosis, "hoyer": hoyer, "x": x, "x64": x64, "mag": mag, "flags": flags,
        "flag_rows": flag_rows,
    }  # fmt: skip


def _median(mag: torch.Tensor) -> torch.Tensor:
    """numpy's median along the last axis (the mean of the two middle values if even)."""
    hidden = mag.shape[-1]
    upper = torch.kthvalue(mag, hidden // 2 + 1, dim=-1).values
    if hidden % 2:
        return upper
    return 0.5 * (torch.kthvalue(mag, hidden // 2, dim=-1).values + upper)


def _massive_bounds(mag: torch.Tensor, peak: torch.Tensor | None = None) -> torch.Tensor:
    """Per (token, site), a bound with `mag > bound` exactly the massive activations of Sun
    et al.'s rule, |x| > max(threshold, ratio x median |x|) (the median as numpy's).

    Only rows whose max |x| exceeds the threshold can flag anything, and most of those are
    decided without a median by counting: a candidate e is flagged iff the
    median is below e / ratio, and the median is below a cut c when more than half the row
    (k + 1 values, k = H // 2) is below c, and at least c when fewer than k values are. So
    when k + 1 values lie below the smallest candidate / ratio, every candidate is flagged;
    when fewer than k lie below the largest / ratio, none is (a relative margin covers
    float rounding). Only the remaining rows (about 1 in H for a single candidate) take the
    exact median. `peak`: mag's max over channels, when the caller has it."""
    peak = mag.amax(2) if peak is None else peak
    bound = torch.full_like(peak, MASSIVE_THRESHOLD)
    cand = torch.nonzero(peak > MASSIVE_THRESHOLD, as_tuple=True)
    if cand[0].numel() == 0:
        return bound
    # Only the candidate rows are counted, and the usual verdict (nothing flagged: the row's
    # own max as its bound) first; the rest are then checked for "every candidate flagged".
    k = mag.shape[2] // 2
    rows, top = mag[cand], peak[cand]
    none = (rows < (top / MASSIVE_RATIO * (1 + _COUNT_MARGIN))[:, None]).sum(1) < k
    bound[cand] = torch.where(none, top, MASSIVE_THRESHOLD)
    open_ = torch.nonzero(~none).flatten()
    if open_.numel() == 0:
        return bound
    rows, top = rows[open_], top[open_]
    least = torch.where(rows > MASSIVE_THRESHOLD, rows, top[:, None]).amin(1)
    every = (rows < (least / MASSIVE_RATIO * (1 - _COUNT_MARGIN))[:, None]).sum(1) > k
    exact = open_[~every]  # among the candidates: neither verdict, so the exact median
    if exact.numel():
        at = (cand[0][exact], cand[1][exact])
        bound[at] = torch.clamp(MASSIVE_RATIO * _median(mag[at]), min=MASSIVE_THRESHOLD)
    return bound


@dataclass
class PopulationSums:
    """Sums over tokens of one population, per slot (slot `slots` is the trash)."""

    count: torch.Tensor  # [P] int64
    pairs: dict[str, torch.Tensor]  # cos_sum, cos_sq_sum, ratio_sum: [P, S, S] float64
    angle_sum: torch.Tensor  # [P, B, B] float64
    sites: dict[str, torch.Tensor]  # norm_sum ... hoyer_sum: [P, S] float64
    x_sum: torch.Tensor  # [P, S, H] float64
    x_sq_sum: torch.Tensor  # [P, S, H] float64
    absmax: torch.Tensor  # [P, S, H] float32
    massive_count: torch.Tensor  # [P, S, H] int32
    massive_tokens: torch.Tensor  # [P, S] int64

    @classmethod
    def zeros(cls, slots: int, s: int, b: int, h: int, device) -> PopulationSums:  # noqa: ANN001
        def z(*shape, dtype=torch.float64):
            return torch.zeros(slots, *shape, dtype=dtype, device=device)

        return cls(
            count=z(dtype=torch.long),
            pairs={name: z(s, s) for name in PAIR_SUMS},
            angle_sum=z(b, b),
            sites={name: z(s) for name in SITE_SUMS},
            x_sum=z(s, h),
            x_sq_sum=z(s, h),
            absmax=z(s, h, dtype=torch.float32),
            massive_count=z(s, h, dtype=torch.int32),
            massive_tokens=z(s, dtype=torch.long),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [
            self.count, *self.pairs.values(), self.angle_sum, *self.sites.values(), self.x_sum,
            self.x_sq_sum, self.absmax, self.massive_count, self.massive_tokens,
        ]  # fmt: skip

    def add(self, owner: torch.Tensor, q: dict[str, torch.Tensor]) -> None:
        """Add token quantities `q` (with `cos_sq` and `x_sq`, see `with_squares`) into the
        slots `owner` [T] (the trash slot for others) with `index_add_`; the massive flags, a
        few per row, are added where they are instead of as a dense [T, S, H] count."""
        self.count.index_add_(0, owner, torch.ones_like(owner))
        self.pairs["cos_sum"].index_add_(0, owner, q["cos"])
        self.pairs["cos_sq_sum"].index_add_(0, owner, q["cos_sq"])
        self.pairs["ratio_sum"].index_add_(0, owner, q["ratio"])
        self.angle_sum.index_add_(0, owner, q["angle"])
        self.sites["norm_sum"].index_add_(0, owner, q["norms"])
        self.sites["norm_sq_sum"].index_add_(0, owner, q["sq"])
        self.sites["kurtosis_sum"].index_add_(0, owner, q["kurtosis"])
        self.sites["hoyer_sum"].index_add_(0, owner, q["hoyer"])
        self.x_sum.index_add_(0, owner, q["x64"])
        self.x_sq_sum.index_add_(0, owner, q["x_sq"])
        self.absmax.index_reduce_(0, owner, q["mag"].float(), "amax")
        t, s = torch.nonzero(q["flag_rows"], as_tuple=True)  # the flagged rows, then channels
        if t.numel():
            row, h = torch.nonzero(q["flags"][t, s], as_tuple=True)
            ones = torch.ones_like(row, dtype=self.massive_count.dtype)
            self.massive_count.index_put_((owner[t[row]], s[row], h), ones, accumulate=True)
        self.massive_tokens.index_add_(0, owner, q["flag_rows"].long())

    def add_partials(self, slots: torch.Tensor, part: dict[str, torch.Tensor]) -> None:
        """Add per-slot partial sums (`partials`) into distinct `slots` [k]: gathers and
        scatters of whole slot rows, no atomics (the fast path on a GPU)."""
        self.count[slots] += part["count"]
        self.pairs["cos_sum"][slots] += part["cos"]
        self.pairs["cos_sq_sum"][slots] += part["cos_sq"]
        self.pairs["ratio_sum"][slots] += part["ratio"]
        self.angle_sum[slots] += part["angle"]
        self.sites["norm_sum"][slots] += part["norms"]
        self.sites["norm_sq_sum"][slots] += part["sq"]
        self.sites["kurtosis_sum"][slots] += part["kurtosis"]
        self.sites["hoyer_sum"][slots] += part["hoyer"]
        self.x_sum[slots] += part["x"]
        self.x_sq_sum[slots] += part["x_sq"]
        self.absmax[slots] = torch.maximum(self.absmax[slots], part["mag"])
        self.massive_count[slots] += part["flags"]
        self.massive_tokens[slots] += part["flag_tokens"]

    def zero_slot(self, slot: int) -> None:
        for t in self.tensors():
            t[slot].zero_()


def partials(q: dict[str, torch.Tensor], segments: list[tuple[int, int]]) -> dict:
    """Per-segment sums of token quantities `q` (rows [start, stop) per segment), in the
    accumulators' dtypes: one row per segment. A one-token segment is its own row."""
    if len(segments) == len(q["x"]):  # one token per segment: the rows are the partials
        x, cos, flags = q["x64"], q["cos"], q["flags"]
        return {
            "count": torch.ones(len(segments), dtype=torch.long, device=x.device),
            "cos": cos, "cos_sq": cos.square(), "ratio": q["ratio"], "angle": q["angle"],
            "norms": q["norms"], "sq": q["sq"], "kurtosis": q["kurtosis"], "hoyer": q["hoyer"],
            "x": x, "x_sq": x.square(), "mag": q["mag"].float(),
            "flags": flags.int(), "flag_tokens": q["flag_rows"].long(),
        }  # fmt: skip
    rows = []
    for start, stop in segments:
        r = slice(start, stop)
        x = q["x"][r]
        rows.append({
            "count": torch.tensor(stop - start, device=x.device),
            "cos": q["cos"][r].sum(0), "cos_sq": q["cos"][r].square().sum(0),
            "ratio": q["ratio"][r].sum(0), "angle": q["angle"][r].sum(0),
            "norms": q["norms"][r].sum(0), "sq": q["sq"][r].sum(0),
            "kurtosis": q["kurtosis"][r].sum(0), "hoyer": q["hoyer"][r].sum(0),
            "x": x.sum(0, dtype=torch.float64), "x_sq": x.square().sum(0, dtype=torch.float64),
            "mag": q["mag"][r].amax(0).float(), "flags": q["flags"][r].sum(0, dtype=torch.int32),
            "flag_tokens": q["flag_rows"][r].sum(0),
        })  # fmt: skip
    return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def with_squares(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`q` with what `PopulationSums.add` sums besides it (computed once for both
    populations): squared cosines and squared channel values (a product: faster than
    `square` on the CPU)."""
    return {**q, "cos_sq": q["cos"] * q["cos"], "x_sq": q["x64"] * q["x64"]}


def _segments_path(device: torch.device) -> bool:
    """On a GPU a slot's rows are summed first (`partials`): `index_add_` there is one
    atomic add per row and element, and a prefill's rows all go to one slot. On the CPU
    `index_add_` adds row by row in place, the cheapest way."""
    return device.type == "cuda"


@dataclass
class SummaryState:
    """Device state of summary capture for `slots` requests (+ the trash slot).

    Per slot: the keep rule (mode, prompt length, K), the sums of `all` and `content`, and a
    ring of its two newest kept tokens (valid, position, content flag and the token's site
    vectors in the model's dtype; its quantities are computed once, when it joins the sums or
    is read out). `special` marks special token ids; `embedding` and `tokens` are filled by the
    model (layer 0's input, the forward's token ids) while `active` (set by the connector
    before each forward: a summary request is scheduled) and `bound` (the KV cache exists).
    """

    slots: int
    num_layers: int
    hidden: int
    block_tokens: int
    sums: dict[str, PopulationSums]
    ring_x: torch.Tensor
    ring_valid: torch.Tensor
    ring_position: torch.Tensor
    ring_content: torch.Tensor
    mode: torch.Tensor
    num_prompt: torch.Tensor
    every: torch.Tensor
    special: torch.Tensor
    embedding: torch.Tensor
    tokens: torch.Tensor
    boundary: torch.Tensor
    bound: bool = False
    active: bool = False
    special_ids: list[int] = field(default_factory=list)

    @classmethod
    def allocate(
        cls, slots: int, num_layers: int, hidden: int, rows: int, dtype: torch.dtype,
        vocab_size: int, special_ids: list[int], device=None, block_bytes: int | None = None,
    ) -> SummaryState:  # fmt: skip
        s, b = num_sites(num_layers), num_layers + 1
        on_cuda = torch.device(device or torch.get_default_device()).type == "cuda"
        if block_bytes is None:  # larger blocks on a GPU: fewer, bigger kernels per step
            block_bytes = (1 << 30) if on_cuda else (256 << 20)
        per_token = s * hidden * 8 * 6 + s * s * 8 * 8  # x, |x|, sort, temporaries
        block_tokens = max(1, block_bytes // per_token)
        if not on_cuda:  # each float64 [T, S, H] under glibc's 32 MiB mmap threshold (cli.py)
            block_tokens = max(1, min(block_tokens, (24 << 20) // (s * hidden * 8)))
        trash = slots + 1
        special = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = [i for i in special_ids if 0 <= i < vocab_size]
        if ids:
            special[torch.as_tensor(ids, device=special.device)] = True

        return cls(
            slots=slots,
            num_layers=num_layers,
            hidden=hidden,
            block_tokens=block_tokens,
            sums={p: PopulationSums.zeros(trash, s, b, hidden, special.device) for p in SUMMED},
            ring_x=torch.zeros(trash * 2, s, hidden, dtype=dtype, device=special.device),
            ring_valid=torch.zeros(trash * 2, dtype=torch.bool, device=special.device),
            ring_position=torch.full((trash * 2,), -1, dtype=torch.long, device=special.device),
            ring_content=torch.zeros(trash * 2, dtype=torch.bool, device=special.device),
            mode=torch.zeros(trash, dtype=torch.long, device=special.device),
            num_prompt=torch.zeros(trash, dtype=torch.long, device=special.device),
            every=torch.ones(trash, dtype=torch.long, device=special.device),
            special=special,
            embedding=torch.zeros(rows, hidden, dtype=dtype, device=special.device),
            tokens=torch.zeros(rows, dtype=torch.long, device=special.device),
            boundary=torch.as_tensor(boundary_sites(num_layers), device=special.device),
            special_ids=sorted(ids),
        )

    def nbytes(self) -> int:
        tensors = [t for p in self.sums.values() for t in p.tensors()] + [self.ring_x]
        return sum(t.numel() * t.element_size() for t in tensors)

    def start_slot(self, slot: int, positions: str, every: int, num_prompt: int) -> None:
        """Zero `slot` for a new (or recomputed) request with this keep rule."""
        for sums in self.sums.values():
            sums.zero_slot(slot)
        ring = slice(2 * slot, 2 * slot + 2)
        self.ring_valid[ring] = False
        self.ring_position[ring] = -1
        mode = "every" if every else positions
        self.mode[slot] = MODE_CODES[mode]
        self.every[slot] = max(every, 1)
        self.num_prompt[slot] = num_prompt

    def accumulate(
        self, buffer: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, owner: torch.Tensor
    ) -> None:
        """After a forward: add buffer rows `rows` [k] (capture buffer [*, 2L, H] + the
        embedding), at positions `pos` [k], to their slots `owner` [k]. The connector picks
        them as it picks the rows the raw copy-out keeps (each request's positions this step,
        in its KV slots), so a summary sees exactly a raw capture's rows. The keep rule of
        each slot applies here; only the rows that join the sums are read."""
        trash = self.slots
        mode = self.mode[owner]
        prompt = self.num_prompt[owner]
        every = self.every[owner]
        keep = (owner != trash) & (pos >= 0)
        keep &= (mode != MODE_CODES["prompt"]) | (pos < prompt)
        keep &= (mode != MODE_CODES["generated"]) | (pos >= prompt)
        keep &= (mode != MODE_CODES["every"]) | (pos % every == 0)
        base = torch.where(mode == MODE_CODES["generated"], prompt, torch.zeros_like(prompt))
        parity = torch.div(pos - base, every, rounding_mode="floor") % 2
        key = torch.where(keep, 2 * owner + parity, 2 * trash + parity)
        newest = torch.full_like(self.ring_position, -1)
        newest.index_reduce_(0, key, torch.where(keep, pos, torch.full_like(pos, -1)), "amax")
        winner = keep & (pos == newest[key])
        content = (pos != 0) & ~self.special[self.tokens[rows].clamp(0, len(self.special) - 1)]
        # Ring entries a newer token replaces join the sums now (never for `last` slots,
        # whose only token is the final one).
        slot_ids = torch.arange(trash + 1, device=pos.device).repeat_interleave(2)
        evict = (newest >= 0) & self.ring_valid & (self.mode[slot_ids] != MODE_CODES["last"])
        evict[2 * trash :] = False
        entries = torch.nonzero(evict).flatten()
        for start in range(0, len(entries), self.block_tokens):
            chunk = entries[start : start + self.block_tokens]
            q = token_quantities(self.ring_x[chunk].float(), self.boundary)
            self._add(slot_ids[chunk], self.ring_content[chunk], q)
        # This step's kept tokens: the newest of each slot's parity goes into the ring, the
        # others join the sums now (never for `last` slots, whose only token is the final one).
        done = torch.nonzero(keep & ~winner & (mode != MODE_CODES["last"])).flatten()
        for start in range(0, len(done), self.block_tokens):
            picked = done[start : start + self.block_tokens]
            q = token_quantities(self._sites(buffer, rows[picked]).float(), self.boundary)
            self._add(owner[picked], content[picked], q)
        won = torch.nonzero(winner).flatten()
        target = key[won]
        self.ring_x.index_copy_(0, target, self._sites(buffer, rows[won]).to(self.ring_x.dtype))
        self.ring_position.index_copy_(0, target, pos[won])
        self.ring_content.index_copy_(0, target, content[won])
        self.ring_valid.index_copy_(0, target, torch.ones_like(content[won]))

    def _sites(self, buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Site vectors [len(rows), S, H] of these buffer rows: the embedding, then the layers."""
        return torch.cat([self.embedding[rows, None], buffer[rows]], dim=1)

    def _add(self, owner: torch.Tensor, content: torch.Tensor, q: dict) -> None:
        """Add tokens' quantities into their slots (`owner`): content tokens into `content`,
        the others into `rest`."""
        trash = self.slots
        if _segments_path(owner.device):
            for population, mask in (("content", content), ("rest", ~content)):
                self._add_segments(self.sums[population], torch.where(mask, owner, trash), q)
            return
        q = with_squares(q)
        for population, mask in (("content", content), ("rest", ~content)):
            picked = torch.nonzero(mask).flatten()
            if picked.numel() == 0:
                continue
            if picked.numel() == len(mask):
                self.sums[population].add(owner, q)
            elif 2 * picked.numel() > len(mask):  # most rows: the others into the trash slot
                self.sums[population].add(torch.where(mask, owner, trash), q)
            else:  # a few rows (usually `rest`): just those
                rows = {name: value[picked] for name, value in q.items()}
                self.sums[population].add(owner[picked], rows)

    def _add_segments(self, sums: PopulationSums, owner: torch.Tensor, q: dict) -> None:
        """On a GPU: the rows of each slot summed first (vLLM keeps a request's tokens
        together in the batch), then one gather-add-scatter per accumulator."""
        keep = torch.nonzero(owner != self.slots).flatten()
        if keep.numel() == 0:
            return
        if keep.numel() != owner.numel():
            owner, q = owner[keep], {name: value[keep] for name, value in q.items()}
        slots, counts = torch.unique_consecutive(owner, return_counts=True)
        bounds = [0, *torch.cumsum(counts, 0).tolist()]
        part = partials(q, list(zip(bounds[:-1], bounds[1:], strict=True)))
        if len(set(slots.tolist())) != len(slots):  # a slot's rows in two runs: merge them
            slots, inverse = torch.unique(slots, return_inverse=True)
            merged = {}
            for name, value in part.items():
                out = torch.zeros((len(slots), *value.shape[1:]), dtype=value.dtype,
                                  device=value.device)  # fmt: skip
                if name == "mag":
                    merged[name] = out.index_reduce_(0, inverse, value, "amax")
                else:
                    merged[name] = out.index_add_(0, inverse, value)
            part = merged
        sums.add_partials(slots, part)


# ------------------------------------------------------------------ host side

_NAMES = ("count", *PAIR_SUMS, "angle_sum", *SITE_SUMS, "x_sum", "x_sq_sum", "absmax",
          "massive_count", "massive_tokens")  # fmt: skip


def _population_host(sums: PopulationSums, slot: int) -> dict[str, np.ndarray]:
    values = [t[slot].cpu().numpy() for t in sums.tensors()]
    return dict(zip(_NAMES, values, strict=True))


def _entry_host(state: SummaryState, index: int) -> dict[str, np.ndarray]:
    """One ring entry (one token) as population sums of count 1."""
    q = token_quantities(state.ring_x[index : index + 1].float(), state.boundary)
    q = {name: value[0].cpu().numpy() for name, value in q.items()}
    x = q["x64"]
    return {
        "count": np.int64(1), "cos_sum": q["cos"], "cos_sq_sum": q["cos"] * q["cos"],
        "ratio_sum": q["ratio"], "angle_sum": q["angle"], "norm_sum": q["norms"],
        "norm_sq_sum": q["sq"], "kurtosis_sum": q["kurtosis"], "hoyer_sum": q["hoyer"],
        "x_sum": x, "x_sq_sum": x * x, "absmax": q["mag"],
        "massive_count": q["flags"].astype(np.int32),
        "massive_tokens": q["flag_rows"].astype(np.int64),
    }  # fmt: skip


def _plus(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.maximum(a[k], b[k]) if k == "absmax" else a[k] + b[k] for k in a}


def _empty_like(template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v) for k, v in template.items()}


def read_slot(state: SummaryState, slot: int, last_position: int) -> dict[str, dict]:
    """A finished request's sums per population (`content`, `rest`, `last`; `all` is content
    plus rest) over its kept positions up to `last_position` (P+G-2): the device sums plus the
    ring's valid entries (a ring entry past `last_position` is async scheduling's extra
    forward: dropped)."""
    out = {population: _population_host(state.sums[population], slot) for population in SUMMED}
    last_mode = int(state.mode[slot]) == MODE_CODES["last"]
    entries = []
    for index in (2 * slot, 2 * slot + 1):
        position = int(state.ring_position[index])
        valid = bool(state.ring_valid[index]) and 0 <= position <= last_position
        if valid and (not last_mode or position == last_position):
            entries.append((position, index, bool(state.ring_content[index])))
    entries.sort()
    for _, index, content in entries:
        population = "content" if content else "rest"
        out[population] = _plus(out[population], _entry_host(state, index))
    out["last"] = _entry_host(state, entries[-1][1]) if entries else _empty_like(out["content"])
    return out


def select_sites(
    result: dict[str, dict], sites: list[int], boundaries: list[int]
) -> dict[str, dict[str, np.ndarray]]:
    """Restrict sums over all S sites to `sites` (and the boundary angles to `boundaries`,
    indices among all B boundaries); the update ratio becomes that of consecutive kept sites."""
    s = np.asarray(sites, dtype=np.int64)
    b = np.asarray(boundaries, dtype=np.int64)
    out = {}
    for population, sums in result.items():
        picked = {
            "count": np.asarray(sums["count"], dtype=np.int64),
            "cos_sum": sums["cos_sum"][np.ix_(s, s)],
            "cos_sq_sum": sums["cos_sq_sum"][np.ix_(s, s)],
            "angle_sum": sums["angle_sum"][np.ix_(b, b)],
            "update_ratio_sum": sums["ratio_sum"][s[:-1], s[1:]],
        }
        for name in (*SITE_SUMS, "x_sum", "x_sq_sum", "absmax", "massive_count"):
            picked[name] = sums[name][s]
        picked["massive_tokens"] = sums["massive_tokens"][s]
        out[population] = picked
    return out
