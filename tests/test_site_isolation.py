"""One broken config/<site>.conf stops only that site: the service, status, check and the other
sites carry on; its jobs fail with the file's error and are retried until the file is fixed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.sandbox import sidekiq
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import settings_for

from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, migration_queue

MiB = 1024 * 1024
BROKEN = "export EXTERNAL_USER=atmosphere\nexport EXTERNAL_HOTS=10.0.0.9\n"  # a typo


@pytest.mark.slow
def test_a_broken_site_file_stops_only_its_site(
    clean_sandbox: Sandbox, tmp_path: Path, redis_server: RedisServer
) -> None:
    sb = clean_sandbox
    settings = settings_for(
        sb, tmp_path, yaml=f"redis_url: {redis_server.url}\nretry_delays: [1, 1, 1, 1, 1]\n",
        **{"site-c": BROKEN},
    )  # fmt: skip
    broken_conf = settings.sites_dir / "site-c.conf"
    assert "site-c" in settings.broken_sites
    config = str(settings.config_path)

    # check: that site FAILED, the others ok; the output names the file, the line and the typo
    check = subprocess.run(
        [sys.executable, "-m", "migratio", "check", "--config", config],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert check.returncode == 1
    [failed] = [line for line in check.stdout.splitlines() if line.startswith("FAILED")]
    assert failed.startswith(f"FAILED   site site-c: {broken_conf}: missing EXTERNAL_HOST")
    assert "line 2: unknown key EXTERNAL_HOTS (did you mean EXTERNAL_HOST?)" in failed
    assert "ok       site site-b SSH login" in check.stdout

    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=32 * MiB, data_bytes=4 * MiB)
    image_id = sb.source.upload_image(image, name="isolated", disk_format="qcow2")
    env = {**os.environ, "MIGRATIO_CONFIG": config}
    with sidekiq.FeedbackServer(tmp_path / "atmosphere", redis_server.url, "atmosphere") as atm:
        service = subprocess.Popen([sys.executable, "-m", "migratio", "run"], env=env)
        try:
            for destination in ("site-c", "site-b"):
                sidekiq.push(
                    redis_server.url, settings.namespace, migration_queue(settings.name),
                    OPENSTACK_MIGRATOR, [image_id, destination],
                )  # fmt: skip
            # the good site's job migrates
            copy = wait_for_copy(sb, image_id, timeout=120)
            sb.destination.download_to(str(copy["id"]), tmp_path / "arrived")
            assert sha256_file(tmp_path / "arrived") == sha256_file(image)
            # the broken site's job fails with the file and the error, and is retried
            lines = wait_for_lines(atm, image_id, "site-c", 2, lambda t: t.startswith("Error:"))
            assert lines[0] == (
                f"Error: {broken_conf}: missing EXTERNAL_HOST (or set REGISTER=api with OS_* "
                f"credentials); also {broken_conf}, line 2: unknown key EXTERNAL_HOTS "
                "(did you mean EXTERNAL_HOST?)"
            )
            status = subprocess.run(
                [sys.executable, "-m", "migratio", "status", "--config", config],
                capture_output=True, text=True, check=False, timeout=60,
            )  # fmt: skip
            assert status.returncode == 0, status.stderr
            # fixed: the next retry goes through, without a restart
            broken_conf.write_text((settings.sites_dir / "site-b.conf").read_text())
            done = wait_for_lines(
                atm, image_id, "site-c", 1, lambda t: t.startswith("Requested image was uploaded")
            )
            assert done
            assert service.poll() is None  # the service never stopped
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
    log = (settings.log_dir / "migratio.log").read_text()
    assert f"site site-c: its jobs fail until the file is fixed: {broken_conf}" in log


def wait_for_copy(sb: Sandbox, image_id: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for copy in sb.destination.find_by_property("source_uuid", image_id):
            if copy["status"] == "active":
                return copy
        time.sleep(0.3)
    raise AssertionError(f"no active copy within {timeout}s")


def wait_for_lines(
    atm: sidekiq.FeedbackServer, image_id: str, destination: str, count: int, wanted: object
) -> list[str]:
    assert callable(wanted)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = [
            line[3]
            for line in atm.received()
            if line[0] == image_id and line[2] == destination and wanted(line[3])
        ]
        if len(lines) >= count:
            return lines
        time.sleep(0.2)
    raise AssertionError(f"status lines for {destination}: {atm.received()}")
