"""Durable, append-only JSONL: the Phase 1 output file and the recording manifest.

One line per finished item, flushed and fsynced, so a killed run loses at most the line it
was writing; a torn last line from such a kill is fenced off with a newline on reopen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class JsonlAppender:
    """Appends lines to a JSONL file durably."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a+", encoding="utf-8")
        # A kill mid-write can leave a torn last line: start on a fresh line after it.
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() > 0:
            self._file.seek(self._file.tell() - 1)
            if self._file.read(1) != "\n":
                self._file.write("\n")
                self._file.flush()

    def write_line(self, line: str) -> None:
        """Append one already-serialised JSON line."""
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, entry: Mapping[str, Any]) -> None:
        self.write_line(json.dumps(entry, ensure_ascii=False))

    def close(self) -> None:
        self._file.close()
