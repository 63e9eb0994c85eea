"""Whether rsync compresses an image on its way to a site (``COMPRESS=auto|zstd|lz4|none``).

``auto`` decides per image from what costs (almost) nothing to measure:

1. **how well the image's data compresses**: 16 samples of 256 KiB spread over the file, each
   compressed with zlib level 1 (the standard library's; zstd -1 and lz4 compress the same
   kinds of data a little better and faster).  Above :data:`INCOMPRESSIBLE` (random data,
   already-compressed images) nothing is compressed: the sampling is all it costs (~50 ms).
2. **the rate the link to the site reached** in the last transfer there (kept in the staging
   directory, ``.link-<site>.json``).  zstd (at level 1, :data:`migratio.adapters.rsync.ZSTD_LEVEL`)
   costs rsync about half again lz4's CPU and sends ~0.7 of lz4's bytes.  Over a link slower than
   :data:`ZSTD_BELOW` zstd wins; above :data:`LZ4_BELOW` (a LAN, loopback) compression only
   costs CPU and nothing is compressed; in between, lz4.  While the link is not known yet,
   the round trip to the site's SSH port (measured anyway, see :mod:`migratio.openstack.streams`)
   stands in for one stream (a transfer in pieces finds out instead, see 4):
   :data:`WAN_RTT` or more is a WAN (zstd), less or unknown lz4.  Only transfers
   sent uncompressed are remembered: a compressed one measures the compressor, not the link.
3. **whether there is a core to spare**: zstd only when the load average leaves at least one
   core idle; on a busy machine it would make the transfer CPU-bound (measured: zstd on five
   streams reached 22 MB/s on the wire of a 1 Gbit/s link with the two cores fully loaded),
   so lz4, which costs a fraction of zstd's CPU, is used instead -- except over a link known
   to be slower than :data:`SLOW_LINK`, which a fraction of a core keeps full. (A transfer
   in pieces over a link not known yet measures instead, see 4: the load average is a
   minute old.)
4. **an experiment, for a transfer in pieces** (several streams, see
   :mod:`migratio.openstack.streams`) while the link's rate is not known: the first wave of
   pieces (one per stream) goes with lz4, the second with zstd, and the rest with zstd
   unless its pieces carried less than :data:`ZSTD_MARGIN` of lz4's *file* bytes per
   second: beside lz4's pieces, which need less CPU, zstd's look slower than a transfer in
   zstd turns out (:class:`PieceCompression`); should a later wave of zstd fall under that
   share of lz4's rate, lz4 for the rest (also where no core was spare, 3: the trial
   measures the rates under that load). A round trip cannot tell a slow link from a fast
   one far away (200 Mbit/s and 1 Gbit/s at 40 ms): zstd wins on the first and makes the transfer
   CPU-bound on the second; nor can the wire rate of lz4's pieces (pieces that are short,
   CPU-bound or dominated by their start look like a slow link). Only the file's rate under
   each says which is faster here, now. A transfer of fewer than :data:`MIN_WAVES` pieces per
   stream has too little left after the experiment to pay for a slower second wave: it goes
   with lz4 throughout.
   What the experiment found is kept beside the link's rate: for :data:`TRIAL_KEPT` seconds
   the next transfers to the site of an image whose samples compress within
   :data:`TRIAL_RATIO_SPAN` of the trial's go with it and do not try again (the losing wave
   costs seconds each time; a link and the load on it seldom change within the hour). A kept
   zstd is watched against that share of the trial's lz4 rate as the trial's own choice is,
   and where no core is spare (3) the transfer tries again instead of giving zstd up for the
   hour.
5. **what the peer's rsync supports**: rsync negotiates the algorithm; a peer that knows
   neither zstd nor lz4 (older than 3.2) fails the start of the transfer, which is then
   re-run once without compression (zlib, the old peers' only choice, is 7 to 13 times slower than
   the link: never).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from migratio.files import directory_locked, finite_number, write_json_atomically

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
#: zstd is kept unless its pieces carried less than this share of lz4's file bytes per second:
#: its trial pieces share the CPU with lz4's and look slower than a transfer in zstd turns
#: out (measured: 0.76-1.11 of lz4's rate in trials where zstd alone was 1.05-1.32 times
#: faster than lz4 alone), and every byte it saves is one less on the sites' shared link
ZSTD_MARGIN = 0.8
#: the experiment of PieceCompression only for a transfer of at least this many pieces per stream
MIN_WAVES = 3
#: seconds an experiment's outcome is followed without trying again
TRIAL_KEPT = 3600.0
#: ... and only for an image whose samples compress within this of the trial's image's
TRIAL_RATIO_SPAN = 0.1


@dataclass(frozen=True)
class Choice:
    """The algorithm rsync uses (``none``: no ``-z``), and why."""

    algorithm: str
    reason: str
    #: chosen without knowing the link: a transfer in pieces may change it (PieceCompression)
    provisional: bool = False
    #: the samples' ratio (``auto`` only), and the kept outcome of a trial it follows
    ratio: float | None = None
    kept: Trial | None = None

    @property
    def compresses(self) -> bool:
        return self.algorithm != "none"


@dataclass(frozen=True)
class Trial:
    """What :class:`PieceCompression`'s experiment found: the algorithm its rule chose, the file
    bytes per second of each one's pieces (zstd's: its last wave, if it fell back to lz4),
    when it decided, and how well the image's samples compressed."""

    algorithm: str
    lz4: float
    zstd: float
    at: float
    ratio: float
    #: the streams its pieces shared the link with (a piece's rate falls as they grow)
    streams: int = 1

    def why(self, now: float) -> str:
        minutes = max(0, round((now - self.at) / 60))
        return (
            f"{self.algorithm} won the trial {minutes} min ago "
            f"(lz4 {self.lz4 / 1e6:.0f}, zstd {self.zstd / 1e6:.0f} MB/s of file per piece)"
        )


def sample_ratio(path: Path) -> float:
    """Compressed / original size of samples spread over ``path`` (zlib level 1).

    The samples are compressed on two threads (zlib lets go of the GIL): ~60 rather than
    ~120 ms here, which a migration waits for before its first byte.
    """
    size = path.stat().st_size
    if size == 0:
        return 1.0
    step = max(size // SAMPLES, SAMPLE_SIZE)
    with path.open("rb") as stream:
        fd = stream.fileno()

        def sample(offset: int) -> tuple[int, int]:
            data = os.pread(fd, SAMPLE_SIZE, offset)
            return len(data), len(zlib.compress(data, 1)) if data else 0

        with ThreadPoolExecutor(min(2, os.cpu_count() or 1), "sample") as pool:
            sizes = list(pool.map(sample, range(0, size, step)))
    original = sum(n for n, _ in sizes)
    compressed = sum(c for _, c in sizes)
    return compressed / original if original else 1.0


def choose(
    setting: str,
    path: Path,
    link_rate: float | None,
    rtt: float | None = None,
    idle_cores: float | None = None,
    ratio: float | None = None,
    trial: Trial | None = None,
) -> Choice:
    """The algorithm for sending ``path``: ``setting`` unless it is ``auto``.

    ``ratio``: :func:`sample_ratio` of ``path`` when it was measured already; ``trial``: the
    outcome of the last experiment over this link (:meth:`LinkHistory.trial`).
    """
    choice = _choose(setting, path, link_rate, rtt, ratio, trial)
    slow = link_rate is not None and link_rate < SLOW_LINK
    if setting == "auto" and choice.algorithm == "zstd" and not slow:
        idle = spare_cores() if idle_cores is None else idle_cores
        if idle < 1:
            # a kept zstd is tried again rather than given up for the hour: the load average
            # is a minute old, and may be the last job's
            return Choice(
                "lz4",
                f"{choice.reason}, but no core to spare ({idle:.1f} idle)",
                provisional=choice.provisional or choice.kept is not None,
                ratio=choice.ratio,
            )
    return choice


def spare_cores() -> float:
    """Cores the 1-minute load average leaves idle."""
    return (os.cpu_count() or 1) - os.getloadavg()[0]


def _choose(
    setting: str,
    path: Path,
    link_rate: float | None,
    rtt: float | None,
    ratio: float | None,
    trial: Trial | None,
) -> Choice:
    """:func:`choose` before asking whether there is a core to spare for zstd."""
    if setting != "auto":
        return Choice(setting, f"COMPRESS={setting}")
    if ratio is None:
        ratio = sample_ratio(path)
    if ratio > INCOMPRESSIBLE:
        return Choice("none", f"auto: samples compress only to {ratio:.2f}")
    why = f"auto: samples compress to {ratio:.2f}"
    if link_rate is not None:
        why += f", link reached {link_rate / 1e6:.0f} MB/s"
        if link_rate >= LZ4_BELOW:
            return Choice("none", f"{why}, faster than compression", ratio=ratio)
        return Choice("zstd" if link_rate < ZSTD_BELOW else "lz4", why, ratio=ratio)
    return _over_an_unknown_link(why, ratio, rtt, trial)


def _over_an_unknown_link(why: str, ratio: float, rtt: float | None, trial: Trial | None) -> Choice:
    """The last experiment's outcome (for an image that compresses about as well), else a
    guess from the round trip (provisional)."""
    if trial is not None and abs(trial.ratio - ratio) <= TRIAL_RATIO_SPAN:
        return Choice(trial.algorithm, f"{why}, {trial.why(time.time())}", ratio=ratio, kept=trial)
    if rtt is not None and rtt >= WAN_RTT:
        return Choice(
            "zstd", f"{why}, round trip {rtt * 1000:.0f} ms", provisional=True, ratio=ratio
        )
    return Choice("lz4", f"{why}, link rate not known yet", provisional=True, ratio=ratio)


class PieceCompression:
    """The algorithm for each piece of a transfer in pieces (:mod:`migratio.openstack.streams`).

    A provisional ``auto`` choice (the link's rate not known) is settled by experiment: the
    pieces are taken in order, so pieces ``0 .. streams-1`` (the first wave, which run at
    once) go with lz4 and the next ``streams`` with zstd; once both waves are in, the rest
    goes with zstd if its pieces carried at least :data:`ZSTD_MARGIN` of lz4's file bytes
    per second (mean over the wave), else with lz4. A piece that starts before the second
    wave is in takes the one ahead so far (lz4 until zstd's first pieces are in). Once zstd
    is chosen, its later pieces are watched: should a wave of them (the last ``streams``)
    carry less of the file per second than that share of lz4's trial rate (the load
    changed), lz4 for the rest, for good. With fewer than
    :data:`MIN_WAVES` pieces per stream there is no experiment: lz4 throughout (cheap, and a
    slower zstd wave would cost more than the few pieces left could win back). A peer that
    cannot compress (an rsync older than 3.2) turns it off for the rest; one that did lz4 but
    not zstd keeps lz4.
    """

    def __init__(self, choice: Choice, streams: int, pieces: int, piece_size: int = 0) -> None:
        self.choice = choice
        self.streams = max(1, min(streams, pieces))
        unknown = choice.provisional and choice.compresses
        self.algorithm = "lz4" if unknown else choice.algorithm
        #: whether the first two waves try lz4 against zstd
        self.trial = unknown and pieces >= MIN_WAVES * self.streams
        self.used: list[str] = []
        #: file bytes per second of each trial piece, by the algorithm it went with
        self._rates: dict[str, list[float]] = {"lz4": [], "zstd": []}
        #: what to keep of the trial (lz4's and zstd's rates), and when it decided
        self._trial_rates: tuple[float, float] | None = None
        self._trial_at = 0.0
        self._asked: dict[int, str] = {}
        self._decided = not self.trial
        self._tried = False
        #: file bytes per second of zstd's pieces after the trial chose it (all full pieces)
        self._after: list[float] = []
        self._reverted = False
        #: the size of a whole piece: the file's last, shorter one is not watched
        self._full = piece_size
        self._lock = threading.Lock()
        #: a zstd that an earlier transfer's trial chose: watched against that trial's lz4
        self._kept = choice.kept if self.algorithm == "zstd" and choice.kept else None
        if self._kept is not None:
            # per piece, as if that trial's link had been shared by as many streams as now
            self._tried = True
            self._rates["lz4"] = [self._kept.lz4 * self._kept.streams / self.streams]

    def plan(self) -> str:
        """What this transfer will do, for the log before it starts."""
        if self.trial:
            return (
                f"lz4 for the first {self.streams} pieces, zstd for the next, then zstd unless "
                f"its pieces carried under {ZSTD_MARGIN:.2f} of lz4's rate"
            )
        return self.algorithm

    def for_piece(self, k: int) -> str:
        """The algorithm to send piece ``k`` with (pieces are started in order)."""
        with self._lock:
            if self._decided:
                algorithm = self.algorithm
            elif k < self.streams:
                algorithm = "lz4"
            elif k < 2 * self.streams:
                algorithm = "zstd"
            else:
                algorithm = "zstd" if self._zstd_ahead() else "lz4"
            self._asked[k] = algorithm
            return algorithm

    def sent(self, k: int, algorithm: str, size: int, seconds: float) -> None:
        """Piece ``k`` of ``size`` bytes went with ``algorithm`` (what rsync really used)."""
        with self._lock:
            asked = self._asked.get(k, algorithm)
            if algorithm not in self.used:
                self.used.append(algorithm)
            if algorithm == "none" and asked != "none":
                # the peer refused: if lz4 went through (in this transfer, or in the kept
                # trial's with this peer), lz4 is known to work
                lz4_works = "lz4" in self.used or self._kept is not None
                keep = "lz4" if asked == "zstd" and lz4_works else "none"
                if not self._decided or self.algorithm != keep:
                    log.info("compression %s from now on (the peer cannot do %s)", keep, asked)
                self.algorithm, self._decided = keep, True
                return
            if algorithm != asked:
                return
            rate = size / max(seconds, 1e-3)
            if self._decided or k >= 2 * self.streams:
                self._watch(algorithm, size, rate)
                return
            self._rates[algorithm].append(rate)
            self._full = max(self._full, size)
            if min(len(rates) for rates in self._rates.values()) < self.streams:
                return
            self._decided = self._tried = True
            self.algorithm = "zstd" if self._zstd_ahead() else "lz4"
            self._trial_rates = (_mean(self._rates["lz4"]), _mean(self._rates["zstd"]))
            self._trial_at = time.time()
            log.info(
                "compression: lz4 reached %.0f MB/s of file per piece, zstd %.0f MB/s: "
                "%s from now on",
                _mean(self._rates["lz4"]) / 1e6, _mean(self._rates["zstd"]) / 1e6, self.algorithm,
            )  # fmt: skip

    def _watch(self, algorithm: str, size: int, rate: float) -> None:
        """After the trial chose zstd: back to lz4 if a wave of zstd falls under the margin's
        share of lz4's trial rate."""
        if not self._tried or self._reverted or self.algorithm != "zstd" or algorithm != "zstd":
            return
        if size < self._full:  # the file's last piece: its start weighs more
            return
        self._after.append(rate)
        recent = self._after[-self.streams :]
        if len(recent) < self.streams or _mean(recent) >= ZSTD_MARGIN * _mean(self._rates["lz4"]):
            return
        self.algorithm, self._reverted = "lz4", True
        self._trial_rates = (_mean(self._rates["lz4"]), _mean(recent))  # what is kept: lz4
        self._trial_at = time.time()
        log.info(
            "compression: zstd's last %d pieces reached %.0f MB/s of file per piece, under "
            "%.0f %% of lz4's %.0f MB/s: lz4 from now on",
            len(recent), _mean(recent) / 1e6, ZSTD_MARGIN * 100, _mean(self._rates["lz4"]) / 1e6,
        )  # fmt: skip

    def _zstd_ahead(self) -> bool:
        """Whether zstd's pieces so far carried at least the margin's share of lz4's rate
        (under the lock)."""
        lz4, zstd = self._rates["lz4"], self._rates["zstd"]
        return bool(lz4 and zstd) and _mean(zstd) >= ZSTD_MARGIN * _mean(lz4)

    def outcome(self) -> Trial | None:
        """What the experiment found (with a fall back to lz4 after it), if it was made."""
        with self._lock:
            if self._trial_rates is None or self.choice.ratio is None:
                return None
            lz4, zstd = self._trial_rates
            return Trial(self.algorithm, lz4, zstd, self._trial_at, self.choice.ratio, self.streams)

    def summary(self) -> str:
        """What the transfer used: ``lz4``, ``lz4, then zstd``, ``lz4, zstd tried, back to lz4``,
        ``lz4, then zstd, back to lz4``; after a kept zstd, ``zstd`` or ``zstd, back to lz4``."""
        if self._reverted:
            return "zstd, back to lz4" if self._kept else "lz4, then zstd, back to lz4"
        if self._tried and self.algorithm == "lz4":
            return "lz4, zstd tried, back to lz4"
        return ", then ".join(self.used) or self.algorithm


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class LinkHistory:
    """What the transfers to each site found out, kept across jobs and restarts
    (``.link-<site>.json``): the wire rate the last uncompressed one reached, and the outcome
    of the last experiment of :class:`PieceCompression`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, site_id: str) -> Path:
        return self.directory / f".link-{site_id}.json"

    def _read(self, site_id: str) -> dict[str, object]:
        """What is kept for the site; ``{}`` for a file that is missing or not ours."""
        try:
            kept = json.loads(self._path(site_id).read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return kept if isinstance(kept, dict) else {}

    def _write(self, site_id: str, **facts: object) -> None:
        """Add ``facts`` to what is kept (two jobs to one site each keep theirs)."""
        try:
            with directory_locked(self.directory):
                kept = self._read(site_id)
                kept.update(facts)
                write_json_atomically(self._path(site_id), kept)
        except OSError as exc:
            log.warning("cannot remember the link to %s: %s", site_id, exc)

    def known(self, site_id: str) -> tuple[float | None, Trial | None]:
        """:meth:`rate` and :meth:`trial`, from one read of the file."""
        kept = self._read(site_id)
        return _rate_in(kept), _trial_in(kept, time.time())

    def rate(self, site_id: str) -> float | None:
        """Bytes per second on the wire last time, or None when unknown."""
        return _rate_in(self._read(site_id))

    def trial(self, site_id: str, now: float | None = None) -> Trial | None:
        """The last experiment's outcome, if it is less than :data:`TRIAL_KEPT` seconds old."""
        return _trial_in(self._read(site_id), time.time() if now is None else now)

    def record(
        self, site_id: str, wire_bytes: int, seconds: float, *, capped: bool, compressed: bool
    ) -> None:
        """Remember a transfer's wire rate (not one compressed, held back, or too short)."""
        if compressed or capped or seconds < 1.0 or wire_bytes < (8 << 20):
            return
        self._write(site_id, bytes_per_s=wire_bytes / seconds, at=time.time())

    def record_trial(self, site_id: str, trial: Trial) -> None:
        """Remember what an experiment found (:meth:`PieceCompression.outcome`)."""
        self._write(site_id, trial=dataclasses.asdict(trial))


def _rate_in(kept: dict[str, object]) -> float | None:
    value = finite_number(kept.get("bytes_per_s"))
    return value if value is not None and value > 0 else None


def _trial_in(kept: dict[str, object], now: float) -> Trial | None:
    trial = kept.get("trial")
    if not isinstance(trial, dict) or trial.get("algorithm") not in ("lz4", "zstd"):
        return None
    numbers = [finite_number(trial.get(k)) for k in ("lz4", "zstd", "at", "ratio", "streams")]
    values = [n for n in numbers if n is not None and n >= 0]
    if len(values) < len(numbers):
        return None
    lz4, zstd, at, ratio, streams = values
    if not 1 <= streams <= 64 or not 0 <= now - at < TRIAL_KEPT:
        return None
    return Trial(str(trial["algorithm"]), lz4, zstd, at, ratio, int(streams))
