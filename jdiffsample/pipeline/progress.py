"""A one-line progress bar for long runs (redrawn in place on a terminal, else a line every 10%)."""

from __future__ import annotations

import math
import time

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """``1h02m03s``, ``2m03s`` or ``3s``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Counts finished items of ``total`` and draws ``prefix[####    ] done/total rate ETA`` on ``stream``."""

    def __init__(self, total: int, stream, prefix: str, unit: str = "img"):
        self.total, self.stream, self.prefix, self.unit = total, stream, prefix, unit
        self.done, self.start = 0, time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last_draw, self.last_decile = 0.0, 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        decile = 10 * self.done // max(self.total, 1)
        finished = self.done >= self.total
        if (self.tty and now - self.last_draw >= 0.2) or decile > self.last_decile or finished:
            self.last_draw, self.last_decile = now, decile
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            width = 24
            bar = "#" * (width * self.done // max(self.total, 1))
            line = (f"{self.prefix}[{bar:<{width}}] {self.done}/{self.total} {rate:.1f} {self.unit}/s "
                    f"ETA {duration(eta) if math.isfinite(eta) else '?'}")
            end = "\n" if finished or not self.tty else ""
            print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)
