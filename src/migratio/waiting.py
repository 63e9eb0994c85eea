"""Waiting for something outside to finish (a snapshot, an AMI, an import task).

Every wait has a deadline and gives way to a stop request; the clock can be replaced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from migratio.errors import Cancelled, MigratioError

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float,
    cancel: threading.Event,
    expired: Callable[[], MigratioError],
    what: str,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something; return that.

    ``check`` raises when the thing has failed. At the deadline (``timeout`` seconds from now)
    ``check`` runs one last time, then the error ``expired()`` is raised; when ``cancel`` is
    set, :class:`Cancelled` (saying "stopped while waiting for ``what``").
    """
    deadline = clock() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        left = deadline - clock()
        if left <= 0:
            raise expired()
        if cancel.wait(min(interval, left)):
            raise Cancelled(f"stopped while waiting for {what}")
