"""The run folder on disk: shard file names, the manifest (one fsynced JSON line per record),
the per-record job file that lets a killed run resume its download, and how a rerun decides
what is already done."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_activations.contract.files import file_sha256
from vllm_activations.contract.shard import SHARD_SUFFIX

MANIFEST_NAME = "manifest.jsonl"
SHARDS_DIRNAME = "shards"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,150}$")


def shard_name(record_id: str) -> str:
    """The shard file name for a record id: the id itself when it is a safe file name, else a
    sanitised id with a short hash (ids are unique, and so are these names)."""
    if _SAFE_NAME.match(record_id) and not record_id.endswith((".part", ".json")):
        return record_id + SHARD_SUFFIX
    clean = re.sub(r"[^A-Za-z0-9._+-]", "_", record_id).lstrip("._-")[:100] or "record"
    digest = hashlib.sha256(record_id.encode()).hexdigest()[:12]
    return f"{clean}-{digest}{SHARD_SUFFIX}"


def read_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The last manifest line of every record id (a torn last line is ignored)."""
    path = Path(path)
    entries: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return entries
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            entries[obj["id"]] = obj
    return entries


def shard_verifies(out_dir: Path, entry: dict[str, Any]) -> bool:
    """Whether an `ok` manifest entry's shard file exists with its recorded size and sha256."""
    shard = entry.get("shard")
    if entry.get("status") != "ok" or not isinstance(shard, str):
        return False
    path = out_dir / shard
    try:
        if path.stat().st_size != entry.get("bytes"):
            return False
    except OSError:
        return False
    return file_sha256(path) == entry.get("sha256")


@dataclass
class RunPaths:
    out: Path
    shards: Path
    manifest: Path

    @classmethod
    def of(cls, out_dir: Path) -> RunPaths:
        return cls(out_dir, out_dir / SHARDS_DIRNAME, out_dir / MANIFEST_NAME)

    def final(self, record_id: str) -> Path:
        return self.shards / shard_name(record_id)

    def part(self, record_id: str) -> Path:
        return self.shards / f".{shard_name(record_id)}.part"

    def job(self, record_id: str) -> Path:
        return self.shards / f".{shard_name(record_id)}.job.json"


def failed_entry(record_id: str, mode: str, capture: dict[str, Any], error: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "status": "failed",
        "shard": None,
        "bytes": 0,
        "sha256": None,
        "tokens": 0,
        "mode": mode,
        "capture": capture,
        "server": None,
        "error": error,
        "finished": now(),
    }


def matches(path: Path, result: dict[str, Any]) -> bool:
    """Whether a file has the size and sha256 a capture result gives for its shard."""
    shard = result["shard"]
    try:
        return path.stat().st_size == int(shard["bytes"]) and file_sha256(path) == shard["sha256"]
    except (OSError, KeyError, TypeError, ValueError):
        return False


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_job(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("server"), str)):
        return None
    result = obj.get("result")
    if not (isinstance(result, dict) and isinstance(result.get("shard"), dict)):
        return None
    return obj


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
