"""1,000 hostile payloads through a running ``migratio run``, then a valid job (real Glance,
sshd, rsync, real Sidekiq client): the service never restarts, every payload is refused, the
valid job is migrated, and the service's memory stays bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis import Redis
from tests.hostile import through_the_service
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import settings_for

MiB = 1024 * 1024
SEED = int(os.environ.get("MIGRATIO_HOSTILE_SEED", "20261130"))


@pytest.mark.slow
def test_a_thousand_hostile_payloads_then_a_valid_job(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = clean_sandbox
    redis: Redis = redis_server.client()
    settings = settings_for(sb, tmp_path, yaml=f"redis_url: {redis_server.url}\n")
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="after the storm", disk_format="qcow2")
    figures = through_the_service(settings, redis, image_id, "site-b", seed=SEED, count=1000)
    with capsys.disabled():
        print(f"\nhostile payloads through `migratio run` (MIGRATIO_HOSTILE_SEED={SEED}):")
        for line in figures.lines():
            print("  " + line)
    assert figures.service_restarts == 0
    assert figures.dead_lettered == 1000
    assert 0 < figures.refusal_lines < 1000  # told when the payload named an image and a site
    [copy] = sb.destination.find_by_property("source_uuid", image_id)
    assert copy["status"] == "active"
    arrived = sb.destination.download_to(str(copy["id"]), tmp_path / "arrived")
    assert sha256_file(arrived) == sha256_file(image)
    # bounded: payloads over 64 KiB are never parsed, batches are cut at 1 MiB
    assert figures.rss_peak_kib - figures.rss_start_kib < 40 * 1024
