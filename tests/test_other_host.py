"""A worker on a second host: another network namespace, no file store, the same queue.

The second host reaches this host's Redis and source Glance over its veth: both listen on
127.0.0.1 and on this end of the veth (198.18.x.1, an address only that pair has), and on
nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from tests.sandbox import sidekiq
from tests.sandbox.glance_server import TOKEN
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import settings_for

from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, migration_queue
from migratio.service import Service

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox
) -> Iterator[RedisServer]:
    """A Redis on 127.0.0.1 and, when there is a second host, on this end of its veth."""
    veth = sandbox.network.host_address if sandbox.network is not None else None
    with RedisServer(tmp_path_factory.mktemp("redis"), also_on=veth) as server:
        yield server


def listening(pgid: int) -> set[str]:
    """The addresses the processes of group ``pgid`` accept TCP connections on (``ss``)."""
    out = subprocess.run(
        ["ss", "-Hltnp"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    found = set()
    for line in out.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if any(_group_of(pid) == pgid for pid in pids):
            found.add(line.split()[3].rsplit(":", 1)[0])
    return found


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def other_host_config(sb: Sandbox, home: Path, redis: str, glance: str) -> Path:
    """What the second host has: config.yml, creds (no file store), the site file."""
    assert sb.network is not None
    home.mkdir()
    (home / "config").mkdir()
    creds = home / "creds"
    creds.write_text(
        f"export OS_AUTH_TOKEN={TOKEN}\nexport OS_IMAGE_URL={glance}\n"
        f"export IMAGES_DIR={home / 'no-file-store'}\nexport SOURCE_CS=site-a\n"
    )
    creds.chmod(0o600)
    (home / "config" / "site-b-api.conf").write_text(sb.site_api_conf.read_text())
    config = home / "config.yml"
    config.write_text(
        f"name: site-a\nredis_url: {redis}\nnamespace: atmosphere\ncredentials_file: {creds}\n"
        f"sites_dir: {home / 'config'}\nstaging_dir: {home / 'staging'}\nlog_dir: {home / 'log'}\n"
    )
    return config


@pytest.mark.slow
def test_a_worker_on_another_host_migrates_through_the_api(
    redis_server: RedisServer, clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    if sb.network is None:
        pytest.skip("needs the sandbox's second host (a network namespace)")
    redis: Redis = redis_server.client()
    redis.flushall()
    here = settings_for(sb, tmp_path, yaml=f"redis_url: {redis_server.url}\n")
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=32 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="template", disk_format="qcow2")
    veth = sb.network.host_address
    # Redis and the source Glance listen on loopback and this end of the veth, nowhere else
    assert listening(redis_server.pid) == {"127.0.0.1", veth}
    assert listening(sb.source.pid) == {"127.0.0.1", veth}
    redis_there = redis_server.url_for(host=veth)
    config = other_host_config(
        sb, tmp_path / "other-host", redis_there, sb.source.endpoint_at(veth)
    )
    there = [*sb.network.exec_argv([sys.executable, "-m", "migratio"])]
    env = {**os.environ, "MIGRATIO_CONFIG": str(config)}
    # migratio check, run there, verifies what that host needs
    check = subprocess.run(
        [*there, "check", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert redis_there in check.stdout
    assert "not readable: images will be downloaded from Glance" in check.stdout
    assert "site-b-api" in check.stdout
    # the job goes in here (real Sidekiq push, this host's service), runs there
    sidekiq.push(
        here.redis_url, here.namespace, migration_queue(here.name), OPENSTACK_MIGRATOR,
        [image_id, "site-b-api"],
    )  # fmt: skip
    Service(here, redis).run_once()
    worker = subprocess.run(
        [*there, "worker", "--burst", "--config", str(config)], env=env, timeout=300,
        check=False,
    )  # fmt: skip
    assert worker.returncode == 0
    [copy] = sb.destination.find_by_property("source_uuid", image_id)
    arrived = sb.destination.download_to(str(copy["id"]), tmp_path / "arrived")
    assert sha256_file(arrived) == sha256_file(image)
    log = (tmp_path / "other-host" / "log" / "worker.log").read_text()
    assert re.search(r"Downloading [\d.]+ MiB from Glance at site-a", log)  # the API path
    assert "from the file store" not in log
    assert f"Registered as image {copy['id']} at site-b-api" in log
    assert not (here.log_dir / "worker.log").exists()  # nothing ran here
