"""A hostile environment: a destination host whose packets vanish (no RST, no ICMP)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.site import Sandbox
from tests.support import Lines, no_work_left, settings_for, upload_helpers
from tests.test_network_sandbox import needs_network
from tests.test_openstack_migration import copies_at_destination, site_b_with

from migratio.adapters import processes
from migratio.adapters.rsync import why_it_failed
from migratio.config import SshTarget
from migratio.errors import RemoteError, TransferError
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest

MiB = 1024 * 1024


@needs_network
def test_a_silent_destination_fails_in_bounded_time_naming_the_host(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    assert sb.network is not None
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=16 * MiB, data_bytes=2 * MiB)
    image_id = sb.source.upload_image(image, name="silent", disk_format="qcow2")
    conf = site_b_with(sb, "export SSH_CONNECT_TIMEOUT=3")
    settings = settings_for(sb, tmp_path, **{"site-silent": conf})
    lines = Lines()
    begin = time.monotonic()
    with sb.network.dropped(), pytest.raises(RemoteError) as failed:
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-silent"), lines)
    took = time.monotonic() - begin
    message = str(failed.value)
    assert sb.ssh.address in message
    assert failed.value.retryable
    assert lines[-1].startswith("Error: ") and sb.ssh.address in lines[-1]
    assert took < 30, took
    assert copies_at_destination(sb, image_id) == []
    assert no_work_left(settings.staging_dir)


def _drop_once_sending(sb: Sandbox, until: threading.Event, dropped: threading.Event) -> None:
    """Cut the link once the first bytes are in the remote staging dir and the destination's
    upload has started (the look-up beside the transfer is over: only the transfer and the
    upload talk to the host); keep it cut until ``until`` is set."""
    assert sb.network is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not until.is_set():
        files = [p for p in sb.remote_staging.rglob("*") if p.is_file()]
        if any(p.stat().st_size > 1 * MiB for p in files) and upload_helpers(sb.ssh.user):
            break
        time.sleep(0.05)
    with sb.network.dropped():
        dropped.set()
        until.wait(300)


@needs_network
@pytest.mark.slow
def test_a_destination_gone_silent_mid_transfer_fails_in_bounded_time(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=64 * MiB, data_bytes=40 * MiB)
    image_id = sb.source.upload_image(image, name="silent", disk_format="qcow2")
    conf = site_b_with(sb, "export SSH_CONNECT_TIMEOUT=3", "export BWLIMIT=4000")
    settings = settings_for(sb, tmp_path, **{"site-silent": conf})
    lines = Lines()
    until, dropped = threading.Event(), threading.Event()
    cutter = threading.Thread(target=_drop_once_sending, args=(sb, until, dropped))
    cutter.start()
    begin = time.monotonic()
    try:
        # the transfer finds out first (the upload is waited for after it)
        with pytest.raises(TransferError) as failed:
            migrate_to_openstack(settings, MigrationRequest(image_id, "site-silent"), lines)
    finally:
        took = time.monotonic() - begin
        until.set()
        cutter.join()
    message = str(failed.value)
    assert dropped.is_set()
    assert sb.ssh.address in message
    assert failed.value.retryable
    assert lines[-1].startswith("Error: ") and sb.ssh.address in lines[-1]
    assert took < 120, took
    # the login had worked: what ended it is said, never an empty "cannot log in to ...: " or
    # only rsync's "Broken pipe"
    assert "cannot log in" not in message and not message.rstrip().endswith(":")
    assert f"{sb.ssh.address} stopped answering (no reply for 60 s)" in message, message
    # the upload had begun: its record there could not be deleted while the host was silent,
    # but it never became active
    assert [c for c in copies_at_destination(sb, image_id) if c["status"] == "active"] == []
    assert no_work_left(settings.staging_dir)

    # the link is back: the retry deletes what the cut attempt left there and migrates
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-silent"), Lines())
    copies = copies_at_destination(sb, image_id)
    assert [(c["id"], c["status"]) for c in copies] == [(result.destination_image_id, "active")]
    arrived = sb.destination.download_to(result.destination_image_id, tmp_path / "arrived")
    assert sha256_file(arrived) == sha256_file(image)


LOST = "lost the ssh connection to rsync@backup.example port 22: backup.example stopped answering"


@pytest.mark.parametrize(
    ("code", "stderr", "lost"),
    [
        # the connection ended under rsync: all it says is that
        (255, "rsync: [sender] write error: Broken pipe (32)\n"
              "rsync error: unexplained error (code 255) at io.c(949) [sender=3.5.0]\n", True),
        (12, "rsync: connection unexpectedly closed (1234 bytes received so far) [sender]\n"
             "rsync error: error in rsync protocol data stream (code 12) at io.c(232) "
             "[sender=3.2.7]\n", True),
        (12, "rsync: [sender] safe_write failed to write 4 bytes to socket: Broken pipe (32)\r\n"
             "rsync error: error in rsync protocol data stream (code 12) at io.c(320) "
             "[sender=3.2.7]\r\n", True),
        (255, "", True),  # nothing at all: ssh went without a word
        # ssh's own words (an account whose name starts with "rsync"): shown as they are
        (255, "rsync@backup.example: Permission denied (publickey).\r\n"
              "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
              "rsync error: unexplained error (code 255) at io.c(232) [sender=3.5.0]\n", False),
        (255, "Host key verification failed.\r\n"
              "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n", False),
        # the rsync there refused its options (an old one: --sparse with --inplace)
        (12, "rsync: --sparse cannot be used with --inplace\n"
             "rsync error: syntax or usage error (code 1) at options.c(2215) [server=3.1.2]\n"
             "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
             "rsync error: error in rsync protocol data stream (code 12) at io.c(232) "
             "[sender=3.5.0]\n", False),
        (12, "mkdir: cannot create directory '.migratio-staging': Permission denied\n"
             "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n", False),
        # a full disk there: exit 11, rsync's words
        (11, "rsync: [receiver] write failed on \"x.part\": No space left on device (28)\n", False),
    ],
)  # fmt: skip
def test_what_rsync_says_when_its_connection_ends(code: int, stderr: str, lost: bool) -> None:
    """Only rsync's "the connection ended" lines are said as a lost connection; whatever ssh
    or the rsync there said is shown as it is."""
    done = processes.Completed(("rsync",), code, "", stderr)
    why = why_it_failed(done, SshTarget(user="rsync", host="backup.example"))
    assert why.startswith(LOST) is lost, why
    assert done.tail() in why
