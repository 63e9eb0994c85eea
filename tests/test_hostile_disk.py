"""A hostile environment: the staging disk fills up while an image is being made there."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.sandbox.images import make_qcow2
from tests.sandbox.site import Sandbox, api_site_conf
from tests.support import Lines, no_work_left, settings_for
from tests.test_openstack_migration import copies_at_destination, site_b_with

from migratio.errors import MigratioError, StagingFullError
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

MiB = 1024 * 1024

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def small_disk(
    path: Path, size_mib: int, owner: tuple[int, int] = (0, 0), *, enter: list[str] | None = None
) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted at ``path`` (unmounted at the end, also on failure),
    in the mount namespace that ``enter`` (an nsenter argv) leads to, else in ours."""
    prefix = enter or []
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mib}m,mode=0755,uid={owner[0]},gid={owner[1]}"
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    subprocess.run([*prefix, *mount], check=True)
    try:
        yield path
    finally:
        subprocess.run([*prefix, "umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


def sshd_mounts(sb: Sandbox) -> list[str]:
    """The nsenter argv into the destination sshd's mount namespace (``ip netns exec`` gave it
    one of its own: a mount made here is not seen there)."""
    found = []
    for pid in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if pid.name.isdigit() and (pid / "comm").read_text().strip() == "sshd":
                cmdline = (pid / "cmdline").read_bytes().decode(errors="replace")
                if str(sb.ssh.dir) in cmdline:
                    found.append(pid.name)
    assert found, "the sandbox's sshd is not running"
    return ["nsenter", "-t", min(found, key=int), "-m"]


def fill_once_writing(disk: Path, filler: Path, stop: threading.Event) -> None:
    """Once a staging file is being written on ``disk``, take all of its free space."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop.is_set():
        if any(p.is_file() and p.stat().st_size > 0 for p in disk.glob("cache/*.partial/*")):
            break
        time.sleep(0.001)
    stat = os.statvfs(disk)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, stat.f_bavail * stat.f_frsize)
    except OSError:
        pass
    finally:
        os.close(fd)


FILLING_QEMU_IMG = """#!{python}
import os, shutil, sys
# the first conversion: the staging disk fills up as qemu-img starts (on a busy machine the
# test's thread could see qemu-img's file only after it was complete)
if sys.argv[1:2] == ["convert"] and not os.path.exists({marker!r}):
    open({marker!r}, "w").close()
    stat = os.statvfs({disk!r})
    fd = os.open({filler!r}, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, stat.f_bavail * stat.f_frsize)
    except OSError:
        pass
    os.close(fd)
os.execv({real!r}, ["qemu-img", *sys.argv[1:]])
"""


@needs_root
@pytest.mark.parametrize("making", ["download", "conversion"])
def test_a_disk_filled_while_staging_says_so_and_the_retry_works(
    clean_sandbox: Sandbox, tmp_path: Path, making: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process takes the staging disk's space while a download (a write of
    migratio's own) or a conversion (qemu-img's) is under way."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=96 * MiB, data_bytes=64 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    creds = tmp_path / "creds"  # without a file store the image is downloaded into staging
    creds.write_text(
        sb.creds_path.read_text().replace("IMAGES_DIR=", "IMAGES_DIR=/nonexistent")
        if making == "download"
        else sb.creds_path.read_text()
    )
    creds.chmod(0o600)
    site = "site-b-api" if making == "download" else "site-raw"
    raw = api_site_conf(sb.destination.endpoint, "DISK_FORMAT=raw")
    with small_disk(tmp_path / "staging", 120) as disk:
        settings = settings_for(
            sb, tmp_path, yaml=f"credentials_file: {creds}\n", **{"site-raw": raw}
        )
        assert settings.staging_dir == disk
        filler = tmp_path / "staging" / "filler"
        stop = threading.Event()
        filling = threading.Thread(target=fill_once_writing, args=(disk, filler, stop))
        if making == "conversion":
            real = shutil.which("qemu-img")
            assert real is not None
            wrapper = tmp_path / "bin" / "qemu-img"
            wrapper.parent.mkdir()
            wrapper.write_text(
                FILLING_QEMU_IMG.format(
                    python=sys.executable,
                    marker=str(tmp_path / "filled"),
                    disk=str(disk),
                    filler=str(filler),
                    real=real,
                )
            )
            wrapper.chmod(0o755)
            monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
        else:
            filling.start()
        lines = Lines()
        try:
            with pytest.raises(StagingFullError) as full:
                migrate_to_openstack(settings, MigrationRequest(image_id, site), lines)
        finally:
            stop.set()
            if filling.is_alive():
                filling.join()
        message = str(full.value)
        assert "No space left" in message and str(disk) in message
        assert "Glance" not in message  # not Glance's fault
        assert full.value.retryable
        assert lines[-1] == full.value.status_line()
        filler.unlink()
        assert no_work_left(disk)
        assert copies_at_destination(sb, image_id) == []
        # space is back: the retry works
        result = migrate_to_openstack(settings, MigrationRequest(image_id, site), Lines())
        assert result.outcome == Outcome.MIGRATED


@needs_root
def test_a_full_remote_staging_dir_says_so_and_registers_nothing(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    """The destination's staging directory has less room than the image: rsync stops with
    the disk full, no image is left at the destination, and once there is room the retry
    works."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=64 * MiB, data_bytes=40 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    user = pwd.getpwnam(sb.ssh.user)
    small = sb.ssh.home / "small-staging"
    conf = site_b_with(sb, "export REMOTE_STAGING_DIR=small-staging")
    settings = settings_for(sb, tmp_path, **{"site-small": conf})
    lines = Lines()
    where = sshd_mounts(sb) if sb.network is not None else None
    with small_disk(small, 16, owner=(user.pw_uid, user.pw_gid), enter=where):
        with pytest.raises(MigratioError) as full:
            migrate_to_openstack(settings, MigrationRequest(image_id, "site-small"), lines)
        message = str(full.value)
        assert "No space left on device" in message and sb.ssh.address in message
        assert full.value.retryable
        assert lines[-1] == full.value.status_line()
    assert copies_at_destination(sb, image_id) == []
    assert no_work_left(settings.staging_dir)
    try:
        result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-small"), Lines())
    finally:
        sb.ssh.remove_home_path("small-staging")  # the retry's, made on the home's own disk
    assert result.outcome == Outcome.MIGRATED
