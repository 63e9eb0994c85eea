"""Several rsync streams at once, over ranges of one file: no SSH window limit on long links.

One SSH channel never has more than OpenSSH's 2 MiB window in flight, so one stream carries
at most ~2 MiB per round trip: 107 / 80 / 44 MB/s at 0 / 20 / 40 ms here, whatever the link.
Over a link with a long round trip the file is cut into ranges of equal size; each range is
copied into the staging directory (``copy_file_range``, in the kernel) and sent by its own
rsync over its own SSH connection (host key checked, encrypted, ``--inplace`` and resumable
as ever) to ``<remote path>.<k>``. The destination's upload helper reads the pieces in order
and checks the digest of the whole, so the end-to-end check is the same as with one stream.

``STREAMS=auto`` (the default) measures the round trip to the site's SSH port (the time of
one TCP connect): under :data:`ONE_STREAM_BELOW` one stream is as fast as the cipher and one
is used; above it one more stream per :data:`RTT_PER_STREAM` of round trip (at least two,
at most :data:`MAX_AUTO`). ``STREAMS=N`` forces N (1: the original's single rsync).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from migratio import rsync
from migratio.config import SshTarget
from migratio.errors import Cancelled

log = logging.getLogger(__name__)

#: a round trip under this and one stream is enough (seconds)
ONE_STREAM_BELOW = 0.004
#: round trip per extra stream above that: 2 MiB per window / 8 ms = 260 MB/s per stream
RTT_PER_STREAM = 0.008
MAX_AUTO = 8
#: no range smaller than this: an rsync start costs a login
MIN_RANGE = 8 << 20
_ALIGN = 1 << 20


def measure_rtt(host: str, port: int, *, timeout: float = 5.0) -> float | None:
    """The shortest of two TCP connects to ``host:port`` (one round trip each), or None."""
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return None
    best = None
    for _ in range(2):
        begin = time.monotonic()
        try:
            with socket.socket(address[0], address[1]) as probe:
                probe.settimeout(timeout)
                probe.connect(address[4])
        except OSError:
            return best
        took = time.monotonic() - begin
        best = took if best is None else min(best, took)
    return best


def stream_count(setting: int | None, rtt: float | None, size: int) -> int:
    """How many streams for a file of ``size`` bytes (``setting`` None: auto)."""
    most = max(1, size // MIN_RANGE)
    if setting is not None:
        return max(1, min(setting, most))
    if rtt is None or rtt < ONE_STREAM_BELOW:
        return 1
    wanted = max(2, math.ceil(rtt / RTT_PER_STREAM))
    return max(1, min(wanted, MAX_AUTO, most))


def range_size(size: int, streams: int) -> int:
    """The length of every range but the last (a whole MiB)."""
    return math.ceil(size / streams / _ALIGN) * _ALIGN


def _copy_range(source: Path, target: Path, offset: int, length: int) -> None:
    """``target`` = ``length`` bytes of ``source`` from ``offset`` (copy_file_range)."""
    with source.open("rb") as src, target.open("wb") as dst:
        copied = 0
        while copied < length:
            done = os.copy_file_range(
                src.fileno(), dst.fileno(), length - copied, offset + copied, copied
            )
            if done == 0:
                raise OSError(f"{source} ended before byte {offset + copied}")
            copied += done


class _Sum:
    """Adds up the progress of the streams for one ``on_progress``."""

    def __init__(self, count: int, on_progress: Callable[[int], None] | None) -> None:
        self.done = [0] * count
        self.lock = threading.Lock()
        self.on_progress = on_progress

    def of(self, k: int) -> Callable[[int], None]:
        def report(count: int) -> None:
            with self.lock:
                self.done[k] = count
                total = sum(self.done)
            if self.on_progress is not None:
                self.on_progress(total)

        return report


@contextmanager
def _linked(cancel: threading.Event) -> Iterator[threading.Event]:
    """An event set when ``cancel`` is, or by whoever holds it (a stream that failed)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if cancel.is_set():
                stop.set()

    watcher = threading.Thread(target=watch, name="streams-cancel", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        stop.set()
        watcher.join()


def push_ranges(
    source: Path,
    target: SshTarget,
    remote_path: str,
    *,
    streams: int,
    workdir: Path,
    timeout: float,
    cancel: threading.Event,
    on_progress: Callable[[int], None] | None,
    compress: str,
    bwlimit: int | None,
) -> rsync.RsyncResult:
    """Send ``source`` as ``streams`` ranges to ``remote_path.0``, ``.1``... at once."""
    size = source.stat().st_size
    length = range_size(size, streams)
    ranges = [(k, k * length, min(length, size - k * length)) for k in range(streams)]
    ranges = [r for r in ranges if r[2] > 0]
    progress = _Sum(len(ranges), on_progress)
    begin = time.monotonic()
    pieces = [workdir / f"{source.name}.{k}" for k, _, _ in ranges]
    ready = [threading.Event() for _ in ranges]

    def copy_all() -> None:
        """Copy the ranges in order, so that the first stream starts after one range's copy."""
        for (k, offset, count), piece in zip(ranges, pieces, strict=True):
            if stop.is_set():
                return
            _copy_range(source, piece, offset, count)
            ready[k].set()

    def one(k: int) -> rsync.RsyncResult:
        try:
            while not ready[k].wait(0.1):
                if stop.is_set():
                    raise Cancelled("stopped")
            return rsync.push(
                pieces[k],
                target,
                f"{remote_path}.{k}",
                sparse=False,
                timeout=timeout,
                cancel=stop,
                on_progress=progress.of(k),
                compress=compress,
                bwlimit=None if bwlimit is None else max(1024, bwlimit // len(ranges)),
            )
        except BaseException:
            stop.set()
            raise
        finally:
            pieces[k].unlink(missing_ok=True)

    with _linked(cancel) as stop, ThreadPoolExecutor(len(ranges) + 1, "stream") as pool:
        copier = pool.submit(copy_all)
        futures = [pool.submit(one, k) for k, _, _ in ranges]
        results, errors = [], []
        try:
            copier.result()
        except BaseException as exc:
            stop.set()
            errors.append(exc)
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:
                errors.append(exc)
    for piece in pieces:
        piece.unlink(missing_ok=True)
    if cancel.is_set():
        raise Cancelled("rsync was stopped on request")
    if errors:
        first = next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
        raise first
    log.info("sent %d ranges of %d bytes at once", len(ranges), length)
    return rsync.RsyncResult(
        bytes_sent=sum(r.bytes_sent for r in results),
        seconds=time.monotonic() - begin,
        compress=results[0].compress if results else compress,
    )
