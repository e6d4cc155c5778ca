"""How a record fails: for this record only (maybe retryable), or for the whole run."""

from __future__ import annotations


class RecordError(RuntimeError):
    """One record failed; `retryable` says whether submitting it again may help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class FatalError(RuntimeError):
    """Every record would fail the same way (bad key, bad capture spec): stop the run."""


class ShardGone(RecordError):
    """The server no longer has the shard (deleted, or the server was replaced)."""
