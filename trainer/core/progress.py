"""Progress of long passes as log lines: on a terminal or not (in log files, the stand-in of a tqdm bar)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator


class ProgressLog:
    """A log line every `every` seconds with the units done of `total`, their rate and the time left."""

    def __init__(self, what: str, total: int, log: Callable[[str], None] | None, every: float = 30.0,
                 unit: str = "items"):
        self.what, self.total, self.log, self.every, self.unit = what, total, log, every, unit
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.log is None or done == 0 or now - self.last < self.every:
            return
        self.last = now
        left = max(self.total - done, 0) * (now - self.t0) / done
        self.log(f"{self.what}: {done}/{self.total} {self.unit}, {now - self.t0:.0f} s, {done / (now - self.t0):.0f} "
                 f"{self.unit}/s, about {left / 60:.1f} min left")

    def counted(self, things: Iterable) -> Iterator:
        """`things`, passed through, with a progress line every `every` seconds; a last line with the count and the
        time when done (when it took a progress line at all)."""
        done = 0
        for done, thing in enumerate(things, 1):
            if done % 1024 == 0:  # the clock read once per 1024 things
                self.update(done)
            yield thing
        took = time.perf_counter() - self.t0
        if self.log is not None and took >= self.every:
            self.log(f"{self.what}: {done} {self.unit} in {took:.0f} s")
