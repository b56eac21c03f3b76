"""Minimal progress reporting for long runs (stderr; a live bar on a terminal, sparse lines otherwise)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(n, "features") as p: ... p.advance()``."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self._last_decile = -1

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        if self.tty:
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r{self.label:<10} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{self.done}/{self.total}  {elapsed:5.1f}s  eta {eta:5.1f}s")
            self.stream.flush()
        elif (decile := 10 * self.done // self.total) != self._last_decile:
            self._last_decile = decile
            self.stream.write(f"{self.label}: {self.done}/{self.total} ({elapsed:.1f}s)\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
