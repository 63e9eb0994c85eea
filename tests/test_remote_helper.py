"""The upload helper on the destination fails closed, and runs on the oldest Python 3 there is.

Every way the helper can end mid-upload — SIGTERM, SIGKILL, an exception (SIGINT raises
KeyboardInterrupt wherever it lands), its guard killed, the SSH connection cut — must leave
no ``active`` image, whichever way it uploads: through the destination Glance's API itself
(``REMOTE_UPLOAD=auto``), or into the real ``glance`` CLI (``cli``); over the real sshd, into
the real destination Glance. Then the next run completes the migration.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.sandbox.images import make_raw, sha256_file
from tests.sandbox.old_python import python_for_user
from tests.sandbox.site import Sandbox
from tests.support import Lines, processes_of, settings_for

from migratio.adapters.glance_cli import RemoteGlance
from migratio.cli import main
from migratio.config import OpenStackSite
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

MiB = 1024 * 1024
SIZE = 8 * MiB


@pytest.fixture(scope="module")
def old_python(sandbox: Sandbox) -> tuple[str, str]:
    """The oldest Python 3 of this machine, runnable by the ssh user (path there, version)."""
    path, version = python_for_user(sandbox.ssh)
    print(f"remote helper tested on Python {version} ({path})")
    return path, version


def test_the_oldest_python_is_3_6(old_python: tuple[str, str]) -> None:
    """This machine has a 3.6 build (pyenv); tell loudly if it ever does not."""
    assert old_python[1].startswith("3.6."), f"oldest Python here is {old_python[1]}"


def with_python(sb: Sandbox, python: str) -> str:
    site = (sb.sites_dir / "site-b.conf").read_text()
    return site + f"export REMOTE_PYTHON={python}\n"


def test_migration_with_the_oldest_python(
    clean_sandbox: Sandbox, tmp_path: Path, old_python: tuple[str, str]
) -> None:
    sb = clean_sandbox
    raw = make_raw(tmp_path / "disk.raw", virtual_size=SIZE, data_bytes=SIZE // 2)
    image_id = sb.source.upload_image(raw, name="py36", disk_format="raw")
    settings = settings_for(sb, tmp_path, **{"site-old": with_python(sb, old_python[0])})
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-old"), Lines())
    assert result.outcome is Outcome.MIGRATED
    arrived = sb.destination.download_to(str(result.destination_image_id), tmp_path / "got")
    assert sha256_file(arrived) == sha256_file(raw)


def test_check_runs_the_helper_and_reports_an_unusable_python(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    old_python: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = clean_sandbox
    # what CentOS 7's python3 says to code that needs 3.7 (a stand-in: no 3.5 builds here)
    fake = sb.ssh.write_home_file(
        ".fake-python3",
        "#!/bin/sh\n"
        "echo '  File \"<string>\", line 16' >&2\n"
        "echo 'SyntaxError: future feature annotations is not defined' >&2\n"
        "exit 1\n",
        0o755,
    )
    settings = settings_for(
        sb,
        tmp_path,
        **{"site-old": with_python(sb, old_python[0]), "site-bad": with_python(sb, str(fake))},
    )
    config = str(settings.config_path)
    assert main(["check", "--config", config, "site-old"]) == 0
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if "remote" in x and "python3" in x]
    assert line.startswith("ok") and f"follow_upload ready on Python {old_python[1]}" in line
    assert main(["check", "--config", config, "site-bad"]) == 1
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("FAILED")]
    assert str(fake) in line and "SyntaxError" in line


# --- failing closed -----------------------------------------------------------------------


def wait_for(what: str, condition: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


DEATHS = ["SIGTERM", "SIGKILL", "exception", "guard SIGKILL", "ssh dropped"]
#: (how the helper uploads, how it dies): through Glance's API it has no guard process
WAYS = [("api", death) for death in DEATHS if death != "guard SIGKILL"] + [
    ("cli", death) for death in DEATHS
]


@pytest.mark.slow
@pytest.mark.parametrize("python", ["python3", "oldest"])
@pytest.mark.parametrize(("way", "death"), WAYS)
def test_the_helper_fails_closed(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    old_python: tuple[str, str],
    way: str,
    death: str,
    python: str,
) -> None:
    sb = clean_sandbox
    raw = make_raw(tmp_path / "disk.raw", virtual_size=SIZE, data_bytes=SIZE, seed=3)
    image_id = sb.source.upload_image(raw, name="victim", disk_format="raw")
    interpreter = old_python[0] if python == "oldest" else "python3"
    conf = with_python(sb, interpreter) + ("export REMOTE_UPLOAD=cli\n" if way == "cli" else "")
    settings = settings_for(sb, tmp_path, **{"site-h": conf})
    site = settings.site("site-h")
    assert isinstance(site, OpenStackSite)
    name = f"victim {death} {python} {way}"
    fields = {
        "name": name,
        "disk_format": "raw",
        "container_format": "bare",
        "source_uuid": image_id,
        "source_cs": "site-a",
        "source_t": "site-a",
    }
    # half the file has arrived; rsync is still writing the rest
    staging = sb.remote_staging
    staging.mkdir(exist_ok=True)
    user = pwd.getpwnam(sb.ssh.user)
    os.chown(staging, user.pw_uid, user.pw_gid)
    remote = staging / f"{image_id}-test.raw.part"
    data = raw.read_bytes()
    remote.write_bytes(data[: SIZE // 2])
    digest = hashlib.sha256(data).hexdigest()
    follower = RemoteGlance(site).start_follow_create(
        fields, f".migratio-staging/{remote.name}", SIZE, "sha256", digest, 120
    )
    try:

        def saving() -> bool:
            found = sb.destination.find_by_property("source_uuid", image_id)
            return any(image["status"] == "saving" for image in found)

        wait_for("Glance to receive the first half", saving)
        helpers = processes_of(sb.ssh.user, remote.name, "python")
        [feeder] = [pid for pid, parent in helpers.items() if parent not in helpers]
        if death == "SIGTERM":
            os.kill(feeder, signal.SIGTERM)
        elif death == "SIGKILL":
            os.kill(feeder, signal.SIGKILL)
        elif death == "exception":
            os.kill(feeder, signal.SIGINT)  # KeyboardInterrupt, raised mid-feed
        elif death == "guard SIGKILL":
            [guard] = [pid for pid, parent in helpers.items() if parent == feeder]
            os.kill(guard, signal.SIGKILL)
        else:
            follower.popen.kill()  # the local ssh: the connection drops
        remote.write_bytes(data)  # the rest arrives: too late, nothing may complete now
        wait_for(
            "the helper and glance to end",
            lambda: (
                not processes_of(sb.ssh.user, remote.name)
                and not processes_of(sb.ssh.user, f"--name={name}")
            ),
        )
    finally:
        follower.stop(grace=5)
    time.sleep(1)  # Glance finishing what it got, if it ever would
    images = sb.destination.find_by_property("source_uuid", image_id)
    assert [image["status"] for image in images if image["status"] == "active"] == []
    if way == "cli" or death == "SIGKILL":
        assert images, "the helper never got glance to create the record"
    else:  # the helper's own API client deletes the record it made, as it aborts
        assert images == []

    lines = Lines()
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-h"), lines)
    assert result.outcome is Outcome.MIGRATED
    [copy] = sb.destination.find_by_property("source_uuid", image_id)
    assert copy["id"] == result.destination_image_id and copy["status"] == "active"
    arrived = sb.destination.download_to(str(copy["id"]), tmp_path / "arrived")
    assert sha256_file(arrived) == sha256_file(raw)
