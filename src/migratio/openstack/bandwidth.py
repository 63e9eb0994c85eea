"""A bandwidth cap (a site's ``BWLIMIT``) for bytes migratio sends itself.

rsync paces its own bytes (``--bwlimit``); this paces the API upload the same way: whatever
has been read so far never runs ahead of ``rate`` bytes per second since the first read.
"""

from __future__ import annotations

import time
from typing import Any


class Throttle:
    """Sleeps just enough that ``rate`` bytes per second is never exceeded on average."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("a bandwidth cap must be positive")
        self.rate = rate
        self.done = 0
        self._start: float | None = None

    def __call__(self, count: int) -> None:
        """Account for ``count`` bytes about to be sent; wait if they would go too early."""
        now = time.monotonic()
        if self._start is None:
            self._start = now
        self.done += count
        # the bytes before these went at the cap: these may go once those are paid for
        due = self._start + (self.done - count) / self.rate
        if due > now:
            time.sleep(due - now)


class ThrottledReader:
    """A file-like reader whose ``read`` keeps to a :class:`Throttle`."""

    def __init__(self, stream: Any, rate: float) -> None:
        self._stream = stream
        self._throttle = Throttle(rate)

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._stream.read(size)
        if data:
            self._throttle(len(data))
        return data
