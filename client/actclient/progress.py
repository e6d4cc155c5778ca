"""A tiny stdlib progress bar for long client commands (generate, download, analyse).

It draws on a terminal only: when the stream is not a TTY (logs, CI, pipes) it prints nothing,
so redirected output stays clean. tqdm would do, but the client keeps its dependencies to the
stdlib, numpy, httpx and h5py.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

_BAR_WIDTH = 24
_MIN_REDRAW_S = 0.1  # at most ten redraws a second, so a fast loop is not slowed by the terminal


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Context manager that counts finished items and draws `desc [####....] n/total ...`.

    `update(n, **postfix)` adds `n` finished items and shows `key=value` postfix fields.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        stream: TextIO | None = None,
        unit: str = "it",
        enabled: bool | None = None,
    ) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.unit = unit
        self.count = 0
        self.postfix: dict[str, object] = {}
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        self._draw(force=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: object) -> None:
        """Record `n` more finished items and replace the shown postfix fields given."""
        self.count += n
        self.postfix.update(postfix)
        self._draw(force=self.count >= self.total)

    def write(self, message: str) -> None:
        """Print a log line above the bar (or plainly when the bar is off)."""
        if self.enabled:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(message + "\n")
        self._draw(force=True)

    def close(self) -> None:
        """Draw the final state and end the bar's line."""
        if self.enabled and self._width:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
        self.enabled = False

    def render(self) -> str:
        """The bar as text, e.g. `generate [######....] 12/48 25% 00:10<00:30 1.2it/s ok=12`."""
        elapsed = time.monotonic() - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(self.count / self.total, 1.0)
            filled = int(frac * _BAR_WIDTH)
            parts.append("[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "]")
            parts.append(f"{self.count}/{self.total} {frac:4.0%}")
            left = (self.total - self.count) / rate if rate > 0 else 0.0
            parts.append(f"{_clock(elapsed)}<{_clock(left)}")
        else:
            parts.append(f"{self.count} {_clock(elapsed)}")
        parts.append(f"{rate:.2f}{self.unit}/s")
        parts.extend(f"{k}={v}" for k, v in self.postfix.items())
        return " ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < _MIN_REDRAW_S:
            return
        self._last_draw = now
        line = self.render()
        pad = max(self._width - len(line), 0)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)
