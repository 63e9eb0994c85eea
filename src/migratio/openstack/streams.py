"""Several rsync streams at once, over pieces of one file: no SSH window limit on long links.

One SSH channel never has more than OpenSSH's 2 MiB window in flight, so one stream carries
at most ~2 MiB per round trip: 107 / 80 / 44 MB/s at 0 / 20 / 40 ms here, whatever the link.
Over a link with a long round trip the file is cut into pieces (:func:`piece_size`: about
32, of 32-256 MiB); each piece is copied into the staging directory (``copy_file_range``, in
the kernel; only a few at a time) and sent by rsync (host key checked, encrypted,
``--inplace`` and resumable as ever) to ``<remote path>.<k>``. Several streams take the
pieces in order, each over an SSH connection of its own, so the file arrives nearly front to
back and the destination's upload helper, which reads the pieces in order, follows right
behind; it checks the digest of the whole, so the end-to-end check is the same as with one
stream.

``STREAMS=auto`` (the default) measures the round trip to the site's SSH port (the time of
one TCP connect): under :data:`ONE_STREAM_BELOW` one stream is as fast as the cipher and one
is used; above it one more stream per :data:`RTT_PER_STREAM` of round trip (at least two,
at most :data:`MAX_AUTO`). ``STREAMS=N`` forces N (1: the original's single rsync).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from migratio.adapters import rsync
from migratio.adapters.ssh import SshMaster
from migratio.config import SshTarget
from migratio.errors import Cancelled
from migratio.openstack.compression import PieceCompression

log = logging.getLogger(__name__)

#: a round trip under this and one stream is enough (seconds)
ONE_STREAM_BELOW = 0.004
#: round trip per extra stream above that: 2 MiB per window / 8 ms = 260 MB/s per stream
RTT_PER_STREAM = 0.008
MAX_AUTO = 8
#: no stream for less than this: an rsync start costs a few round trips
MIN_RANGE = 8 << 20
#: with the migration's own connection for the first stream, the others log in once its first
#: bytes move, or after this many seconds: each login's key exchange costs both hosts tens of
#: milliseconds of CPU, which the first piece's start needs more (not during a compression
#: trial, which compares the rates of pieces started together)
HEAD_START = 1.0
#: a file goes in about this many pieces, each no smaller than MIN_PIECE, no larger than MAX_PIECE
PIECES = 32
MIN_PIECE = 32 << 20
MAX_PIECE = 256 << 20
_ALIGN = 1 << 20
#: with BWLIMIT, a stream's --bwlimit is raised by at most this factor to make up for the
#: starts of its pieces (see :class:`_Pace`)
MAX_CATCH_UP = 1.3


def measure_rtt(host: str, port: int, *, timeout: float = 5.0) -> float | None:
    """The shortest of two TCP connects to ``host:port`` (one round trip each), or None.

    Each connect's round trip is the kernel's own sample of it (``TCP_INFO``'s ``rtt``) where
    there is one: the time the call took also holds however long this thread then waited for
    the GIL, which the migration's other threads hold while it runs (5 ms and more seen on a
    busy machine, which made a loopback look like a WAN)."""
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
                took = min(time.monotonic() - begin, _kernel_rtt(probe))
        except OSError:
            return best
        best = took if best is None else min(best, took)
    return best


#: where ``struct tcp_info`` (linux/tcp.h) holds ``tcpi_rtt`` (microseconds): 8 bytes of
#: state and options, then 32-bit fields, ``rtt`` the 16th of them
_TCPI_RTT = 8 + 15 * 4


def _kernel_rtt(connected: socket.socket) -> float:
    """The kernel's round-trip estimate of a just connected TCP socket (seconds), from its
    handshake; infinity where it cannot be read (not Linux) or is not known yet."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return math.inf
    try:
        info = connected.getsockopt(socket.IPPROTO_TCP, tcp_info, 104)
    except OSError:
        return math.inf
    if len(info) < _TCPI_RTT + 4:
        return math.inf
    (rtt,) = struct.unpack_from("I", info, _TCPI_RTT)
    return rtt / 1e6 if rtt > 0 else math.inf


def stream_count(setting: int | None, rtt: float | None, size: int) -> int:
    """How many streams for a file of ``size`` bytes (``setting`` None: auto)."""
    most = max(1, size // MIN_RANGE)
    if setting is not None:
        return max(1, min(setting, most))
    if rtt is None or rtt < ONE_STREAM_BELOW:
        return 1
    wanted = max(2, math.ceil(rtt / RTT_PER_STREAM))
    return max(1, min(wanted, MAX_AUTO, most))


def layout(
    setting: int | None, rtt: float | None, size: int, earlier: Mapping[str, int], name: str
) -> tuple[int, int | None]:
    """Streams and piece size (None: one file) for ``size`` bytes sent as ``name``.

    ``earlier`` is what an interrupted attempt left there (file name → bytes). With
    ``STREAMS=auto`` the round trip may have been measured on the other side of
    :data:`ONE_STREAM_BELOW` last time; the layout that holds more of the file wins, so
    that the re-run resumes it instead of sending everything again in the other one.
    """
    streams = stream_count(setting, rtt, size)
    piece: int | None = piece_size(size) if streams > 1 else None
    if piece is not None and piece >= size:
        return 1, None
    if setting is not None or size <= piece_size(size):
        return streams, piece
    whole = earlier.get(name, 0)
    prefix = f"{name}."
    pieces = sum(
        n for k, n in earlier.items() if k.startswith(prefix) and k[len(prefix) :].isdigit()
    )
    if piece is None and pieces > whole:
        return min(2, max(1, size // MIN_RANGE)), piece_size(size)
    if piece is not None and whole > pieces:
        return 1, None
    return streams, piece


def piece_size(size: int) -> int:
    """The length of every piece but the last (a whole MiB), for a file of ``size`` bytes.

    It depends on the size alone, not on the number of streams, so that a re-run (with
    another round trip, hence another stream count) finds the pieces of an earlier attempt
    where it left them.
    """
    want = min(max(size // PIECES, MIN_PIECE), MAX_PIECE)
    return math.ceil(want / _ALIGN) * _ALIGN


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
    """Adds up the progress of the pieces for one ``on_progress``."""

    def __init__(self, count: int, on_progress: Callable[[int], None] | None) -> None:
        self.done = [0] * count
        self.lock = threading.Lock()
        self.on_progress = on_progress
        #: set once the first piece's bytes are on their way (rsync's first report)
        self.moving = threading.Event()

    def of(self, k: int) -> Callable[[int], None]:
        def report(count: int) -> None:
            if k == 0 and count > 0:
                self.moving.set()
            with self.lock:
                self.done[k] = count
                total = sum(self.done)
            if self.on_progress is not None:
                self.on_progress(total)

        return report


def _head_start(moving: threading.Event, stop: threading.Event) -> bool:
    """Wait until the first piece's bytes move, or :data:`HEAD_START` seconds; False if
    ``stop`` is set meanwhile."""
    deadline = time.monotonic() + HEAD_START
    while not moving.wait(0.05) and time.monotonic() < deadline:
        if stop.is_set():
            return False
    return not stop.is_set()


@contextmanager
def linked(cancel: threading.Event) -> Iterator[threading.Event]:
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


class _Pace:
    """The ``--bwlimit`` of one stream's next piece: its share of ``BWLIMIT``, divided by the
    part of their limits its earlier pieces reached, so that the streams together average the
    cap. Each piece's rsync sends nothing while it starts (a few round trips), and rsync's
    limiter gives no credit for that: with the bare share, three streams at 1 Gbit/s and 20 ms
    averaged 0.92 of the cap. At most :data:`MAX_CATCH_UP` times the share (a link slower
    than the cap makes every piece fall short)."""

    def __init__(self, share: int | None) -> None:
        self.share = None if share is None else max(1024, share)  # None: no cap
        self._sent = 0.0  # bytes the stream's pieces sent
        self._allowed = 0.0  # bytes their limits allowed in the same time

    def limit(self) -> int | None:
        if self.share is None or self._sent <= 0:
            return self.share
        factor = min(MAX_CATCH_UP, max(1.0, self._allowed / self._sent))
        return round(self.share * factor)

    def sent(self, limit: int | None, bytes_sent: int, seconds: float) -> None:
        if limit is None or bytes_sent < (1 << 20) or seconds < 0.5:
            return  # no cap, a piece found complete there, or one too short to tell
        self._sent += bytes_sent
        self._allowed += limit * seconds


class _Pieces:
    """The pieces of one file: cut in order into the work directory, a few ahead of the streams.

    At most ``ahead`` pieces are on disk at once, so a transfer needs that many pieces of
    extra staging space, not a second copy of the image.
    """

    def __init__(self, source: Path, workdir: Path, piece: int, ahead: int) -> None:
        self.source = source
        size = source.stat().st_size
        count = -(-size // piece)
        self.spans = [(k, k * piece, min(piece, size - k * piece)) for k in range(count)]
        self.paths = [workdir / f"{source.name}.{k}" for k, _, _ in self.spans]
        self.ready = [threading.Event() for _ in self.spans]
        self.room = threading.Semaphore(ahead)
        self._next = 0
        self._lock = threading.Lock()

    def cut_all(self, stop: threading.Event) -> None:
        """Copy the pieces out in order (``copy_file_range``), waiting for room on disk."""
        for (k, offset, count), path in zip(self.spans, self.paths, strict=True):
            while not self.room.acquire(timeout=0.2):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            _copy_range(self.source, path, offset, count)
            self.ready[k].set()

    def wait(self, k: int, stop: threading.Event) -> None:
        """Until piece ``k`` is cut (:class:`Cancelled` once ``stop`` is set)."""
        while not self.ready[k].wait(0.1):
            if stop.is_set():
                raise Cancelled("stopped")

    def take(self) -> int | None:
        """The next piece to send (in order), or None when every piece is taken."""
        with self._lock:
            if self._next >= len(self.spans):
                return None
            self._next += 1
            return self._next - 1

    def sent(self, k: int) -> None:
        self.paths[k].unlink(missing_ok=True)
        self.room.release()

    def remove(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


def _errors_of(futures: list[Future[None]], stop: threading.Event) -> list[BaseException]:
    """What each of ``futures`` raised, once all are done (the first error sets ``stop``)."""
    errors = []
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            stop.set()
            errors.append(exc)
    return errors


def push_ranges(
    source: Path,
    target: SshTarget,
    remote_path: str,
    *,
    streams: int,
    piece: int,
    workdir: Path,
    timeout: float,
    cancel: threading.Event,
    on_progress: Callable[[int], None] | None,
    compress: PieceCompression,
    bwlimit: int | None,
    make_dir: str | None = None,
    shared: SshMaster | None = None,
) -> rsync.RsyncResult:
    """Send ``source`` in pieces of ``piece`` bytes to ``remote_path.0``, ``.1``..., by
    ``streams`` SSH connections at once.

    The pieces are taken in order: the file arrives nearly front to back, at most one
    piece per stream out of order, so the destination's upload (which reads it front to
    back) follows right behind the transfer instead of waiting for its end. Each stream is
    one SSH connection of its own (:class:`SshMaster`: its own TCP window, its own cipher
    process) through which the rsync of each of its pieces runs in about one round trip.
    With ``shared`` (the migration's own master connection, started before the source was
    even asked), the first stream is that one: the first piece waits for no login of its own.
    """
    pieces = _Pieces(source, workdir, piece, ahead=streams + 1)
    streams = max(1, min(streams, len(pieces.spans)))
    progress = _Sum(len(pieces.spans), on_progress)
    begin = time.monotonic()
    results: list[rsync.RsyncResult] = []

    def lane(number: int) -> None:
        try:
            with contextlib.ExitStack() as stack:
                master = shared if number == 0 and shared is not None else None
                if master is None:
                    # not while lz4 is tried against zstd: its two waves must start alike
                    head_start = shared is not None and not compress.trial
                    if head_start and not _head_start(progress.moving, stop):
                        raise Cancelled("stopped")
                    master = stack.enter_context(SshMaster(target))
                # one login per stream: its pieces' rsyncs wait for the master instead of
                # logging in beside it (sshd drops logins beyond MaxStartups, 10 by default)
                master.wait()
                through = master.target
                pace = _Pace(None if bwlimit is None else bwlimit // streams)
                while (k := pieces.take()) is not None:
                    pieces.wait(k, stop)
                    algorithm = compress.for_piece(k)
                    limit = pace.limit()
                    try:
                        result = rsync.push(
                            pieces.paths[k],
                            through,
                            f"{remote_path}.{k}",
                            sparse=False,
                            timeout=timeout,
                            cancel=stop,
                            on_progress=progress.of(k),
                            compress=algorithm,
                            bwlimit=limit,
                            make_dir=make_dir,
                            renice_sshd=master is not shared,  # shared: the helper's too
                        )
                    finally:
                        pieces.sent(k)
                    if k == 0:  # done, even if it moved nothing (a piece rsync found complete)
                        progress.moving.set()
                    results.append(result)
                    pace.sent(limit, result.bytes_sent, result.seconds)
                    compress.sent(k, result.compress, pieces.spans[k][2], result.seconds)
        except BaseException:
            stop.set()
            raise

    with linked(cancel) as stop, ThreadPoolExecutor(streams + 1, "stream") as pool:
        cutter = pool.submit(pieces.cut_all, stop)
        futures = [pool.submit(lane, number) for number in range(streams)]
        errors = _errors_of([cutter, *futures], stop)
    pieces.remove()
    if cancel.is_set():
        raise Cancelled("rsync was stopped on request")
    if errors:
        first = next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
        raise first
    log.info("sent %d pieces of %d bytes over %d streams", len(pieces.spans), piece, streams)
    return rsync.RsyncResult(
        bytes_sent=sum(r.bytes_sent for r in results),
        seconds=time.monotonic() - begin,
        compress=compress.summary(),
    )
