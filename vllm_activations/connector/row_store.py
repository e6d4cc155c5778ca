"""Worker side, host memory: one request's captured rows, already in shard layout."""

from __future__ import annotations

import numpy as np
import torch

from vllm_activations.contract.spec import SITES, CaptureSpec

TORCH_STORAGE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NUMPY_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
# Generated columns a row store starts with when the request gives no max_tokens / at most.
_INITIAL_GENERATED = 256
_MAX_INITIAL_GENERATED = 1024


class RowStore:
    """One request's captured rows, already in shard layout: per site an [L, columns, H] array
    in the storage representation, column = (position - base) // step (base = the prompt
    length for `generated`, step = K for `every:K`). Rows land in place each step, so
    finishing a request needs no concatenation or transpose; capacity doubles when a
    generation outgrows it. A recomputed position (preemption) overwrites its column.
    `last` keeps the two most recent positions (column = position % 2): the request's end is
    known only after async scheduling may have forwarded one token past it.
    """

    def __init__(
        self, spec: CaptureSpec, layers: list[int], num_layers: int, hidden: int,
        num_prompt: int, max_tokens: int | None,
    ) -> None:  # fmt: skip
        self.last = spec.positions == "last"
        self.base = num_prompt if spec.positions == "generated" else 0
        self.step = spec.every or 1
        self.last_positions = np.full(2, -1, dtype=np.int64)
        self.layers = np.asarray(layers, dtype=np.int64)
        self.all_layers = layers == list(range(num_layers))
        planned = min(max_tokens or _INITIAL_GENERATED, _MAX_INITIAL_GENERATED)
        cap = 2 if self.last else max(1, len(spec.expected_positions(num_prompt, planned)))
        dtype = NUMPY_STORAGE[spec.dtype]
        self.sites = {site: np.empty((len(layers), cap, hidden), dtype) for site in spec.sites}
        self.filled = np.zeros(cap, dtype=bool)

    def columns(self) -> np.ndarray:
        """The capture-buffer columns (2 * layer + site) this request keeps."""
        offsets = [SITES.index(site) for site in self.sites]
        return np.sort((2 * self.layers[:, None] + np.asarray(offsets)[None, :]).ravel())

    def add(self, positions: np.ndarray, rows: np.ndarray, column_of: np.ndarray) -> None:
        """rows: [k, C, H] gathered rows (storage dtype) of `positions`; column_of maps a
        capture-buffer column (2 * layer + site) to its index among the C gathered ones."""
        if self.last:
            positions, rows = positions[-2:], rows[-2:]
            cols = positions % 2
            self.last_positions[cols] = positions
        else:
            cols = (positions - self.base) // self.step
        if cols.max() >= len(self.filled):
            self._grow(int(cols.max()) + 1)
        contiguous = cols[-1] - cols[0] == len(cols) - 1 and bool((np.diff(cols) == 1).all())
        target = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
        full = rows.shape[1] == len(column_of)
        for site, store in self.sites.items():
            offset = SITES.index(site)
            if self.all_layers and full:
                src = rows[:, offset::2, :]
            else:
                src = rows[:, column_of[2 * self.layers + offset], :]
            store[:, target, :] = src.transpose(1, 0, 2)
        self.filled[target] = True

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * len(self.filled))
        for site, old in self.sites.items():
            new = np.empty((old.shape[0], cap, old.shape[2]), old.dtype)
            new[:, : old.shape[1]] = old
            self.sites[site] = new
        filled = np.zeros(cap, dtype=bool)
        filled[: len(self.filled)] = self.filled
        self.filled = filled

    def missing(self, expected: list[int]) -> list[int]:
        """The expected positions that have no row."""
        if self.last:
            return [] if self.last_positions[expected[0] % 2] == expected[0] else expected
        cols = (np.asarray(expected, dtype=np.int64) - self.base) // self.step
        have = np.zeros(len(cols), dtype=bool)
        inside = cols < len(self.filled)
        have[inside] = self.filled[cols[inside]]
        return [p for p, ok in zip(expected, have, strict=True) if not ok]

    def layer_outputs(self, expected: list[int]) -> dict[str, np.ndarray]:
        """Per site the [L, len(expected), H] view of the expected positions' columns."""
        if self.last:
            col = expected[0] % 2
            return {site: store[:, col : col + 1] for site, store in self.sites.items()}
        return {site: store[:, : len(expected)] for site, store in self.sites.items()}


def to_host(rows: torch.Tensor, dtype: str) -> np.ndarray:
    """Rows in the storage representation of `dtype`, as a host numpy array."""
    stored = rows.to(TORCH_STORAGE[dtype])
    if dtype == "bfloat16":
        return stored.view(torch.int16).cpu().numpy().view(np.uint16)
    return stored.cpu().numpy()
