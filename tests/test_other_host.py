"""A worker on a second host: another network namespace, no file store, the same queue."""

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
from tests.sandbox.forward import Forwarder
from tests.sandbox.glance_server import TOKEN
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import settings_for

from migratio.keys import OPENSTACK_MIGRATOR, migration_queue
from migratio.service import Service

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


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
    with (
        Forwarder(veth, ("127.0.0.1", redis_server.port)) as to_redis,
        Forwarder(veth, (sb.source.address, sb.source.port)) as to_glance,
    ):
        config = other_host_config(
            sb,
            tmp_path / "other-host",
            f"redis://{veth}:{to_redis.port}/0",
            f"http://{veth}:{to_glance.port}",
        )
        there = [*sb.network.exec_argv([sys.executable, "-m", "migratio"])]
        env = {**os.environ, "MIGRATIO_CONFIG": str(config)}
        # migratio check, run there, verifies what that host needs
        check = subprocess.run(
            [*there, "check", "--config", str(config)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"redis://{veth}:{to_redis.port}/0" in check.stdout
        assert "not readable: images will be downloaded from Glance" in check.stdout
        assert "site site-b-api" in check.stdout or "site-b-api" in check.stdout
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
