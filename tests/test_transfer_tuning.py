"""COMPRESS and BWLIMIT: what crosses the link to the destination host, and how fast."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.sandbox.images import make_os_like_qcow2, make_qcow2, sha256_file
from tests.sandbox.site import Sandbox
from tests.support import Lines, processes_of, settings_for

from migratio.adapters import rsync
from migratio.adapters.glance_api import GlanceApi
from migratio.adapters.ssh import SshMaster
from migratio.config import ConfigError, OpenStackSite, load_site
from migratio.errors import Cancelled, RemoteError
from migratio.hashing import Digests, file_digests
from migratio.openstack import streams
from migratio.openstack.bandwidth import ThrottledReader
from migratio.openstack.compression import (
    TRIAL_KEPT,
    ZSTD_MARGIN,
    Choice,
    LinkHistory,
    PieceCompression,
    Trial,
    choose,
    sample_ratio,
)
from migratio.openstack.copies import Owners
from migratio.openstack.migration import migrate_to_openstack
from migratio.openstack.streams import layout, measure_rtt, piece_size, stream_count
from migratio.request import MigrationRequest, Outcome

MiB = 1 << 20


def site_b_with(sandbox: Sandbox, *lines: str) -> str:
    return (sandbox.sites_dir / "site-b.conf").read_text() + "".join(f"{x}\n" for x in lines)


def migrate(
    sb: Sandbox, tmp_path: Path, image: Path, *site_lines: str
) -> tuple[int, list[str], str]:
    """Migrate ``image`` to site-b with extra site-file lines: (bytes sent, decisions, copy)."""
    image_id = sb.source.upload_image(image, name="tuning", disk_format="qcow2")
    settings = settings_for(sb, tmp_path, **{"site-t": site_b_with(sb, *site_lines)})
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("migratio.openstack.migration")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-t"), Lines())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert result.outcome is Outcome.MIGRATED
    download = tmp_path / "arrived"
    sb.destination.download_to(result.destination_image_id, download)
    decisions = [r for r in records if r.startswith("compression ")]
    return result.bytes_sent, decisions, sha256_file(download)


@pytest.fixture(scope="module")
def os_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "os-like.qcow2"
    return make_os_like_qcow2(path, virtual_size=256 * MiB, data_bytes=24 * MiB)


@pytest.mark.parametrize("setting", ["auto", "zstd", "lz4", "none"])
def test_each_compress_setting_delivers_the_same_bytes(
    clean_sandbox: Sandbox, tmp_path: Path, os_like: Path, setting: str
) -> None:
    sent, decisions, arrived = migrate(clean_sandbox, tmp_path, os_like, f"COMPRESS={setting}")

    assert arrived == sha256_file(os_like)
    size = os_like.stat().st_size
    [decision] = decisions
    if setting == "none":
        assert decision == "compression none (COMPRESS=none)"
        assert sent >= size
    else:
        # auto: the samples compress well, and the link is not known yet (a fresh staging dir)
        algorithm = "lz4" if setting == "auto" else setting
        assert decision.startswith(f"compression {algorithm} ("), decision
        assert sent < 0.75 * size, (sent, size)
    if setting == "zstd":  # at level 1 (rsync.ZSTD_LEVEL): nearer the zstd tool's -1 than its -3
        level1, level3 = zstd_size(os_like, 1), zstd_size(os_like, 3)
        assert abs(sent - level1) < abs(sent - level3), (sent, level1, level3)


def test_auto_does_not_compress_random_data(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=128 * MiB, data_bytes=24 * MiB)

    sent, decisions, arrived = migrate(clean_sandbox, tmp_path, image)

    assert arrived == sha256_file(image)
    [decision] = decisions
    assert decision.startswith("compression none (auto: samples compress only to 0.9"), decision
    assert sent >= image.stat().st_size


def test_auto_chooses_by_the_link_rate_it_reached(tmp_path: Path, os_like: Path) -> None:
    history = LinkHistory(tmp_path)
    assert history.rate("site-x") is None
    assert choose("auto", os_like, None, idle_cores=2).algorithm == "lz4"
    history.record("site-x", 400 * MiB, 10.0, capped=False, compressed=False)  # 42 MB/s: a WAN
    assert choose("auto", os_like, history.rate("site-x"), idle_cores=2).algorithm == "zstd"
    # ... also on a machine without a core to spare: a fraction of one fills so slow a link
    assert choose("auto", os_like, history.rate("site-x"), idle_cores=0.3).algorithm == "zstd"
    history.record("site-x", 1000 * MiB, 10.0, capped=False, compressed=False)  # 105 MB/s
    assert choose("auto", os_like, history.rate("site-x"), idle_cores=2).algorithm == "zstd"
    # ... but a faster one would make the transfer CPU-bound there
    busy = choose("auto", os_like, history.rate("site-x"), idle_cores=0.3)
    assert busy.algorithm == "lz4" and "no core to spare" in busy.reason
    history.record("site-x", 4000 * MiB, 5.0, capped=False, compressed=False)  # a LAN
    assert choose("auto", os_like, history.rate("site-x")).algorithm == "none"
    history.record("site-x", 40 * MiB, 10.0, capped=True, compressed=False)  # BWLIMIT: ignored
    history.record("site-x", 40 * MiB, 10.0, capped=False, compressed=True)  # the compressor's
    assert history.rate("site-x") == pytest.approx(4000 * MiB / 5.0)
    assert choose("zstd", tmp_path / "not-read", 1e12).algorithm == "zstd"


def test_compress_and_bwlimit_are_checked_at_start_up(tmp_path: Path) -> None:
    conf = tmp_path / "s.conf"
    base = "EXTERNAL_USER=u\nEXTERNAL_HOST=h\n"
    conf.write_text(base + "COMPRESS=zlib\n")
    with pytest.raises(ConfigError, match="COMPRESS must be auto, zstd, lz4 or none"):
        load_site("s", conf)
    conf.write_text(base + "BWLIMIT=fast\n")
    with pytest.raises(ConfigError, match="BWLIMIT 'fast' is not a rate"):
        load_site("s", conf)
    conf.write_text(base + "BWLIMIT=400Mbit\nCOMPRESS=ZSTD\n")
    site = load_site("s", conf)
    assert isinstance(site, OpenStackSite)
    assert (site.bwlimit, site.compress) == (50_000_000, "zstd")
    conf.write_text(base + "BWLIMIT=51200\n")  # rsync's unit: KiB/s
    assert load_site("s", conf).bwlimit == 50 * MiB  # type: ignore[union-attr]


def _rate(stamps: list[tuple[float, int]]) -> float:
    """Bytes per second between the times 10 % and 90 % of the bytes had passed."""
    total = stamps[-1][1] - stamps[0][1]
    t0, b0 = next((t, b) for t, b in stamps if b - stamps[0][1] >= 0.1 * total)
    t1, b1 = next((t, b) for t, b in stamps if b - stamps[0][1] >= 0.9 * total)
    return (b1 - b0) / (t1 - t0)


class WireMeter:
    """Samples the bytes sent to the destination host (its veth), or the tool's own progress.

    On the two-host sandbox the bytes on the wire are counted (the rate between 10 % and
    90 % of them); on loopback (shared with every other process) the sender's progress
    reports stand in for them: their slope, leaving out the first and those printed in the
    final flush (the buffers filling and draining).
    """

    def __init__(self, sb: Sandbox) -> None:
        self.network = sb.network
        self.stamps: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        assert self.network is not None
        while not self._stop.is_set():
            self.stamps.append((time.monotonic(), self.network.tx_bytes()))
            time.sleep(0.05)

    def progress(self, done: int) -> None:
        if self.network is None:
            self.stamps.append((time.monotonic(), done))

    def __enter__(self) -> WireMeter:
        if self.network is not None:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.network is not None:
            self._stop.set()
            self._thread.join()

    def rate(self) -> float:
        if self.network is None:
            end = self.stamps[-1][0]
            steady = [(t, b) for t, b in self.stamps[1:] if end - t > 0.1]
            (t0, b0), (t1, b1) = steady[0], steady[-1]
            return (b1 - b0) / (t1 - t0)
        return _rate(self.stamps)


CAP = 4 * MiB


def test_bwlimit_caps_rsync(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=64 * MiB, data_bytes=20 * MiB)
    settings = settings_for(sb, tmp_path)
    site = settings.site("site-b")
    assert isinstance(site, OpenStackSite) and site.ssh is not None
    sb.ssh.run_as_user("mkdir -p .migratio-staging", check=True)

    with WireMeter(sb) as meter:
        begin = time.monotonic()
        result = rsync.push(
            image,
            site.ssh,
            ".migratio-staging/capped",
            sparse=False,
            timeout=120,
            on_progress=meter.progress,
            bwlimit=CAP,
        )
    assert result.bytes_sent >= image.stat().st_size
    assert time.monotonic() - begin > 4

    assert 0.9 * CAP <= meter.rate() <= 1.1 * CAP, meter.rate() / CAP


def test_bwlimit_caps_the_streams_together(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    """BWLIMIT over several streams at 20 ms: each stream's rsync gets its share, raised by
    what its earlier pieces' starts (a few round trips each) cost, so that together they
    average the cap (with the bare share: 0.94 of it here)."""
    sb = clean_sandbox
    if sb.network is None:
        pytest.skip("needs the two-host sandbox (a round trip)")
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=128 * MiB, data_bytes=96 * MiB)
    settings = settings_for(sb, tmp_path)
    site = settings.site("site-b")
    assert isinstance(site, OpenStackSite) and site.ssh is not None
    size, piece, cap = image.stat().st_size, 8 * MiB, 3 * CAP
    (tmp_path / "work").mkdir()
    sb.shape(1000, 20)
    try:
        with WireMeter(sb) as meter:
            result = streams.push_ranges(
                image,
                site.ssh,
                ".migratio-staging/capped",
                streams=3,
                piece=piece,
                workdir=tmp_path / "work",
                timeout=120,
                cancel=threading.Event(),
                on_progress=meter.progress,
                compress=PieceCompression(Choice("none", "COMPRESS=none"), 3, -(-size // piece)),
                bwlimit=cap,
                make_dir=".migratio-staging",
            )
    finally:
        sb.shape()
    assert result.bytes_sent >= size
    assert 0.95 * cap <= meter.rate() <= 1.05 * cap, meter.rate() / cap


def _stat(pid: int) -> list[str]:
    """``/proc/PID/stat`` from its state on (index 1: parent pid, index 16: nice)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def test_the_bulk_copy_runs_at_a_lower_priority_at_both_ends(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """rsync, the ssh master that encrypts its bytes here and the sshd that decrypts them
    there: all at nice 10, so that the upload into Glance they feed comes first; and where the
    kernel shares the CPU between sessions first (autogroups), the sessions of rsync there and
    of the ssh master here too (an sshd's cannot be changed by the user)."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=64 * MiB, data_bytes=12 * MiB)
    settings = settings_for(sb, tmp_path)
    site = settings.site("site-b")
    assert isinstance(site, OpenStackSite) and site.ssh is not None
    seen: dict[str, int] = {}
    groups: dict[str, int | None] = {}

    with SshMaster(site.ssh) as master:
        assert master.wait()
        sending = threading.Thread(
            target=rsync.push,
            args=(image, master.target, ".migratio-staging/niced"),
            kwargs={
                "sparse": False,
                "timeout": 120,
                "bwlimit": CAP,
                "make_dir": ".migratio-staging",
            },
        )
        sending.start()
        try:
            deadline = time.monotonic() + 30
            autogroups = Path("/proc/self/autogroup").exists()  # (set a moment after the start)
            while ("sshd" not in seen or (autogroups and groups.get("rsync") != 10)) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.1)
                for pid in processes_of(sb.ssh.user, "--server", "rsync"):
                    with contextlib.suppress(OSError, IndexError):
                        seen["rsync"] = int(_stat(pid)[16])
                        groups["rsync"] = autogroup_nice(pid)
                        up = int(_stat(pid)[1])
                        for _ in range(3):  # the remote shell, then its sshd
                            if Path(f"/proc/{up}/comm").read_text().startswith("sshd"):
                                seen["sshd"] = int(_stat(up)[16])
                                break
                            up = int(_stat(up)[1])
            assert master._child is not None
            seen["ssh master"] = int(_stat(master._child.popen.pid)[16])
            groups["ssh master"] = autogroup_nice(master._child.popen.pid)
        finally:
            sending.join()
    assert seen == {"rsync": 10, "sshd": 10, "ssh master": 10}
    if autogroups:  # this kernel has them (it does here)
        assert groups == {"rsync": 10, "ssh master": 10}


def autogroup_nice(pid: int) -> int | None:
    """The nice value of the autogroup (its session's share of the CPU) of ``pid``."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.parametrize("streams", ["1", "2"])
def test_the_upload_helper_is_not_niced_with_the_copy(
    clean_sandbox: Sandbox, tmp_path: Path, streams: str
) -> None:
    """The helper feeds the upload into Glance, which the niced copy makes way for: it runs at
    nice 0 (it inherited nice 10 from the master connection's sshd, reniced by the rsync of
    the first stream, and fed Glance at half the rate the bytes arrived), while the copy's
    rsync there runs at nice 10."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=96 * MiB, data_bytes=40 * MiB)
    seen: dict[str, set[int]] = {"helper": set(), "rsync": set()}
    groups: dict[str, set[int | None]] = {"helper": set(), "rsync": set()}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for kind, needle, program in (
                ("helper", "--http-fields=", "python"),
                ("rsync", "--server", "rsync"),
            ):
                for pid in processes_of(sb.ssh.user, needle, program):
                    with contextlib.suppress(OSError, IndexError):
                        seen[kind].add(int(_stat(pid)[16]))
                        groups[kind].add(autogroup_nice(pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        sent, _, _ = migrate(sb, tmp_path, image, "BWLIMIT=10M", f"STREAMS={streams}")
    finally:
        done.set()
        watcher.join()
    assert sent > 30 * MiB
    assert seen == {"helper": {0}, "rsync": {10}}
    if Path("/proc/self/autogroup").exists():
        # the session's nice value is set beside rsync, a moment after it starts
        assert groups["helper"] == {0} and 10 in groups["rsync"], groups


@pytest.mark.parametrize("way", ["hashed", "staged"])
def test_bwlimit_caps_the_api_upload(clean_sandbox: Sandbox, tmp_path: Path, way: str) -> None:
    """Either API upload: a stream hashed on the way, or a staged file sent as it is."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=64 * MiB, data_bytes=16 * MiB)
    settings = settings_for(sb, tmp_path)
    site = settings.site("site-b-api")
    assert isinstance(site, OpenStackSite) and site.api is not None
    api = GlanceApi(site.api)
    copy = api.create({"name": "capped", "disk_format": "qcow2", "container_format": "bare"})
    digests = file_digests(image, ("md5",))
    expected = Digests(size=image.stat().st_size, md5=digests["md5"])

    with WireMeter(sb) as meter, image.open("rb") as stream:
        if way == "hashed":
            api.upload(copy.id, ThrottledReader(stream, CAP), expected, meter.progress)
        else:
            api.upload_file(copy.id, image, expected, meter.progress, bwlimit=CAP)

    assert sb.destination.image(copy.id)["status"] == "active"
    assert 0.9 * CAP <= meter.rate() <= 1.1 * CAP, meter.rate() / CAP


def test_a_migration_starts_without_importing_glanceclient() -> None:
    """``migratio migrate`` imports the migration before its first byte moves, and reading
    the source's record needs no glanceclient (~0.05 s of imports): it is imported on first
    use. (oslo_utils.strutils, ~0.1 s, is still imported, by the image inspection.)"""
    code = "import sys, migratio.cli, migratio.migration; print('glanceclient' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_stream_count_follows_the_round_trip() -> None:
    big = 4 << 30
    assert stream_count(None, 0.0002, big) == 1  # a LAN: one stream is as fast as the cipher
    assert stream_count(None, None, big) == 1  # not measurable: as before
    assert stream_count(None, 0.020, big) == 3
    assert stream_count(None, 0.040, big) == 5
    assert stream_count(None, 0.500, big) == 8
    assert stream_count(4, 0.0001, big) == 4  # STREAMS=4 forces it...
    assert stream_count(4, 0.040, 20 * MiB) == 2  # ...but no range under 8 MiB


def test_the_round_trip_is_the_kernels_not_the_gils(clean_sandbox: Sandbox) -> None:
    """``STREAMS=auto`` and ``COMPRESS=auto`` read the round trip from a TCP connect made in
    a thread beside the migration's others. Timed by the clock, it also held however long
    that thread then waited for the GIL: up to 25 ms on this machine with three busy threads,
    which made the loopback look like a WAN (zstd and several streams on a LAN)."""
    sb = clean_sandbox
    busy = threading.Event()

    def hog() -> None:
        while not busy.is_set():
            sum(range(10_000))

    hogs = [threading.Thread(target=hog) for _ in range(3)]
    for thread in hogs:
        thread.start()
    try:
        lan = [measure_rtt(sb.ssh.address, sb.ssh.port) for _ in range(20)]
        wan = None
        if sb.network is not None:
            sb.shape(None, 20)
            try:
                wan = measure_rtt(sb.ssh.address, sb.ssh.port)
            finally:
                sb.shape()
    finally:
        busy.set()
        for thread in hogs:
            thread.join()
    assert all(rtt is not None and rtt < 0.004 for rtt in lan), lan  # compression.WAN_RTT
    if wan is not None:
        assert 0.019 <= wan <= 0.030, wan


def test_a_rerun_keeps_the_layout_an_interrupted_attempt_left() -> None:
    """STREAMS=auto measured the round trip on either side of 4 ms in two attempts (a busy
    host): the layout that holds more of the file wins, so the re-run resumes it."""
    big, name = 400 * MiB, "x-0123456789ab.qcow2.part"
    pieces = {f"{name}.0": 32 * MiB, f"{name}.1": 32 * MiB, f"{name}.2": 5 * MiB}
    assert layout(None, 0.0002, big, {}, name) == (1, None)  # a LAN, nothing there: one file
    assert layout(None, 0.0002, big, pieces, name) == (2, 32 * MiB)  # pieces there: pieces
    assert layout(None, 0.020, big, {name: 90 * MiB}, name) == (1, None)  # one file there
    assert layout(None, 0.020, big, {name: 1 * MiB, **pieces}, name) == (3, 32 * MiB)
    assert layout(None, 0.020, big, {"other.part.0": 99 * MiB}, name) == (3, 32 * MiB)
    assert layout(1, 0.0002, big, pieces, name) == (1, None)  # STREAMS=1 is the operator's
    assert layout(None, 0.0002, 20 * MiB, pieces, name) == (1, None)  # one piece: one file


def test_several_streams_deliver_the_image_and_resume(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=512 * MiB, data_bytes=200 * MiB)
    image_id = sb.source.upload_image(image, name="streams", disk_format="qcow2")
    settings = settings_for(sb, tmp_path, **{"site-s": site_b_with(sb, "STREAMS=3", "BWLIMIT=60M")})
    staging = sb.ssh.home / ".migratio-staging"
    cancel = threading.Event()

    def cancel_midway() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not cancel.is_set():
            pieces = list(staging.glob(f"{image_id}-*.part.*")) if staging.exists() else []
            if len(pieces) >= 3 and sum(p.stat().st_size for p in pieces) > 60 * MiB:
                cancel.set()
            time.sleep(0.02)

    watcher = threading.Thread(target=cancel_midway)
    watcher.start()
    with pytest.raises(Cancelled):
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines(), cancel=cancel)
    watcher.join()
    pieces = sorted(staging.glob(f"{image_id}-*.part.*"), key=lambda p: int(p.suffix[1:]))
    # 32 MiB pieces (7 here), taken in order by the 3 streams: the file arrives front first
    numbers = [int(p.suffix[1:]) for p in pieces]
    assert len(numbers) >= 3 and numbers[0] == 0 and numbers[-1] < len(numbers) + 3, numbers
    assert piece_size(image.stat().st_size) == 32 * MiB
    kept = sum(p.stat().st_size for p in pieces)
    assert 0 < kept < image.stat().st_size
    assert sb.destination.find_by_property("source_uuid", image_id) == []
    assert not list((tmp_path / "staging").glob("*/*")), "local range copies are removed"

    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())

    assert result.outcome is Outcome.MIGRATED
    assert result.bytes_sent < image.stat().st_size - kept // 2  # only what was missing
    arrived = tmp_path / "arrived"
    sb.destination.download_to(result.destination_image_id, arrived)
    assert sha256_file(arrived) == sha256_file(image)
    assert not any(p.exists() for p in pieces)


def test_the_other_streams_log_in_once_the_first_pieces_bytes_move(
    clean_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each extra stream's login (a key exchange: tens of milliseconds of CPU at both ends)
    waits until the first piece, over the migration's own connection, has bytes on their
    way: beside its start they slowed it, and with it the first byte (0.3-0.5 s at 40 ms)."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=256 * MiB, data_bytes=100 * MiB)
    image_id = sb.source.upload_image(image, name="head-start", disk_format="qcow2")
    # 8 MiB/s per stream: the first piece (32 MiB) is still on its way when the others log in
    site = site_b_with(sb, "STREAMS=3", "BWLIMIT=24M")
    settings = settings_for(sb, tmp_path, **{"site-s": site})
    sums: list[streams._Sum] = []
    logins: list[bool] = []  # for each stream's own login: was the first piece on its way?

    class Sum(streams._Sum):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            sums.append(self)

    class Master(SshMaster):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            moving = bool(sums) and all(s.moving.is_set() for s in sums)
            logins.append(moving and all(0 < s.done[0] < 32 * MiB for s in sums))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(streams, "_Sum", Sum)
    monkeypatch.setattr(streams, "SshMaster", Master)
    monkeypatch.setattr(streams, "HEAD_START", 120.0)  # never the reason here
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())

    assert result.outcome is Outcome.MIGRATED
    assert logins == [True, True]  # 4 pieces of 32 MiB, 3 streams: the first on the shared one
    arrived = tmp_path / "arrived"
    sb.destination.download_to(result.destination_image_id, arrived)
    assert sha256_file(arrived) == sha256_file(image)


def test_auto_takes_a_long_round_trip_for_a_wan(tmp_path: Path, os_like: Path) -> None:
    assert choose("auto", os_like, None, 0.0002, idle_cores=2).algorithm == "lz4"
    assert choose("auto", os_like, None, 0.020, idle_cores=2).algorithm == "zstd"
    assert choose("auto", os_like, None, 0.020, idle_cores=0.3).algorithm == "lz4"
    assert choose("auto", os_like, 800e6, 0.020, idle_cores=2).algorithm == "none"


def test_pieces_with_the_wrong_digest_are_removed_and_no_image_is_made(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """The source's file store holds other bytes than its Glance recorded (bit rot, a
    tampered file): the destination's helper refuses the whole, no image is completed there,
    and the pieces go (nothing to resume from wrong bytes)."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "random.qcow2", virtual_size=256 * MiB, data_bytes=96 * MiB)
    image_id = sb.source.upload_image(image, name="rotten", disk_format="qcow2")
    stored = sb.source.images_dir / image_id
    with stored.open("r+b") as f:  # a data cluster in the middle, not the qcow2 header
        f.seek(stored.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    settings = settings_for(sb, tmp_path, **{"site-s": site_b_with(sb, "STREAMS=3")})
    lines = Lines()

    with pytest.raises(RemoteError) as failure:
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), lines)

    assert "md5 of the transferred file is" in str(failure.value)
    assert "md5 of the transferred file is" in lines[-1], lines
    assert sb.destination.find_by_property("source_uuid", image_id) == []
    staging = sb.ssh.home / ".migratio-staging"
    assert not list(staging.glob(f"{image_id}-*")), "wrong pieces left at the destination"


def test_auto_tries_lz4_against_zstd_on_an_unknown_link(
    os_like: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guess = choose("auto", os_like, None, 0.040, idle_cores=2)
    assert guess.provisional  # 40 ms says nothing about the rate: 200 Mbit/s or 1 Gbit/s
    caplog.set_level(logging.INFO, logger="migratio.openstack.compression")

    slow = PieceCompression(guess, streams=2, pieces=8)
    assert [slow.for_piece(k) for k in range(4)] == ["lz4", "lz4", "zstd", "zstd"]  # two waves
    slow.sent(0, "lz4", 32 * MiB, 2.0)
    slow.sent(1, "lz4", 32 * MiB, 2.2)  # 16 MB/s of the file: the link is the limit
    slow.sent(2, "zstd", 32 * MiB, 1.4)  # 24 MB/s: fewer bytes on the wire
    assert slow.for_piece(4) == "zstd"  # started before the second wave is in: zstd is ahead
    slow.sent(3, "zstd", 32 * MiB, 1.5)
    assert [slow.for_piece(k) for k in (5, 6, 7)] == ["zstd"] * 3
    slow.sent(4, "zstd", 32 * MiB, 1.4)
    assert slow.summary() == "lz4, then zstd"
    assert caplog.messages[-1] == (
        "compression: lz4 reached 16 MB/s of file per piece, zstd 23 MB/s: zstd from now on"
    )

    slowed = PieceCompression(guess, streams=2, pieces=10)  # zstd chosen, then the load grew
    two_trial_waves(slowed, lz4_seconds=2.0, zstd_seconds=1.4)
    for k in (4, 5, 6):
        assert slowed.for_piece(k) == "zstd"
    slowed.sent(4, "zstd", 32 * MiB, 3.0)  # 11 MB/s, the wave before it 24: not yet
    slowed.sent(5, "zstd", 16 * MiB, 3.0)  # the file's last piece, shorter: not counted
    assert slowed.for_piece(7) == "zstd"
    slowed.sent(6, "zstd", 32 * MiB, 3.0)  # a whole wave of zstd under lz4's 17 MB/s
    assert [slowed.for_piece(k) for k in (8, 9)] == ["lz4", "lz4"]
    slowed.sent(8, "lz4", 32 * MiB, 2.0)
    assert slowed.summary() == "lz4, then zstd, back to lz4"
    assert caplog.messages[-1] == (
        "compression: zstd's last 2 pieces reached 11 MB/s of file per piece, under "
        "80 % of lz4's 17 MB/s: lz4 from now on"
    )

    fast = PieceCompression(guess, streams=2, pieces=8)
    assert [fast.for_piece(k) for k in range(4)] == ["lz4", "lz4", "zstd", "zstd"]
    fast.sent(0, "lz4", 32 * MiB, 0.5)
    fast.sent(2, "zstd", 32 * MiB, 0.9)  # CPU-bound: zstd makes the transfer slower
    assert fast.for_piece(4) == "lz4"  # zstd behind so far
    fast.sent(1, "lz4", 32 * MiB, 0.5)
    fast.sent(3, "zstd", 32 * MiB, 0.9)
    fast.sent(4, "lz4", 32 * MiB, 0.4)  # not a trial piece: changes nothing
    assert [fast.for_piece(k) for k in (5, 6, 7)] == ["lz4"] * 3
    assert fast.summary() == "lz4, zstd tried, back to lz4"
    assert caplog.messages[-1].endswith("zstd 37 MB/s: lz4 from now on"), caplog.messages

    close = PieceCompression(guess, streams=1, pieces=4)
    close.sent(0, "lz4", 32 * MiB, 1.0)
    close.sent(1, "zstd", 32 * MiB, 1.2)  # 0.83 of lz4's rate: beside lz4, zstd looks slower
    assert close.algorithm == "zstd"
    behind = PieceCompression(guess, streams=1, pieces=4)
    behind.sent(0, "lz4", 32 * MiB, 1.0)
    behind.sent(1, "zstd", 32 * MiB, 1.3)  # 0.77: slower than that explains
    assert behind.algorithm == "lz4"

    # the watch after zstd was chosen: the same share of lz4's trial rate (17 MB/s)
    for zstd_seconds, after in ((2.3, "zstd"), (2.7, "lz4")):  # 0.87 and 0.74 of lz4's rate
        watched = PieceCompression(guess, streams=2, pieces=10, piece_size=32 * MiB)
        two_trial_waves(watched, lz4_seconds=2.0, zstd_seconds=1.4)
        for k in (4, 5):
            assert watched.for_piece(k) == "zstd"
            watched.sent(k, "zstd", 32 * MiB, zstd_seconds)
        assert watched.for_piece(6) == after, zstd_seconds

    few = PieceCompression(guess, streams=2, pieces=5)  # under three waves: nothing to win
    assert [few.for_piece(k) for k in range(5)] == ["lz4"] * 5
    assert few.plan() == "lz4"

    old_peer = PieceCompression(guess, streams=2, pieces=8)
    old_peer.for_piece(0)
    old_peer.sent(0, "none", 32 * MiB, 1.0)  # rsync there cannot compress
    assert [old_peer.for_piece(k) for k in (2, 3)] == ["none", "none"]
    lz4_peer = PieceCompression(guess, streams=1, pieces=4)
    assert lz4_peer.for_piece(0) == "lz4"
    lz4_peer.sent(0, "lz4", 32 * MiB, 1.0)
    assert lz4_peer.for_piece(1) == "zstd"
    lz4_peer.sent(1, "none", 32 * MiB, 1.0)  # an rsync built without zstd
    assert lz4_peer.for_piece(2) == "lz4"

    known = PieceCompression(choose("auto", os_like, 20e6, 0.040, idle_cores=0.3), 2, pieces=8)
    assert [known.for_piece(k) for k in range(4)] == ["zstd"] * 4  # known slow: no experiment
    assert known.plan() == "zstd"


def two_trial_waves(pieces: PieceCompression, lz4_seconds: float, zstd_seconds: float) -> None:
    """Pieces 0-3 of a 2-stream trial: two of 32 MiB with lz4, two with zstd, each this long."""
    for k, algorithm, seconds in [
        (0, "lz4", lz4_seconds),
        (1, "lz4", lz4_seconds),
        (2, "zstd", zstd_seconds),
        (3, "zstd", zstd_seconds),
    ]:
        assert pieces.for_piece(k) == algorithm
        pieces.sent(k, algorithm, 32 * MiB, seconds)


def test_what_the_trial_found_is_followed_for_an_hour(tmp_path: Path, os_like: Path) -> None:
    """The next transfers to the site skip the experiment (its losing wave costs seconds)."""
    history = LinkHistory(tmp_path)
    guess = choose("auto", os_like, None, 0.020, idle_cores=2, trial=history.trial("site-x"))
    assert guess.provisional
    fast = PieceCompression(guess, streams=2, pieces=8)
    assert fast.outcome() is None  # nothing tried yet
    two_trial_waves(fast, lz4_seconds=0.5, zstd_seconds=0.9)
    found = fast.outcome()
    assert found is not None and found.algorithm == "lz4"
    history.record_trial("site-x", found)
    history.record("site-y", 400 * MiB, 10.0, capped=False, compressed=False)

    kept = history.trial("site-x")
    assert kept == found
    again = choose("auto", os_like, None, 0.020, idle_cores=2, trial=kept)
    assert not again.provisional and again.algorithm == "lz4"
    assert again.reason.endswith(
        ", lz4 won the trial 0 min ago (lz4 67, zstd 37 MB/s of file per piece)"
    ), again.reason
    next_one = PieceCompression(again, streams=2, pieces=8)
    assert [next_one.for_piece(k) for k in range(4)] == ["lz4"] * 4
    assert next_one.plan() == "lz4" and next_one.outcome() is None  # nothing to remember

    # the link's rate and the trial are kept side by side in .link-<site>.json
    history.record("site-x", 400 * MiB, 10.0, capped=False, compressed=False)
    assert history.trial("site-x") == found and history.rate("site-x") is not None
    history.record_trial("site-y", found)
    assert history.rate("site-y") == pytest.approx(400 * MiB / 10.0)
    # a known rate decides before any trial
    assert (
        choose("auto", os_like, history.rate("site-x"), idle_cores=2, trial=kept).algorithm
        == "zstd"
    )
    # an hour later, or from a file that is not ours, it is tried again
    assert history.trial("site-x", now=found.at + TRIAL_KEPT + 1) is None
    assert history.trial("site-x", now=found.at + TRIAL_KEPT - 60) == found
    garbage = [
        '{"trial": {"algorithm": "gzip", "lz4": 1, "zstd": 1, "at": 1, "ratio": 0.3}}',
        '{"trial": {"algorithm": "lz4"}}',
        '{"trial": []}',
        "[1, 2]",
        "{",
        kept_text("1" + "0" * 400, "1" + "0" * 400),  # too large for a float
        kept_text("NaN", "NaN"),
        kept_text("true", '"1e9"'),
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser goes
    ]
    for text in garbage:
        (tmp_path / ".link-site-z.json").write_text(text)
        assert history.trial("site-z") is None and history.rate("site-z") is None
        # ... and what the next transfer learns is still written, and read back
        history.record("site-z", 400 * MiB, 10.0, capped=False, compressed=False)
        assert history.rate("site-z") == pytest.approx(400 * MiB / 10.0)
        assert history.trial("site-z") is None
        history.record_trial("site-z", found)
        assert history.trial("site-z") == found
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".link-site-x.json",
        ".link-site-y.json",
        ".link-site-z.json",
    ]  # no temporary file left


def kept_text(rate: str, lz4: str) -> str:
    """A ``.link-<site>.json`` with these JSON texts as the link's rate and the trial's lz4."""
    trial = f'{{"algorithm": "lz4", "lz4": {lz4}, "zstd": 1, "at": 1, "ratio": 0.3}}'
    return f'{{"bytes_per_s": {rate}, "trial": {trial}}}'


def test_a_kept_outcome_is_followed_only_where_it_still_holds(os_like: Path) -> None:
    """A kept zstd is watched like a trial's, and gives way to lz4 for good if it falls under
    the margin's share of the trial's lz4 rate; with no core to spare it is tried again, not
    dropped for the hour; an image whose samples compress differently is tried afresh."""
    ratio = sample_ratio(os_like)
    zstd_won = Trial("zstd", lz4=16e6, zstd=24e6, at=time.time() - 120, ratio=ratio, streams=2)
    kept = choose("auto", os_like, None, 0.040, idle_cores=2, ratio=ratio, trial=zstd_won)
    assert kept.algorithm == "zstd" and not kept.provisional
    assert kept.reason.endswith(
        ", zstd won the trial 2 min ago (lz4 16, zstd 24 MB/s of file per piece)"
    )
    ending = PieceCompression(kept, streams=2, pieces=3, piece_size=32 * MiB)
    for k in range(3):
        assert ending.for_piece(k) == "zstd"
    ending.sent(0, "zstd", 32 * MiB, 1.4)
    ending.sent(1, "zstd", 32 * MiB, 1.4)
    ending.sent(2, "zstd", 1 * MiB, 0.5)  # the file's last, short piece: its start weighs more
    assert ending.summary() == "zstd" and ending.outcome() is None  # kept as it is

    pieces = PieceCompression(kept, streams=2, pieces=8, piece_size=32 * MiB)
    assert pieces.plan() == "zstd"
    for k in range(3):
        assert pieces.for_piece(k) == "zstd"
    pieces.sent(0, "zstd", 32 * MiB, 1.4)  # 24 MB/s: as the trial found
    pieces.sent(1, "zstd", 32 * MiB, 4.0)
    pieces.sent(2, "zstd", 32 * MiB, 4.0)  # a wave at 8 MB/s, under the trial's lz4 16
    assert [pieces.for_piece(k) for k in (3, 4)] == ["lz4", "lz4"]
    assert pieces.summary() == "zstd, back to lz4"
    fell = pieces.outcome()
    assert (
        fell is not None and fell.algorithm == "lz4" and fell.zstd == pytest.approx(8.4e6, rel=0.01)
    )
    assert fell.lz4 == 16e6 and fell.ratio == ratio  # the next transfers: lz4

    # a trial over 2 streams, followed over 4: each piece has half the link it had then
    wider = PieceCompression(kept, streams=4, pieces=16, piece_size=32 * MiB)
    for k in range(4):
        wider.sent(k, "zstd", 32 * MiB, 3.5)  # 9.6 MB/s a piece: 38 for the four, not a fall
    assert wider.for_piece(4) == "zstd"

    refused = PieceCompression(kept, streams=2, pieces=8, piece_size=32 * MiB)
    assert refused.for_piece(0) == "zstd"
    refused.sent(0, "none", 32 * MiB, 1.0)  # the rsync there no longer does zstd
    assert refused.for_piece(1) == "lz4"  # which the kept trial's lz4 wave went through with

    busy = choose("auto", os_like, None, 0.040, idle_cores=0.3, ratio=ratio, trial=zstd_won)
    assert busy.algorithm == "lz4" and busy.provisional and "no core to spare" in busy.reason
    assert PieceCompression(busy, streams=2, pieces=8).trial  # tried again

    other_image = choose(
        "auto", os_like, None, 0.040, idle_cores=2, ratio=ratio + 0.2, trial=zstd_won
    )
    assert (
        other_image.provisional
        and other_image.kept is None
        and "won the trial" not in other_image.reason
    )


@pytest.mark.slow
def test_a_slow_link_is_found_by_the_first_pieces_and_gets_zstd(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    if sb.network is None:
        pytest.skip("needs the two-host sandbox (a shaped link)")
    # 6 pieces of 32 MiB over 2 streams: a wave of lz4, one of zstd, and the rest. At
    # 25 Mbit/s a piece takes seconds, far more than its start (a few round trips), and zstd
    # needs a twentieth of a core to keep the link full: it wins even beside other test runs
    # (at 50 Mbit/s, with 0.3 of a core idle in a CI run, zstd's wave came out 7 against lz4's
    # 8 MB/s of file per piece; at 100-200 Mbit/s with a load average of 7, even)
    image = make_os_like_qcow2(tmp_path / "os.qcow2", virtual_size=512 * MiB, data_bytes=208 * MiB)
    image_id = sb.source.upload_image(image, name="slow-link", disk_format="qcow2")
    settings = settings_for(sb, tmp_path, **{"site-t": site_b_with(sb, "STREAMS=2")})
    lines = Lines()
    sb.shape(25, 40)
    try:
        result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-t"), lines)
    finally:
        sb.shape()
    arrived = tmp_path / "arrived"
    sb.destination.download_to(result.destination_image_id, arrived)
    assert sha256_file(arrived) == sha256_file(image)
    [transferred] = [line for line in lines if line.startswith("Transfered")]
    assert transferred.endswith("compression lz4, then zstd)"), transferred
    kept = LinkHistory(settings.staging_dir).trial("site-t")
    assert kept is not None and kept.algorithm == "zstd"  # the next transfers go with zstd
    lz4_only = lz4_size(image)
    assert result.bytes_sent < lz4_only, (result.bytes_sent, lz4_only)  # zstd carried the rest


@pytest.mark.slow
def test_auto_follows_what_its_trial_measured_on_a_fast_link(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """On the unshaped link both algorithms are tried on real pieces, and the rest goes with
    the one the trial's rule chose (zstd unless under the margin; back to lz4 should zstd fall),
    which is kept for the next transfers. Which one wins here depends on the machine: on the
    slower machines of November lz4 did (zstd made the transfer CPU-bound), on a faster one
    zstd's smaller output won by up to 25 %; the rule itself is pinned down with fixed rates in
    test_auto_tries_lz4_against_zstd_on_an_unknown_link, and zstd's win on a slow link in
    test_a_slow_link_is_found_by_the_first_pieces_and_gets_zstd."""
    sb = clean_sandbox
    # 9 pieces over 2 streams: two trial waves, and a wave after them for the watch
    image = make_os_like_qcow2(tmp_path / "os.qcow2", virtual_size=512 * MiB, data_bytes=272 * MiB)
    image_id = sb.source.upload_image(image, name="fast-link", disk_format="qcow2")
    settings = settings_for(sb, tmp_path, **{"site-t": site_b_with(sb, "STREAMS=2")})
    lines = Lines()
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-t"), lines)
    arrived = tmp_path / "arrived"
    sb.destination.download_to(result.destination_image_id, arrived)
    assert sha256_file(arrived) == sha256_file(image)
    assert result.bytes_sent < image.stat().st_size  # compressed, whichever won
    [transferred] = [line for line in lines if line.startswith("Transfered")]
    summary = transferred.rsplit("compression ", 1)[1].rstrip(")")
    assert summary in (
        "lz4, zstd tried, back to lz4",
        "lz4, then zstd",
        "lz4, then zstd, back to lz4",
    )
    kept = LinkHistory(settings.staging_dir).trial("site-t")
    assert kept is not None and kept.lz4 > 0 and kept.zstd > 0 and kept.streams == 2
    assert kept.algorithm == summary.rsplit(", ", 1)[1].split()[-1]  # what the transfer ended with
    if summary == "lz4, then zstd":
        assert kept.zstd >= ZSTD_MARGIN * kept.lz4  # the trial's rates, as measured
    elif summary == "lz4, zstd tried, back to lz4":
        assert kept.zstd < ZSTD_MARGIN * kept.lz4
    else:
        assert kept.zstd < ZSTD_MARGIN * kept.lz4  # zstd's last wave, under its share of lz4's


def zstd_size(image: Path, level: int) -> int:
    """What the ``zstd`` tool makes of ``image`` at ``level``."""
    done = subprocess.run(["zstd", f"-{level}", "-c", str(image)], capture_output=True, check=True)
    return len(done.stdout)


def lz4_size(image: Path) -> int:
    """What lz4 alone makes of ``image`` (the ``lz4`` tool: rsync's algorithm)."""
    done = subprocess.run(["lz4", "-1", "-c", str(image)], capture_output=True, check=True)
    return len(done.stdout)


def test_two_jobs_remembering_the_same_link_keep_both_facts(tmp_path: Path) -> None:
    """``.link-<site>.json`` is read, added to and written again: two jobs doing that at
    once (threads here; processes alike, the lock is the directory's ``flock``) lose nothing."""
    history = LinkHistory(tmp_path / "staging")

    def write(prefix: str) -> None:
        for n in range(150):
            history._write("site-b", **{f"{prefix}{n}": n})

    threads = [threading.Thread(target=write, args=(prefix,)) for prefix in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = json.loads((tmp_path / "staging" / ".link-site-b.json").read_text())
    assert sorted(kept) == sorted(f"{p}{n}" for p in "abc" for n in range(150))
    assert [p.name for p in (tmp_path / "staging").iterdir()] == [".link-site-b.json"]


def test_what_is_remembered_per_site_leaves_no_temporary_file_when_it_cannot_be_written(
    tmp_path: Path,
) -> None:
    """A write that fails (here: a directory in the way; a full disk alike) is only logged,
    and leaves no ``.tmp`` file behind: one per job would pile up for years."""
    site_file = tmp_path / "site-b.conf"
    site_file.write_text("HOST=x\n")
    for blocked in (tmp_path / ".link-site-b.json", tmp_path / ".owner-site-b.json"):
        blocked.mkdir()
        (blocked / "in-the-way").touch()
    LinkHistory(tmp_path).record("site-b", 100 << 20, 2.0, capped=False, compressed=False)
    Owners(tmp_path).remember("site-b", site_file, "project-1")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".link-site-b.json",
        ".owner-site-b.json",
        "site-b.conf",
    ]
    assert LinkHistory(tmp_path).rate("site-b") is None
