"""Status lines: the texts Atmosphere shows operators, and where they go.

The texts are the original tool's, kept word for word (typos included: Atmosphere's
operators know them); detail may follow them on the same line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

# OpenStack → OpenStack
MIGRATION_STARTED = "Migration started"
TRANSFERED = "Transfered"
REGISTERED = "Registered"
# OpenStack → Amazon
IMAGE_CONVERTED = "Image converted"
IMAGE_TRANSFERED = "Image transfered"
IMAGE_IMPORTED = "Image imported"
REGISTERED_IMAGE = "Registered image"
#: progress of a VM Import task (migratio's own; the original had none)
IMPORTING = "Importing"
# failures
IMAGE_NOT_EXIST = "Requested image not exist."
ALREADY_UPLOADED = "Requested image was uploaded."
NOT_CONVERTED = "Image was not converted."
NOT_UPLOADED = "Image was not uploaded."

log = logging.getLogger(__name__)


class StatusSink(Protocol):
    """Receives each status line of one migration (stdout, the log, Atmosphere's queue)."""

    def __call__(self, text: str) -> None: ...


class LogSink:
    """A sink that writes status lines to the log (and nowhere else)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def __call__(self, text: str) -> None:
        self.logger.info("status: %s", text)


class FanOut:
    """A sink that passes each line to several sinks."""

    def __init__(self, *sinks: StatusSink) -> None:
        self.sinks = sinks

    def __call__(self, text: str) -> None:
        for sink in self.sinks:
            sink(text)


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Turns a stream of byte counts into throttled ``<label>: 45% (…)`` status lines.

    A line goes out at most every ``interval`` seconds, and never twice for the same
    percentage, so that a many-gigabyte copy gives a readable handful of lines.
    """

    def __init__(
        self,
        sink: StatusSink,
        label: str,
        total: int,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.label = label
        self.total = max(total, 1)
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._last_time = self.started
        self._last_percent = -1

    def __call__(self, done: int) -> None:
        """Report that ``done`` bytes of ``total`` are through."""
        now = self.clock()
        percent = min(100, done * 100 // self.total)
        if now - self._last_time < self.interval or percent == self._last_percent:
            return
        if percent >= 100:
            return  # the step's own completion line says it
        self._last_time, self._last_percent = now, percent
        rate = done / max(now - self.started, 1e-9)
        self.sink(
            f"{self.label}: {percent}% ({human_bytes(done)} of {human_bytes(self.total)}, "
            f"{human_bytes(rate)}/s)"
        )
