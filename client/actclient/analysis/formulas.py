"""Per-token formulas of the analyzer: site vectors in, per-token quantities out.

Every function takes the site vectors of a block of tokens, `x` [T, S, H] (T tokens, S sites,
H channels; float32 by default, float64 for audits), and returns plain arrays; no state, no
population logic, no I/O. `stats` sums their outputs over tokens in float64. They use only
array operations (matmul, reductions along H, elementwise), so the device-side summary capture
can compute the same quantities with the same formulas in torch.

Precision in float32 (the default compute type; inputs are bfloat16 or float32 shards):
- Cosines come from one BLAS Gram per token, normalised by BLAS dot-product norms (a long
  float32 GEMM sum of squares runs ~7e-7 low, which would bias every cosine). A channel whose
  square is at least `DOMINANT_FACTOR` times a site vector's mean square (a massive
  activation) is split off and its products are added in float64, so float32 rounding is
  relative to the rest of the vector. Measured against the float64 analyzer on Qwen3-32B-shape
  shards: mean cosines within 1e-6 absolute (~1e-7 typical), so BI within 1e-6 absolute.
- Angles are derived from the cosines, 2*atan2(sqrt(1 - c), sqrt(1 + c)), except for pairs
  whose 1 - c is within `NEAR_ULPS` rounding units of 0: those (and their cosines) are
  recomputed exactly with `unit_angle` (2*atan2(|u-v|, |u+v|) on float64 unit vectors), which
  keeps full precision near cos = 1 where arccos(cos) loses every digit. Elsewhere the error
  is ~1e-7 / sin(angle) absolute (5e-6 relative at 0.12 rad, 1e-7 typical).
- Norms, update norms and power sums along H are BLAS dot products (~1e-7 relative).
The stored bfloat16 values themselves are only good to 4e-3 relative, so none of this
rounding is visible in a report.
"""

from __future__ import annotations

import numpy as np

DOMINANT_FACTOR = 64.0  # x_h^2 >= 64 |x|^2 / H: the channel is multiplied out in float64
NEAR_ULPS = 1e4  # 1 - cos below this many eps (x's dtype) is recomputed with unit_angle
KURTOSIS_CENTRED = 1e-2  # mean^2 / mean square across channels above which rows are centred
_EXACT_CHUNK = 512  # site pairs per exact-angle batch (bounds its float64 temporaries)


def squared_norms(x: np.ndarray) -> np.ndarray:
    """|x|^2 per token and site: [T, S, H] -> [T, S] float64 (a BLAS dot per row)."""
    return np.vecdot(x, x).astype(np.float64)


def site_gram(
    x: np.ndarray, sq: np.ndarray | None = None, peak: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token Gram of the raw site vectors and the energy share outside dominant channels.

    x [T, S, H] -> (gram [T, S, S] float64, rest [T, S] float64 in [0, 1]). `sq` is
    `squared_norms(x)` and `peak` max |x| over H (both computed when None). gram = x_R x_R^T
    in x's dtype (BLAS) + x_D x_D^T in float64, where D are the channels with x_h^2 >=
    DOMINANT_FACTOR * |x_s|^2 / H at some site of the token (none for Gaussian-like vectors;
    the massive channels of a sink token). The diagonal is replaced by the BLAS dot products
    of `squared_norms`: a long float32 GEMM sum of squares runs ~7e-7 low on average, which
    would bias every cosine by as much; a dot product does not.
    """
    share_min = DOMINANT_FACTOR / x.shape[2]
    gram = np.matmul(x, x.transpose(0, 2, 1)).astype(np.float64)
    rest = np.ones(x.shape[:2])
    if sq is None:
        sq = squared_norms(x)
    if peak is None:
        peak = np.abs(x).max(-1)
    diagonal = np.einsum("tii->ti", gram)  # a writable view
    diagonal[...] = sq
    peak64 = peak.astype(np.float64)
    dominant_tokens = np.nonzero((peak64 * peak64 >= share_min * sq).any(1))[0]
    for t in dominant_tokens:
        xt = x[t]
        energy = xt.astype(np.float64) ** 2
        share = energy >= share_min * energy.sum(1, keepdims=True)
        channels = np.nonzero(share.any(0))[0]
        heavy = xt[:, channels].astype(np.float64)
        light = xt.copy()
        light[:, channels] = 0
        gram[t] = (light @ light.T).astype(np.float64) + heavy @ heavy.T
        light_sq = np.vecdot(light, light).astype(np.float64)
        heavy_sq = (heavy * heavy).sum(1)
        diagonal[t] = light_sq + heavy_sq
        total = light_sq + heavy_sq
        rest[t] = np.where(total > 0, light_sq / np.where(total > 0, total, 1), 1)
    return gram, rest


def gram_cosines(gram: np.ndarray) -> np.ndarray:
    """Cosine matrix [T, S, S] float64 from a Gram, normalised by its diagonal.

    A zero vector has cosine 0 with everything. `exact_near_cosines` then fixes the pairs
    too close to 1 for the float32 Gram (identical vectors come out at exactly 1).
    """
    norms = np.sqrt(np.diagonal(gram, axis1=1, axis2=2))
    safe = np.where(norms > 0, norms, 1.0)
    cos = gram / safe[:, :, None] / safe[:, None, :]
    return np.clip(cos, -1.0, 1.0, out=cos)


def near_pairs(
    cos: np.ndarray, rest: np.ndarray, eps: float, near_ulps: float = NEAR_ULPS
) -> np.ndarray:
    """Pairs i < j [T, S, S] whose 1 - cos is within `near_ulps` rounding units (scaled by
    sqrt(rest_i rest_j), the part the float32 Gram rounded), or that involve a zero vector."""
    r = np.sqrt(rest)
    tol = near_ulps * eps * r[:, :, None] * r[:, None, :]
    zero = np.diagonal(cos, axis1=1, axis2=2) == 0  # gram_cosines: a zero vector has cos 0
    near = (1.0 - cos <= tol) | zero[:, :, None] | zero[:, None, :]
    return near & np.triu(np.ones(cos.shape[1:], dtype=bool), 1)


def _exact_angles(x: np.ndarray, t: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    out = np.empty(len(t))
    for start in range(0, len(t), _EXACT_CHUNK):
        k = slice(start, start + _EXACT_CHUNK)
        out[k] = unit_angle(_unit64(x[t[k], i[k]]), _unit64(x[t[k], j[k]]))
    return out


def exact_near_cosines(
    x: np.ndarray, cos: np.ndarray, rest: np.ndarray, near_ulps: float = NEAR_ULPS
) -> None:
    """Recompute, in place, the cosines of `near_pairs` as cos(unit_angle) in float64."""
    t, i, j = np.nonzero(near_pairs(cos, rest, float(np.finfo(x.dtype).eps), near_ulps))
    if len(t):
        value = np.cos(_exact_angles(x, t, i, j))
        zero = (np.diagonal(cos, axis1=1, axis2=2)[t, i] == 0) | (
            np.diagonal(cos, axis1=1, axis2=2)[t, j] == 0
        )
        value[zero] = 0.0  # keep gram_cosines' convention for zero vectors
        cos[t, i, j] = value
        cos[t, j, i] = value


def cosine_angle(cos: np.ndarray) -> np.ndarray:
    """Angle from a cosine, 2*atan2(sqrt(1 - c), sqrt(1 + c)): the unit-vector formula."""
    return 2.0 * np.arctan2(np.sqrt(np.maximum(1.0 - cos, 0.0)), np.sqrt(1.0 + cos))


def unit_angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle between unit vectors along the last axis: 2*atan2(|u-v|, |u+v|), float64."""
    diff = np.sqrt(np.einsum("...h,...h->...", u - v, u - v))
    total = np.sqrt(np.einsum("...h,...h->...", u + v, u + v))
    return 2.0 * np.arctan2(diff, total)


def _unit64(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    norms = np.sqrt(np.einsum("kh,kh->k", rows, rows))
    return rows / np.where(norms > 0, norms, 1.0)[:, None]


def boundary_angles(
    x: np.ndarray,
    cos: np.ndarray,
    rest: np.ndarray,
    boundary_sites: list[int],
    near_ulps: float = NEAR_ULPS,
) -> np.ndarray:
    """Angles between boundary residuals [T, B, B] float64 (upper triangle, zero elsewhere).

    Derived from `cos` (from `gram_cosines`), except for `near_pairs`, which are recomputed
    exactly with `unit_angle`.
    """
    b = np.asarray(boundary_sites, dtype=np.int64)
    cb = cos[:, b][:, :, b]
    angle = np.triu(cosine_angle(cb), 1)
    if len(b) < 2:
        return angle
    near = near_pairs(cb, rest[:, b], float(np.finfo(x.dtype).eps), near_ulps)
    t, i, j = np.nonzero(near)
    if len(t):
        angle[t, i, j] = _exact_angles(x, t, b[i], b[j])
    return angle


def _scratch(x: np.ndarray, scratch: np.ndarray | None) -> np.ndarray:
    if scratch is None:
        return np.empty_like(x)
    if scratch.shape != x.shape or scratch.dtype != x.dtype:
        raise ValueError(
            f"scratch must be {x.shape} {x.dtype}, got {scratch.shape} {scratch.dtype}"
        )
    return scratch


def channel_sums(x: np.ndarray) -> np.ndarray:
    """sum over H per token and site: [T, S, H] -> [T, S] (a BLAS matrix-vector product)."""
    return (x @ np.ones(x.shape[2], dtype=x.dtype)).astype(np.float64)


def update_norms(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """|x_{s+1} - x_s| between consecutive sites: [T, S, H] -> [T, S-1] float64.

    `scratch`, a buffer like x, is overwritten (saves an allocation per block).
    """
    if x.shape[1] < 2:
        return np.zeros((x.shape[0], 0))
    diff = np.subtract(x[:, 1:], x[:, :-1], out=_scratch(x, scratch)[:, 1:])
    return np.sqrt(np.vecdot(diff, diff).astype(np.float64))


def excess_kurtosis(
    x: np.ndarray, sq: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """Excess kurtosis across channels per token and site: m4 / m2^2 - 3 (0 where m2 = 0).

    From the power sums S1..S4 over H (S4 = x^2 . x^2, S3 = x^2 . x: BLAS dots), with
    m2 = S2/H - mu^2 and m4 = S4/H - 4 mu S3/H + 6 mu^2 S2/H - 3 mu^4. Where the mean across
    channels is not small (mu^2 > KURTOSIS_CENTRED * S2/H) that expansion would cancel, and
    those rows are centred first. `sq` is S2 (`squared_norms`); `scratch`, a buffer like x,
    is overwritten.
    """
    hidden = x.shape[2]
    s1 = channel_sums(x)
    s2 = squared_norms(x) if sq is None else sq
    x2 = np.multiply(x, x, out=_scratch(x, scratch))
    s3 = np.vecdot(x2, x).astype(np.float64)
    s4 = np.vecdot(x2, x2).astype(np.float64)
    mu = s1 / hidden
    mu2 = mu * mu
    m2 = s2 / hidden - mu2
    m4 = s4 / hidden - 4.0 * mu * s3 / hidden + 6.0 * mu2 * s2 / hidden - 3.0 * mu2 * mu2
    t_idx, s_idx = np.nonzero(mu2 > KURTOSIS_CENTRED * s2 / hidden)
    if len(t_idx):
        rows = x[t_idx, s_idx].astype(np.float64)
        centred = rows - rows.mean(1, keepdims=True)
        centred *= centred
        m2[t_idx, s_idx] = centred.mean(1)
        m4[t_idx, s_idx] = (centred * centred).mean(1)
    return np.where(m2 > 0, m4 / np.where(m2 > 0, m2, 1.0) ** 2 - 3.0, 0.0)


def hoyer_sparsity(abs_sum: np.ndarray, norms: np.ndarray, hidden: int) -> np.ndarray:
    """Hoyer sparsity (sqrt(H) - |x|_1/|x|_2) / (sqrt(H) - 1); 0 for a zero vector."""
    root_h = np.sqrt(hidden)
    ratio = np.where(norms > 0, abs_sum / np.where(norms > 0, norms, 1.0), root_h)
    return (root_h - ratio) / max(root_h - 1.0, 1e-12)


def massive_flags(mag: np.ndarray, threshold: float, ratio: float) -> np.ndarray:
    """Sun et al. (2024) rule on rows of |x| [K, H]: above `threshold` and `ratio` x median."""
    mag = mag.astype(np.float64)
    median = np.median(mag, axis=-1, keepdims=True)
    return (mag > threshold) & (mag > ratio * median)
