"""A tiny progress bar with rate and time left (no tqdm dependency).

    bar = Progress(total=1000, unit="tok", label="collision")
    for ...:
        bar.update(n)        # n more units done
    bar.close()

Writes one line to stderr, redrawn in place with a carriage return when stderr is a terminal
and at most every few seconds otherwise (so logs stay short).
"""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """A progress bar over `total` units: [####......] done/total unit, rate, elapsed, left."""

    def __init__(self, total: float, unit: str = "it", label: str = "", width: int = 28,
                 stream=None, min_interval: float | None = None):
        self.total = max(float(total), 1e-12)
        self.unit, self.label, self.width = unit, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval if min_interval is not None else (0.1 if self.tty else 5.0)
        self.done = 0.0
        self.start = time.perf_counter()
        self._last = -1e9
        self._drawn = None
        self._closed = False

    def line(self) -> str:
        """The bar as text, for the current count."""
        elapsed = time.perf_counter() - self.start
        frac = min(self.done / self.total, 1.0)
        fill = int(round(frac * self.width))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        left_s = _clock(left) if left == left else "?"
        head = f"{self.label} " if self.label else ""
        return (f"{head}[{'#' * fill}{'.' * (self.width - fill)}] {frac * 100:5.1f}% "
                f"{self.done:,.0f}/{self.total:,.0f} {self.unit} | {rate:,.1f} {self.unit}/s | "
                f"{_clock(elapsed)} elapsed, {left_s} left")

    def update(self, n: float = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.min_interval or self.done >= self.total:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        self._drawn = self.done
        end = "\r" if self.tty else "\n"
        self.stream.write(self.line() + end)
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._drawn != self.done:
            self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
