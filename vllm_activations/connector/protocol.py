"""What crosses from the scheduler (engine core) to the workers each step, and the file names
both sides and the client agree on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

CAPTURE_KEY = "capture"
CAPTURE_ID_KEY = "capture_id"
DEFAULT_SHARD_DIR = "shards"


def shard_path(shard_dir: str | os.PathLike[str], capture_id: str) -> Path:
    return Path(shard_dir) / f"{capture_id}.h5"


def error_path(shard_dir: str | os.PathLike[str], capture_id: str) -> Path:
    return Path(shard_dir) / f"{capture_id}.error.json"


@dataclass
class NewCapture:
    """Sent once per request, the first step it is scheduled."""

    capture_id: str
    spec: dict[str, Any]
    layers: list[int]
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any]
    stats_slot: int | None = None
    summary_slot: int | None = None
    # A `positions: "last"` request's device rows (capture.CaptureState.last_rows), or None:
    # its rows go to the host each step.
    last_slot: int | None = None


@dataclass
class FinishedCapture:
    """Sent the step after a capture request finished."""

    output_token_ids: list[int]
    finish_reason: str | None


@dataclass
class CaptureStepMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step.

    block_tables and scheduled cover the capture requests scheduled this step: scheduled[r] is
    (first position computed this step, number of tokens scheduled), i.e. the request's
    num_computed_tokens and num_scheduled_tokens; block_tables[r] the KV blocks those
    positions are written to, the request's block table from index start // block_size (a
    decode step: one block).
    """

    new: dict[str, NewCapture] = field(default_factory=dict)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    scheduled: dict[str, tuple[int, int]] = field(default_factory=dict)
    finished: dict[str, FinishedCapture] = field(default_factory=dict)
    resumed: set[str] = field(default_factory=set)
