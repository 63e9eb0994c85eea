"""Whether rsync compresses an image on its way to a site (``COMPRESS=auto|zstd|lz4|none``).

``auto`` decides per image from what costs (almost) nothing to measure:

1. **how well the image's data compresses**: 16 samples of 256 KiB spread over the file, each
   compressed with zlib level 1 (the standard library's; zstd -1 and lz4 compress the same
   kinds of data a little better and faster).  Above :data:`INCOMPRESSIBLE` (random data,
   already-compressed images) nothing is compressed: the sampling is all it costs (~50 ms).
2. **the rate the link to the site reached** in the last transfer there (kept in the staging
   directory, ``.link-<site>.json``).  zstd costs rsync's sender about a core for ~200 MB/s
   of input; lz4 is nearly free but sends more.  Over a link slower than
   :data:`ZSTD_BELOW` zstd wins; above :data:`LZ4_BELOW` (a LAN, loopback) compression only
   costs CPU and nothing is compressed; in between, lz4.  While the link is not known yet,
   the round trip to the site's SSH port (measured anyway, see :mod:`migratio.openstack.streams`)
   stands in: :data:`WAN_RTT` or more is a WAN (zstd), less or unknown lz4.  Only transfers
   sent uncompressed are remembered: a compressed one measures the compressor, not the link.
3. **whether there is a core to spare**: zstd only when the load average leaves at least one
   core idle; on a busy machine it would make the transfer CPU-bound (measured: zstd on five
   streams reached 22 MB/s on the wire of a 1 Gbit/s link with the two cores fully loaded),
   so lz4, which costs a fraction of zstd's CPU, is used instead -- except over a link known
   to be slower than :data:`SLOW_LINK`, which a fraction of a core keeps full.
   While the link's rate is not known, a transfer in pieces (several streams, see
   :mod:`migratio.openstack.streams`) measures it: its first pieces go with lz4 (cheap enough not to
   be the limit), and if the wire rate they reached is under :data:`SLOW_LINK` the rest goes
   with zstd (:class:`PieceCompression`). A round trip alone cannot tell a slow link from a
   fast one far away (200 Mbit/s and 1 Gbit/s at 40 ms): zstd wins on the first and makes
   the transfer CPU-bound on the second.
4. **what the peer's rsync supports**: rsync negotiates the algorithm; a peer that knows
   neither zstd nor lz4 (older than 3.2) fails the start of the transfer, which is then
   re-run once without compression (zlib, the old peers' only choice, is 7 to 13 times slower than
   the link: never).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLES = 16
SAMPLE_SIZE = 256 << 10
#: a sample ratio (compressed / original) above this: not worth compressing
INCOMPRESSIBLE = 0.85
#: links slower than this (bytes/s): zstd; faster than LZ4_BELOW: no compression
ZSTD_BELOW = 160e6
LZ4_BELOW = 450e6
#: a round trip (seconds) at least this long: a WAN
WAN_RTT = 0.004
#: a link slower than this (bytes/s): zstd whatever the load
SLOW_LINK = 50e6


@dataclass(frozen=True)
class Choice:
    """The algorithm rsync uses (``none``: no ``-z``), and why."""

    algorithm: str
    reason: str
    #: chosen without knowing the link: a transfer in pieces may change it (PieceCompression)
    provisional: bool = False

    @property
    def compresses(self) -> bool:
        return self.algorithm != "none"


def sample_ratio(path: Path) -> float:
    """Compressed / original size of samples spread over ``path`` (zlib level 1)."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    original = compressed = 0
    with path.open("rb") as stream:
        step = max(size // SAMPLES, SAMPLE_SIZE)
        for offset in range(0, size, step):
            stream.seek(offset)
            data = stream.read(SAMPLE_SIZE)
            if not data:
                break
            original += len(data)
            compressed += len(zlib.compress(data, 1))
    return compressed / original if original else 1.0


def choose(
    setting: str,
    path: Path,
    link_rate: float | None,
    rtt: float | None = None,
    idle_cores: float | None = None,
) -> Choice:
    """The algorithm for sending ``path``: ``setting`` unless it is ``auto``."""
    choice = _choose(setting, path, link_rate, rtt)
    slow = link_rate is not None and link_rate < SLOW_LINK
    if setting == "auto" and choice.algorithm == "zstd" and not slow:
        idle = spare_cores() if idle_cores is None else idle_cores
        if idle < 1:
            return Choice(
                "lz4",
                f"{choice.reason}, but no core to spare ({idle:.1f} idle)",
                choice.provisional,
            )
    return choice


def spare_cores() -> float:
    """Cores the 1-minute load average leaves idle."""
    return (os.cpu_count() or 1) - os.getloadavg()[0]


def _choose(setting: str, path: Path, link_rate: float | None, rtt: float | None) -> Choice:
    """:func:`choose` before asking whether there is a core to spare for zstd."""
    if setting != "auto":
        return Choice(setting, f"COMPRESS={setting}")
    ratio = sample_ratio(path)
    if ratio > INCOMPRESSIBLE:
        return Choice("none", f"auto: samples compress only to {ratio:.2f}")
    why = f"auto: samples compress to {ratio:.2f}"
    if link_rate is not None:
        why += f", link reached {link_rate / 1e6:.0f} MB/s"
        if link_rate >= LZ4_BELOW:
            return Choice("none", f"{why}, faster than compression")
        return Choice("zstd" if link_rate < ZSTD_BELOW else "lz4", why)
    if rtt is not None and rtt >= WAN_RTT:
        return Choice("zstd", f"{why}, round trip {rtt * 1000:.0f} ms", provisional=True)
    return Choice("lz4", f"{why}, link rate not known yet", provisional=True)


class PieceCompression:
    """The algorithm for each piece of a transfer in pieces (:mod:`migratio.openstack.streams`).

    A provisional ``auto`` choice (the link's rate not known) starts with lz4 and, once
    ``streams`` pieces have gone, looks at the wire rate they reached: under
    :data:`SLOW_LINK`, zstd for the rest (and lz4 otherwise). A peer that cannot compress
    (an rsync older than 3.2) turns it off for the rest.
    """

    def __init__(self, choice: Choice, streams: int) -> None:
        self.choice = choice
        self.streams = streams
        self.algorithm = "lz4" if choice.provisional and choice.compresses else choice.algorithm
        self.used: list[str] = []
        self._rates: list[float] = []
        self._decided = not (choice.provisional and choice.compresses)
        self._lock = threading.Lock()

    def sent(self, algorithm: str, wire_bytes: int, seconds: float) -> None:
        """A piece went with ``algorithm`` (what rsync really used) in ``seconds``.

        The link's rate is taken as the mean rate of a piece times the streams, which run
        at once: a rate since the transfer's start would count the logins before it.
        """
        with self._lock:
            if algorithm not in self.used:
                self.used.append(algorithm)
            if algorithm == "none" and self.algorithm != "none":
                self.algorithm, self._decided = "none", True  # the peer cannot compress
            self._rates.append(wire_bytes / max(seconds, 1e-3))
            if self._decided or len(self._rates) < self.streams:
                return
            self._decided = True
            rate = sum(self._rates) / len(self._rates) * self.streams
            if rate < SLOW_LINK:
                self.algorithm = "zstd"
            log.info(
                "compression %s from now on (link reached %.0f MB/s over the first %d pieces)",
                self.algorithm, rate / 1e6, len(self._rates),
            )  # fmt: skip

    def summary(self) -> str:
        """What the transfer used: ``zstd``, or ``lz4, then zstd``."""
        return ", then ".join(self.used) or self.algorithm


class LinkHistory:
    """The wire rate the last transfer to each site reached, kept across jobs and restarts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, site_id: str) -> Path:
        return self.directory / f".link-{site_id}.json"

    def rate(self, site_id: str) -> float | None:
        """Bytes per second on the wire last time, or None when unknown."""
        try:
            value = json.loads(self._path(site_id).read_text())["bytes_per_s"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return float(value) if isinstance(value, int | float) and value > 0 else None

    def record(
        self, site_id: str, wire_bytes: int, seconds: float, *, capped: bool, compressed: bool
    ) -> None:
        """Remember a transfer's wire rate (not one compressed, held back, or too short)."""
        if compressed or capped or seconds < 1.0 or wire_bytes < (8 << 20):
            return
        path = self._path(site_id)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"bytes_per_s": wire_bytes / seconds, "at": time.time()}))
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot remember the link rate to %s: %s", site_id, exc)
