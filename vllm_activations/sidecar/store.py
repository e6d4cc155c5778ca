"""The shard directory as the sidecar sees it: id validation, safe paths, sha256, listing.

Ids are file-name stems with the connector's capture-id rule (letters, digits, '.', '_', '-';
first character a letter or digit), so an id can never name a path outside the directory; on
top of that every path is resolved and must sit directly in the directory (symlinks out are
refused). sha256 is computed in a worker thread and cached by (name, size, mtime).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from vllm_activations.contract.files import file_sha256
from vllm_activations.contract.shard import SHARD_SUFFIX, iter_shard_paths
from vllm_activations.contract.spec import CAPTURE_ID_RE
from vllm_activations.sidecar.errors import ApiError


def validate_shard_id(shard_id: str, field: str = "id") -> str:
    """Return the id if it is a safe file-name stem, else raise a 400 naming the field."""
    if not CAPTURE_ID_RE.fullmatch(shard_id):
        raise ApiError(
            400,
            f"{shard_id!r} is not a valid id; use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit",
            field,
        )
    return shard_id


@dataclass(frozen=True)
class ShardEntry:
    id: str
    path: Path
    bytes: int
    modified: float
    sha256: str | None


class ShardStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._sha: dict[str, tuple[int, int, str]] = {}
        self._lock = threading.Lock()

    def path_for(self, shard_id: str) -> Path:
        """The shard file's path for a valid id (it may not exist)."""
        path = self.root / f"{validate_shard_id(shard_id)}{SHARD_SUFFIX}"
        if path.parent != self.root or Path(os.path.normpath(path)) != path:  # defence in depth
            raise ApiError(400, f"{shard_id!r} does not name a file in the shard directory", "id")
        return path

    def error_path_for(self, shard_id: str) -> Path:
        return self.root / f"{validate_shard_id(shard_id)}.error.json"

    def existing(self, shard_id: str) -> Path:
        """The path of a complete shard, or 404."""
        path = self.path_for(shard_id)
        if path.is_symlink() or not path.is_file():
            raise ApiError(404, f"no shard with id {shard_id!r}", "id")
        return path

    def sha256(self, path: Path) -> str:
        """Hex sha256 of a shard file (blocking: call it in a thread)."""
        st = path.stat()
        with self._lock:
            cached = self._sha.get(path.name)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        value = file_sha256(path)
        with self._lock:
            self._sha[path.name] = (st.st_size, st.st_mtime_ns, value)
        return value

    def cached_sha256(self, path: Path, st: os.stat_result) -> str | None:
        with self._lock:
            cached = self._sha.get(path.name)
        return cached[2] if cached and cached[:2] == (st.st_size, st.st_mtime_ns) else None

    def list(self, after: str | None, limit: int) -> tuple[list[ShardEntry], str | None]:
        """Shards sorted by id, starting after `after`; returns the page and the next cursor."""
        if after is not None:
            validate_shard_id(after, "after")
        entries: list[ShardEntry] = []
        more = False
        for path in iter_shard_paths(self.root):
            shard_id = path.name[: -len(SHARD_SUFFIX)]
            if after is not None and shard_id <= after:
                continue
            if not CAPTURE_ID_RE.fullmatch(shard_id) or path.is_symlink():
                continue
            if len(entries) == limit:
                more = True
                break
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            entries.append(
                ShardEntry(shard_id, path, st.st_size, st.st_mtime, self.cached_sha256(path, st))
            )
        return entries, (entries[-1].id if more and entries else None)

    def delete(self, shard_id: str) -> None:
        """Remove a shard (and its error file, if any); 404 if there is no shard."""
        path = self.existing(shard_id)
        path.unlink()
        self.error_path_for(shard_id).unlink(missing_ok=True)
        with self._lock:
            self._sha.pop(path.name, None)
