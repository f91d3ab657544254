"""A progress line for long runs, on stderr so stdout stays the table and the JSON line.

On a terminal the line is rewritten in place; anywhere else (CI logs, a file, a pipe) each
update is a plain line with no escape codes, at most one every `every` seconds.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class ProgressLine:
    def __init__(self, every: float = 5.0, stream: TextIO | None = None) -> None:
        self.every = every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = -math.inf
        self._open = False  # a terminal line waits for its end

    def update(self, text: str, *, force: bool = False) -> None:
        """Shows `text` if `every` seconds have passed since the last update (or `force`)."""
        now = time.monotonic()
        if self.every <= 0 or (not force and now - self._last < self.every):
            return
        self._last = now
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self._open = True
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        """A last update that stays on screen."""
        self.update(text, force=True)
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
