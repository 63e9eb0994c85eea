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
   the round trip to the site's SSH port (measured anyway, see :mod:`migratio.streams`)
   stands in: :data:`WAN_RTT` or more is a WAN (zstd), less or unknown lz4.  Only transfers
   sent uncompressed are remembered: a compressed one measures the compressor, not the link.
3. **whether there is a core to spare**: over a link that may be fast, zstd only when the
   load average leaves at least one core idle; on a busy machine it would make the transfer
   CPU-bound (measured: zstd on five streams reached 22 MB/s on the wire of a 1 Gbit/s link
   with the two cores fully loaded), so lz4, which costs a fraction of zstd's CPU, is used
   instead. Over a slow link -- known to be under :data:`SLOW_LINK`, or not known yet but
   :data:`LONG_RTT` or more away -- zstd needs a fraction of a core to keep it full
   (25 MB/s on the wire is ~60 MB/s of input), and the bytes it saves are the time saved:
   zstd, whatever the load.
4. **what the peer's rsync supports**: rsync negotiates the algorithm; a peer that knows
   neither zstd nor lz4 (older than 3.2) fails the start of the transfer, which is then
   re-run once without compression (zlib, the old peers' only choice, is 7 to 13 times slower than
   the link: never).
"""

from __future__ import annotations

import json
import logging
import os
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
#: a link slower than this (bytes/s), or a round trip this long while the rate is not known:
#: zstd whatever the load
SLOW_LINK = 50e6
LONG_RTT = 0.030


@dataclass(frozen=True)
class Choice:
    """The algorithm rsync uses (``none``: no ``-z``), and why."""

    algorithm: str
    reason: str

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
    slow = link_rate < SLOW_LINK if link_rate is not None else (rtt or 0.0) >= LONG_RTT
    if setting == "auto" and choice.algorithm == "zstd" and not slow:
        idle = spare_cores() if idle_cores is None else idle_cores
        if idle < 1:
            return Choice("lz4", f"{choice.reason}, but no core to spare ({idle:.1f} idle)")
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
        return Choice("zstd", f"{why}, round trip {rtt * 1000:.0f} ms")
    return Choice("lz4", f"{why}, link rate not known yet")


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
