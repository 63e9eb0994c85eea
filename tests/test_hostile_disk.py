"""A hostile environment: the staging disk fills up while an image is being made there."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.sandbox.images import make_qcow2
from tests.sandbox.site import Sandbox, api_site_conf
from tests.support import Lines, no_work_left, settings_for
from tests.test_openstack_migration import copies_at_destination

from migratio.errors import StagingFullError
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

MiB = 1024 * 1024

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def small_disk(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted at ``path`` (unmounted at the end, also on failure)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs",
                    str(path)], check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


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


@needs_root
@pytest.mark.parametrize("making", ["download", "conversion"])
def test_a_disk_filled_while_staging_says_so_and_the_retry_works(
    clean_sandbox: Sandbox, tmp_path: Path, making: str
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
        filling.start()
        lines = Lines()
        try:
            with pytest.raises(StagingFullError) as full:
                migrate_to_openstack(settings, MigrationRequest(image_id, site), lines)
        finally:
            stop.set()
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
