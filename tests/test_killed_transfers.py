"""REGISTER=ssh under attack: the migrating process killed (SIGKILL) mid-step, hostile remote
staging directories, an sshd that refuses logins, and what each leaves behind.

The migrating process is a real child process (what a work-horse is) running one migration
against the real sandbox (Glance, sshd, rsync, the remote helper); it is killed with SIGKILL,
re-run, and then the destination must hold exactly one active copy with the right bytes, and
nothing may be left: no ssh master, rsync or remote helper, no piece in the local staging
directory, no ``.part`` file at the destination, no ``migratio-ssh-*`` directory.
"""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.site import Sandbox
from tests.support import (
    Lines,
    alive,
    descendants,
    processes_of,
    settings_for,
    upload_helpers,
    wait_for_part,
)

from migratio.adapters import rsync
from migratio.config import OpenStackSite, Settings
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

MiB = 1 << 20

#: one migration, as a work-horse runs it (no lease: the tests drive the re-runs themselves)
MIGRATE = """
import sys
from pathlib import Path
from migratio.config import load_settings
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest

settings = load_settings(Path(sys.argv[1]))
migrate_to_openstack(settings, MigrationRequest(sys.argv[2], sys.argv[3]), print)
"""


def site_b_with(sandbox: Sandbox, *lines: str) -> str:
    return (sandbox.sites_dir / "site-b.conf").read_text() + "".join(f"{x}\n" for x in lines)


def start_migration(
    settings: Settings, image_id: str, site: str, tmpdir: Path, *, capture: bool = False
) -> subprocess.Popen[str]:
    """The migration in a process of its own, whose temporary files go to ``tmpdir`` (its
    output read by the test with ``capture``, else dropped)."""
    tmpdir.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", MIGRATE, str(settings.config_path), image_id, site],
        env={**os.environ, "TMPDIR": str(tmpdir)},
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        text=True,
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR for the migrating process short enough to hold its ssh master's control
    socket, wherever pytest's ``tmp_path`` is (a deeper one makes the master use /tmp: see
    test_a_deep_tmpdir_still_has_room_for_the_control_socket)."""
    path = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(
    what: str,
    condition: Callable[[], object],
    timeout: float = 120,
    process: subprocess.Popen[str] | None = None,
) -> None:
    """Wait until ``condition``; fail after ``timeout`` or once ``process`` has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the migration ended (exit {process.returncode}) before {what}")
        time.sleep(0.02)


def active_copies(sb: Sandbox, image_id: str) -> list[dict[str, object]]:
    return [
        image
        for image in sb.destination.find_by_property("source_uuid", image_id)
        if image["status"] == "active"
    ]


def assert_one_good_copy(sb: Sandbox, image_id: str, image: Path, tmp_path: Path) -> None:
    copies = sb.destination.find_by_property("source_uuid", image_id)
    assert [c["status"] for c in copies] == ["active"], copies
    arrived = sb.destination.download_to(str(copies[0]["id"]), tmp_path / "arrived")
    assert sha256_file(arrived) == sha256_file(image)


def command_line(pid: int) -> str:
    """``pid``'s state and command line, for a failure message."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return f"{pid}: gone"
    return f"{pid} ({state}): " + " ".join(a.decode(errors="replace") for a in argv)[:300]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["lookup", "pieces", "upload"])
def test_sigkill_at_each_step_leaves_one_copy_and_nothing_else(
    clean_sandbox: Sandbox, tmp_path: Path, short_tmp: Path, step: str
) -> None:
    """SIGKILL of the migrating process while it looks for a copy (three streams already
    sending pieces), while the pieces go, and while the destination uploads them: the
    re-run finishes with one copy, and the killed run's ssh masters and their private
    directories, its rsyncs, its remote helper, the local and the remote pieces are gone."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=256 * MiB, data_bytes=120 * MiB)
    image_id = sb.source.upload_image(image, name="pieces", disk_format="qcow2")
    # the lookup goes through the upload helper (--find), a fraction of a second: made to
    # take 3 s here, as a loaded head node's might, to be caught at it
    slow_python = sb.ssh.write_home_file(
        "slow-python",
        '#!/bin/sh\ncase " $* " in *" --find "*) sleep 3;; esac\nexec python3 "$@"\n',
        0o755,
    )
    lines = ["STREAMS=3", "BWLIMIT=20M", "COMPRESS=none", f"REMOTE_PYTHON={slow_python}"]
    settings = settings_for(sb, tmp_path, **{"site-s": site_b_with(sb, *lines)})
    tmpdir = short_tmp
    migrating = start_migration(settings, image_id, "site-s", tmpdir)
    try:
        # its ssh master's directory is made (the end asserts that the killed run left none);
        # on a fast machine a master may already be gone by the upload
        wait_for("its ssh master", lambda: list(tmpdir.glob("migratio-ssh-*")), process=migrating)
        if step == "lookup":
            wait_for(
                "the lookup", lambda: processes_of(sb.ssh.user, "\0--find\0"), process=migrating
            )
        elif step == "pieces":
            wait_for_part(sb, image_id, 20 * MiB)
        else:
            wait_for("the upload", lambda: upload_helpers(sb.ssh.user), process=migrating)
        below = descendants(migrating.pid)
        os.kill(migrating.pid, signal.SIGKILL)
        migrating.wait()
    finally:
        if migrating.poll() is None:
            migrating.kill()
    try:
        # SIGTERM at once (PR_SET_PDEATHSIG), then each ends as its peer lets it; 30 s for a
        # loaded machine (a CI run timed out at 15 once)
        wait_for("the killed run's ssh and rsync to end", lambda: not any(map(alive, below)), 30)
    except AssertionError as late:
        raise AssertionError(f"{late}: {[command_line(p) for p in below if alive(p)]}") from None
    wait_for("its remote processes to end", lambda: not processes_of(sb.ssh.user, image_id), 15)

    again = start_migration(settings, image_id, "site-s", tmpdir)
    assert again.wait(timeout=300) == 0

    assert_one_good_copy(sb, image_id, image, tmp_path)
    assert not list(sb.remote_staging.glob(f"{image_id}-*")), "remote pieces left"
    assert not list(settings.staging_dir.glob(f"{image_id}-*")), "local pieces left"
    assert not list(tmpdir.iterdir()), "ssh master directories left"
    assert not processes_of(sb.ssh.user, image_id)


def slow_glance(sb: Sandbox, seconds: int) -> Path:
    """A ``glance`` at the destination that takes ``seconds`` to start an upload (a loaded
    head node's CLI); every other command (stdin closed) starts at once."""
    return sb.ssh.write_home_file(
        "slow-glance",
        f'#!/bin/sh\nif [ -p /dev/stdin ]; then sleep {seconds}; fi\nexec glance "$@"\n',
        0o755,
    )


def test_sigkill_as_the_upload_starts_never_makes_a_second_copy(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """The migrating process dies right after it started the destination's upload, the file
    being there in full. Its re-run must not end with two copies: the orphaned helper may not
    complete an image the migrating side never confirmed."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "small.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="orphan", disk_format="qcow2")
    glance = slow_glance(sb, 8)
    settings = settings_for(
        sb, tmp_path, **{"site-s": site_b_with(sb, "STREAMS=1", f"REMOTE_GLANCE={glance}")}
    )
    size = image.stat().st_size

    def whole_file_there_and_upload_started() -> bool:
        parts = (
            list(sb.remote_staging.glob(f"{image_id}-*.part")) if sb.remote_staging.exists() else []
        )
        full = bool(parts) and parts[0].stat().st_size == size
        return full and bool(upload_helpers(sb.ssh.user))

    migrating = start_migration(settings, image_id, "site-s", tmp_path / "tmp")
    try:
        wait_for("the upload to start", whole_file_there_and_upload_started, process=migrating)
        os.kill(migrating.pid, signal.SIGKILL)
        migrating.wait()
    finally:
        if migrating.poll() is None:
            migrating.kill()

    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())
    assert result.outcome is Outcome.MIGRATED
    wait_for("the orphaned helper to end", lambda: not processes_of(sb.ssh.user, image_id), 60)
    time.sleep(1)  # Glance finishing what it got, if it ever would

    assert [c["id"] for c in active_copies(sb, image_id)] == [result.destination_image_id]
    # the orphan's unfinished record goes with the next attempt
    again = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())
    assert again.outcome is Outcome.ALREADY_THERE
    assert_one_good_copy(sb, image_id, image, tmp_path)


HOSTILE_DIRS = ["-leading-dash", "sp ace;'q\"$(touch pwned)`touch pwned2`&&x", "--x=1 y"]


@pytest.mark.parametrize("remote_dir", HOSTILE_DIRS)
def test_hostile_remote_staging_dir(
    clean_sandbox: Sandbox, tmp_path: Path, remote_dir: str
) -> None:
    """REMOTE_STAGING_DIR is a name, never syntax or an option, to every remote command:
    rsync, the helper, and the clean-up of a found copy."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "s.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="hostile-dir", disk_format="qcow2")
    settings = settings_for(
        sb, tmp_path, **{"site-s": site_b_with(sb, f"REMOTE_STAGING_DIR={shlex.quote(remote_dir)}")}
    )
    staged = sb.ssh.home / remote_dir
    try:
        result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())
        assert result.outcome is Outcome.MIGRATED
        assert staged.is_dir() and not list(staged.iterdir())
        # a killed attempt's piece; the next attempt finds the copy and removes it
        stale = staged / f"{image_id}-0123456789ab.qcow2.part.3"
        stale.write_bytes(b"x")
        user = pwd.getpwnam(sb.ssh.user)
        os.chown(stale, user.pw_uid, user.pw_gid)
        again = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())
        assert again.outcome is Outcome.ALREADY_THERE
        assert not list(staged.iterdir()), "staging files left at the destination"
        assert_one_good_copy(sb, image_id, image, tmp_path)
        assert not (sb.ssh.home / "pwned").exists() and not (sb.ssh.home / "pwned2").exists()
    finally:
        sb.ssh.remove_home_path(remote_dir)


class Refusals(logging.Handler):
    """Counts migratio's "login ... was refused; again" lines."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "was refused" in record.getMessage():
            self.count += 1


def test_a_login_sshd_refuses_is_tried_again(
    clean_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sshd drops logins beyond ``MaxStartups``: ssh says kex_exchange_identification and
    exits 255, and rsync exits 255 -- or 12, when it sees the stream end before it can reap
    ssh (a busy machine). Either way the copy is tried again, and arrives once the busy
    moment has passed."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "s.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    site = settings_for(sb, tmp_path).site("site-b")
    assert isinstance(site, OpenStackSite) and site.ssh is not None
    slow_exit = tmp_path / "ssh"
    slow_exit.write_text(
        '#!/bin/sh\nssh "$@"\ncode=$?\n'
        "exec <&- >&- 2>&-\n"  # rsync sees the stream end now,
        "sleep 1\n"  # and ssh's exit only later
        "exit $code\n"
    )
    slow_exit.chmod(0o755)
    monkeypatch.setattr("migratio.adapters.ssh.SSH", str(slow_exit))
    refusals = Refusals()
    logger = logging.getLogger("migratio.adapters.rsync")
    logger.addHandler(refusals)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    sb.ssh.reconfigure("MaxStartups 1")  # one login at a time
    try:
        with ThreadPoolExecutor(1) as pool:
            # a login in progress (a connection that never says hello) takes the one place
            with socket.create_connection((sb.ssh.address, sb.ssh.port)):
                copy = pool.submit(
                    rsync.push,
                    image,
                    site.ssh,
                    ".migratio-staging/refused",
                    sparse=False,
                    timeout=120,
                    make_dir=".migratio-staging",
                )
                wait_for("the copy's login to be refused", lambda: refusals.count or copy.done())
            copy.result()
    finally:
        sb.ssh.reconfigure()
        logger.removeHandler(refusals)
        logger.setLevel(old_level)
    assert sha256_file(sb.remote_staging / "refused") == sha256_file(image)


def logins(sb: Sandbox) -> int:
    """SSH logins the destination's sshd has accepted so far."""
    return sb.ssh.log_path.read_text(errors="replace").count("Accepted publickey")


def test_a_refused_master_is_tried_again_and_carries_every_command(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """The migration's first login, its master connection, meets a busy sshd: it is tried
    again, and the lookups, the rsync, the upload helper and the read-back still share it --
    not a login each, every one of them at the same risk of being refused."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "s.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="busy-sshd", disk_format="qcow2")
    settings = settings_for(sb, tmp_path)
    refusals = Refusals()
    logger = logging.getLogger("migratio")
    logger.addHandler(refusals)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    sb.ssh.reconfigure("MaxStartups 1")
    before = logins(sb)
    try:
        with ThreadPoolExecutor(1) as pool:
            with socket.create_connection((sb.ssh.address, sb.ssh.port)):
                migration = pool.submit(
                    migrate_to_openstack, settings, MigrationRequest(image_id, "site-b"), Lines()
                )
                wait_for("a login to be refused", lambda: refusals.count or migration.done())
            result = migration.result()
    finally:
        sb.ssh.reconfigure()
        logger.removeHandler(refusals)
        logger.setLevel(old_level)
    assert result.outcome is Outcome.MIGRATED
    assert_one_good_copy(sb, image_id, image, tmp_path)
    assert logins(sb) - before == 1  # the master's, once refused; rsync goes through it too


def pieces_of_a_killed_attempt(sb: Sandbox, tmp_path: Path, at_least: int) -> tuple[Path, str, int]:
    """An image, and an attempt that sent pieces of it over three streams until ``at_least``
    bytes had arrived there, then was killed: the image, its id, the bytes its pieces hold."""
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=256 * MiB, data_bytes=120 * MiB)
    image_id = sb.source.upload_image(image, name="layouts", disk_format="qcow2")
    settings = settings_for(
        sb, tmp_path, **{"site-s": site_b_with(sb, "STREAMS=3", "BWLIMIT=20M", "COMPRESS=none")}
    )
    migrating = start_migration(settings, image_id, "site-s", tmp_path / "tmp")
    try:
        wait_for_part(sb, image_id, at_least)
    finally:
        os.kill(migrating.pid, signal.SIGKILL)
        migrating.wait()
    wait_for("its remote processes to end", lambda: not processes_of(sb.ssh.user, image_id), 15)
    kept = sum(p.stat().st_size for p in sb.remote_staging.glob(f"{image_id}-*.part.*"))
    assert kept > 0
    return image, image_id, kept


def test_staging_files_of_an_earlier_layout_go_with_the_success(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """An interrupted attempt sent pieces over three streams; the next one goes as one file
    (the site file now says STREAMS=1). Its success leaves neither layout's files there."""
    sb = clean_sandbox
    image, image_id, _ = pieces_of_a_killed_attempt(sb, tmp_path, 20 * MiB)

    settings = settings_for(sb, tmp_path, **{"site-s": site_b_with(sb, "STREAMS=1")})
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())

    assert result.outcome is Outcome.MIGRATED
    assert_one_good_copy(sb, image_id, image, tmp_path)
    assert not list(sb.remote_staging.glob(f"{image_id}-*")), "staging files left there"


def test_a_rerun_with_streams_auto_resumes_the_pieces_an_earlier_attempt_left(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """An attempt sent pieces over several streams and was killed; the next one, with
    STREAMS=auto on this LAN (one stream), resumes those pieces instead of sending the whole
    file again as one (it did: a worker killed mid-transfer resent all 400 MiB in CI)."""
    sb = clean_sandbox
    image, image_id, kept = pieces_of_a_killed_attempt(sb, tmp_path, 40 * MiB)
    assert kept > 30 * MiB

    settings = settings_for(sb, tmp_path, **{"site-s": site_b_with(sb, "COMPRESS=none")})
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())

    assert result.outcome is Outcome.MIGRATED
    assert result.bytes_sent < image.stat().st_size - kept * 3 // 4  # only what was missing
    assert_one_good_copy(sb, image_id, image, tmp_path)
    assert not list(sb.remote_staging.glob(f"{image_id}-*")), "staging files left there"


def test_a_deep_tmpdir_still_has_room_for_the_control_socket(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """A socket's path holds 107 bytes: with ``TMPDIR`` 90 characters deep the master's
    socket went there all the same, and ssh refused every command ("ControlPath too long")."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "s.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="deep-tmp", disk_format="qcow2")
    settings = settings_for(sb, tmp_path)
    deep = tmp_path / ("t" * max(1, 90 - len(str(tmp_path)) - 1))
    before = logins(sb)

    assert start_migration(settings, image_id, "site-b", deep).wait(timeout=300) == 0

    assert_one_good_copy(sb, image_id, image, tmp_path)
    assert logins(sb) - before == 1  # everything through the master, as ever


def test_the_master_connection_killed_during_the_upload(
    clean_sandbox: Sandbox, tmp_path: Path, short_tmp: Path
) -> None:
    """The ssh master (through which the rsync and the upload helper run) is killed
    mid-upload: the attempt fails, saying so, with no copy left; the next one makes exactly
    one."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=256 * MiB, data_bytes=120 * MiB)
    image_id = sb.source.upload_image(image, name="master", disk_format="qcow2")
    settings = settings_for(
        sb, tmp_path, **{"site-s": site_b_with(sb, "STREAMS=1", "BWLIMIT=20M", "COMPRESS=none")}
    )
    tmpdir = short_tmp
    migrating = start_migration(settings, image_id, "site-s", tmpdir, capture=True)
    try:
        wait_for("the upload", lambda: upload_helpers(sb.ssh.user), process=migrating)
        [master] = [
            pid
            for pid in descendants(migrating.pid)
            if b"-M" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ]
        os.kill(master, signal.SIGKILL)
        lines, _ = migrating.communicate(timeout=300)
    finally:
        if migrating.poll() is None:
            migrating.kill()
    assert migrating.returncode != 0
    last = lines.splitlines()[-1]
    # the master carries the rsync and the upload helper: whichever of them fails first says so
    if last.startswith("Error: rsync to "):
        assert "failed (exit 255): lost the ssh connection to " in last, last
        assert "or the connection was cut" in last, last  # not only rsync's "Broken pipe"
    else:
        assert last.startswith("Error: uploading into Glance at site-s failed (exit 255)"), last
        assert "connection" in last, last
    wait_for("its remote processes to end", lambda: not processes_of(sb.ssh.user, image_id), 15)
    assert sb.destination.find_by_property("source_uuid", image_id) == []

    again = start_migration(settings, image_id, "site-s", tmpdir)
    assert again.wait(timeout=300) == 0
    assert_one_good_copy(sb, image_id, image, tmp_path)
    assert not list(sb.remote_staging.glob(f"{image_id}-*"))
    assert not list(tmpdir.iterdir())


def test_sigkill_while_learning_the_owner_leaves_no_probe_image(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Killed while it makes the empty probe image that tells it its project there (the
    first migration to a site): the next attempt's probe removes the one left behind."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "s.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="probe", disk_format="qcow2")
    settings = settings_for(sb, tmp_path)
    sb.destination.upload_image(image, name="old-copy", disk_format="qcow2")  # a candidate
    # ... of this image, so that the lookup has to learn the owner
    [old] = [i for i in sb.destination.images() if i["name"] == "old-copy"]
    sb.destination.client().images.update(old["id"], source_uuid=image_id)
    migrating = start_migration(settings, image_id, "site-b", tmp_path / "tmp")
    try:
        wait_for(
            "the probe",
            lambda: processes_of(sb.ssh.user, "--name=migratio-owner-probe"),
            process=migrating,
        )
        os.kill(migrating.pid, signal.SIGKILL)
        migrating.wait()
    finally:
        if migrating.poll() is None:
            migrating.kill()
    wait_for("the probe's glance", lambda: not processes_of(sb.ssh.user, "owner-probe"), 30)

    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-b"), Lines())

    assert result.outcome is Outcome.MIGRATED
    assert [i for i in sb.destination.images() if i["name"] == "migratio-owner-probe"] == []


def test_sigkill_during_the_unhashed_api_upload_leaves_no_active_partial_copy(
    clean_sandbox: Sandbox, tmp_path: Path, short_tmp: Path
) -> None:
    """REGISTER=api, a staged conversion going by sendfile: the migrating process killed
    mid-body leaves Glance an image it never makes active; the re-run deletes that leftover
    and makes one active copy of the right bytes."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=96 * MiB, data_bytes=48 * MiB)
    image_id = sb.source.upload_image(image, name="killed-api", disk_format="qcow2")
    conf = sb.site_api_conf.read_text() + "export DISK_FORMAT=raw\nexport BWLIMIT=16M\n"
    settings = settings_for(sb, tmp_path, **{"site-api-raw": conf})
    migrating = start_migration(settings, image_id, "site-api-raw", short_tmp)

    def saving() -> bool:
        copies = sb.destination.find_by_property("source_uuid", image_id)
        return any(copy["status"] == "saving" for copy in copies)

    try:
        wait_for("the upload", saving, process=migrating)
        time.sleep(1)  # some of the body is in
        os.kill(migrating.pid, signal.SIGKILL)
        migrating.wait()
    finally:
        if migrating.poll() is None:
            migrating.kill()
    [left] = sb.destination.find_by_property("source_uuid", image_id)
    wait_for(
        "Glance to notice", lambda: sb.destination.image(str(left["id"]))["status"] != "saving", 30
    )
    assert sb.destination.image(str(left["id"]))["status"] == "queued"

    again = start_migration(settings, image_id, "site-api-raw", short_tmp)
    assert again.wait(timeout=300) == 0
    copies = sb.destination.find_by_property("source_uuid", image_id)
    assert [copy["status"] for copy in copies] == ["active"], copies
    assert copies[0]["id"] != left["id"] and copies[0]["size"] == 96 * MiB
    arrived = sb.destination.download_to(str(copies[0]["id"]), tmp_path / "arrived")
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(arrived)], check=False
    )
    assert same.returncode == 0


@pytest.mark.parametrize("victim", ["glance", "helper", "helper uploading itself"])
def test_the_remote_upload_killed_fails_the_attempt_and_the_retry_makes_one_copy(
    clean_sandbox: Sandbox, tmp_path: Path, short_tmp: Path, victim: str
) -> None:
    """SIGKILL, at the destination, of ``glance image-create`` or of the helper feeding it
    (``REMOTE_UPLOAD=cli``), or of the helper uploading through Glance's API itself (``auto``),
    mid-upload: the attempt fails saying what ended, with no copy left; the next one makes
    exactly one."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=256 * MiB, data_bytes=80 * MiB)
    image_id = sb.source.upload_image(image, name="remote-kill", disk_format="qcow2")
    way = "REMOTE_UPLOAD=auto" if victim == "helper uploading itself" else "REMOTE_UPLOAD=cli"
    settings = settings_for(
        sb,
        tmp_path,
        **{"site-s": site_b_with(sb, "STREAMS=1", "BWLIMIT=20M", "COMPRESS=none", way)},
    )
    migrating = start_migration(settings, image_id, "site-s", short_tmp, capture=True)
    try:

        def saving() -> bool:
            found = sb.destination.find_by_property("source_uuid", image_id)
            return any(c["status"] == "saving" for c in found)

        wait_for("Glance to receive bytes", saving, process=migrating)
        if victim == "helper uploading itself":  # one process: no guard, no CLI
            [feeder] = processes_of(sb.ssh.user, "follow_upload", "python")
            glance = feeder
        else:  # the helper (the feeder), its guard, and the guard's child: glance image-create
            tree = processes_of(sb.ssh.user, "--name=remote-kill", "python")
            [feeder] = [pid for pid, parent in tree.items() if parent not in tree]
            [guard] = [pid for pid, parent in tree.items() if parent == feeder]
            [glance] = [pid for pid, parent in tree.items() if parent == guard]
        os.kill(glance if victim == "glance" else feeder, signal.SIGKILL)
        lines, _ = migrating.communicate(timeout=300)
    finally:
        if migrating.poll() is None:
            migrating.kill()
    assert migrating.returncode != 0
    last = lines.splitlines()[-1]
    if victim == "glance":  # the helper finds it gone as it writes, or as it waits for bytes
        assert last.startswith(
            "Error: uploading into Glance at site-s failed (exit 3): follow_upload: glance "
            "ended before the upload was complete (killed by signal 9) | follow_upload: aborted: "
            "the upload command "
        ), last
        assert last.endswith(("stopped reading", "exited early")), last
    else:
        assert last.startswith(
            "Error: uploading into Glance at site-s failed (exit 137): "
            "the upload helper there was killed by signal 9"
        ), last
    wait_for("its remote processes to end", lambda: not processes_of(sb.ssh.user, image_id), 15)
    assert sb.destination.find_by_property("source_uuid", image_id) == []

    again = start_migration(settings, image_id, "site-s", short_tmp)
    assert again.wait(timeout=300) == 0
    assert_one_good_copy(sb, image_id, image, tmp_path)
    assert not list(sb.remote_staging.glob(f"{image_id}-*"))


def test_one_image_to_two_sites_on_one_account_at_once(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Two sites reached through the same SSH account (one remote staging directory), each
    registering into its own Glance (REMOTE_CREDS), get the same image at the same time:
    each ends with exactly one good copy, and no staging file is left there."""
    sb = clean_sandbox
    seen_from_there = (
        sb.network.host_address if sb.network is not None else "127.0.0.1"
    )  # the source Glance, as the destination host reaches it
    creds = (
        (sb.ssh.home / ".creds")
        .read_text()
        .replace(sb.destination.endpoint, sb.source.endpoint_at(seen_from_there))
    )
    sb.ssh.write_home_file(".creds-other", creds)
    image = make_qcow2(tmp_path / "two.qcow2", virtual_size=256 * MiB, data_bytes=64 * MiB)
    image_id = sb.source.upload_image(image, name="two-sites", disk_format="qcow2")
    settings = settings_for(
        sb,
        tmp_path,
        **{
            "site-s": site_b_with(sb, "BWLIMIT=20M", "COMPRESS=none"),
            "site-t": site_b_with(
                sb, "BWLIMIT=20M", "COMPRESS=none", "REMOTE_CREDS='~/.creds-other'"
            ),
        },
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda site: migrate_to_openstack(
                        settings, MigrationRequest(image_id, site), Lines()
                    ),
                    ["site-s", "site-t"],
                )
            )
    finally:
        sb.ssh.remove_home_path(".creds-other")
    assert [r.outcome for r in results] == [Outcome.MIGRATED, Outcome.MIGRATED]
    assert_one_good_copy(sb, image_id, image, tmp_path)
    [other] = sb.source.find_by_property("source_uuid", image_id)
    assert (
        other["status"] == "active" and other["checksum"] == sb.source.image(image_id)["checksum"]
    )
    assert not list(sb.remote_staging.glob(f"{image_id}-*"))
