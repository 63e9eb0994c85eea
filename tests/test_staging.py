"""The staging cache: one download and one conversion per image, shared by every job."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from tests.sandbox import sidekiq
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.moto_server import MotoServer
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox, api_site_conf
from tests.support import no_work_left, redis_only_settings, settings_for, worker_argv

from migratio.atmosphere.keys import AMAZON_MIGRATOR, OPENSTACK_MIGRATOR, migration_queue
from migratio.config import Settings
from migratio.errors import StagingFullError
from migratio.preflight import Level
from migratio.preflight import _check_staging as check_staging
from migratio.service import Service
from migratio.staging import StagingCache, entry_name

MiB = 1024 * 1024
IMAGE = "6f3c9a0e-1111-2222-3333-444455556666"


def maker(data: bytes, counter: Path | None = None, pause: float = 0.0) -> Any:
    """A ``make`` callback writing ``data`` (and a line to ``counter`` each time it runs)."""

    def make(target: Path) -> dict[str, Any]:
        if counter is not None:
            with counter.open("a") as out:
                out.write(f"{os.getpid()}\n")
        time.sleep(pause)
        target.write_bytes(data)
        return {"md5": "x"}

    return make


def _use_in_child(root: str, name: str, data: bytes, counter: str, out: str) -> None:
    cache = StagingCache(Path(root), None, 3600)
    with cache.use(name, len(data), maker(data, Path(counter), pause=1.0)) as entry:
        Path(out).write_bytes(entry.path.read_bytes())


def test_jobs_at_once_share_one_make(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    name = entry_name(IMAGE, "sha512:abc", "raw")
    counter = tmp_path / "made"
    ctx = multiprocessing.get_context("fork")
    children = [
        ctx.Process(
            target=_use_in_child,
            args=(str(tmp_path / "cache"), name, data, str(counter), str(tmp_path / f"out{i}")),
        )
        for i in range(3)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1
    for i in range(3):
        assert (tmp_path / f"out{i}").read_bytes() == data


def test_years_of_images_leave_no_trail_of_lock_files(tmp_path: Path) -> None:
    """Only complete entries keep files: the lock files of made, failed, evicted and killed
    makes go."""
    root = tmp_path / "cache"
    cache = StagingCache(root, 3 * 4096, 3600)

    def broken(target: Path) -> dict[str, Any]:
        raise OSError("the download broke")

    names = [entry_name(f"{n:08x}-1111-2222-3333-444455556666", "md5:x", "raw") for n in range(40)]
    for n, name in enumerate(names):
        if n % 4 == 3:
            with pytest.raises(OSError, match="download broke"), cache.use(name, 4096, broken):
                pass
        else:
            with cache.use(name, 4096, maker(b"x" * 4096)):
                pass
    # what a job killed while making left: its locks and a half-made entry
    (root / "killed.use").touch()
    (root / "killed.make").touch()
    (root / "killed.partial").mkdir()
    (root / "gone.make").touch()
    with cache.use(names[0], 4096, maker(b"y" * 4096)):
        pass
    kept = {name for _, name, _ in cache.entries()}
    assert len(kept) == 3
    expected = {".lock"} | {f"{name}{suffix}" for name in kept for suffix in ("", ".json", ".use")}
    assert {path.name for path in root.iterdir()} == expected


def test_a_changed_image_is_never_served_from_the_old_entry(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path / "cache", None, 3600)
    old, new = os.urandom(4096), os.urandom(4096)
    with cache.use(entry_name(IMAGE, "sha512:old", "qcow2"), 4096, maker(old)) as entry:
        assert entry.path.read_bytes() == old
    # the same image id with other content (a re-upload) is another entry
    with cache.use(entry_name(IMAGE, "sha512:new", "qcow2"), 4096, maker(new)) as entry:
        assert entry.path.read_bytes() == new
    with cache.use(entry_name(IMAGE, "sha512:old", "qcow2"), 4096, maker(b"not made")) as entry:
        assert entry.path.read_bytes() == old


KILLED_MAKER = """
import sys, time
from pathlib import Path
from migratio.staging import StagingCache

def make(target):
    with target.open("wb") as out:
        out.write(b"half" * 1024)
        out.flush()
        print("writing", flush=True)
        time.sleep(600)
    return {}

with StagingCache(Path(sys.argv[1]), None, 3600).use(sys.argv[2], 8192, make):
    pass
"""


def test_an_entry_whose_maker_was_killed_is_not_served(tmp_path: Path) -> None:
    root, name = tmp_path / "cache", entry_name(IMAGE, "sha512:abc", "raw")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MAKER, str(root), name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        assert (root / f"{name}.partial" / name).exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    data = os.urandom(8192)
    counter = tmp_path / "made"
    cache = StagingCache(root, None, 3600)
    with cache.use(name, len(data), maker(data, counter)) as entry:
        assert entry.path.read_bytes() == data
    assert len(counter.read_text().splitlines()) == 1
    assert not list(root.glob("*.partial"))


def test_the_bound_is_kept_and_an_entry_in_use_stays(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = StagingCache(root, 5 * MiB, 3600)
    a, b, c = (entry_name(IMAGE, f"sha512:{x}", "raw") for x in "abc")
    data = os.urandom(2 * MiB)
    with cache.use(a, len(data), maker(data)):
        pass
    with cache.use(b, len(data), maker(data)):
        pass
    time.sleep(0.05)
    with cache.use(a, len(data), maker(b"not made")):  # a is now the most recently used
        pass
    with cache.use(c, len(data), maker(data)):  # room for c: b (least recently used) goes
        pass
    assert (root / a).exists() and (root / c).exists()
    assert not (root / b).exists()

    small = StagingCache(root, 3 * MiB, 3600)
    with small.use(a, len(data), maker(b"not made")) as in_use:
        # a is in use: it stays, and b cannot fit beside it
        with pytest.raises(StagingFullError) as refused, small.use(b, len(data), maker(data)):
            pass
        assert in_use.path.read_bytes() == data
    message = str(refused.value)
    assert "staging_max_bytes" in message and "in use by running migrations" in message
    assert refused.value.retryable
    assert not (root / b).exists()
    with small.use(b, len(data), maker(data)) as entry:  # a is no longer in use: it goes
        assert entry.path.read_bytes() == data
    assert not (root / a).exists()
    used = sum(p.stat().st_blocks * 512 for p in root.iterdir() if p.is_file())
    assert used <= 3 * MiB

    with pytest.raises(StagingFullError) as never, small.use(a, 4 * MiB, maker(b"")):
        pass
    assert "raise staging_max_bytes" in str(never.value)
    assert not never.value.retryable


# -- through the service -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def downloaded_bytes(sb: Sandbox, image_id: str) -> list[int]:
    """The sizes of the source Glance's answers to downloads of ``image_id`` (its uWSGI log)."""
    pattern = re.compile(rf"GET /v2/images/{image_id}/file => generated (\d+) bytes")
    return [int(m.group(1)) for m in pattern.finditer(sb.source.uwsgi_log_path.read_text())]


def three_destinations(sb: Sandbox, tmp_path: Path, redis_url: str, moto: MotoServer) -> Settings:
    """Two OpenStack destinations wanting raw (ssh; the API) and Amazon; no file store."""
    creds = tmp_path / "creds"
    creds.write_text(
        sb.creds_path.read_text().replace(str(sb.source.images_dir), str(tmp_path / "no-store"))
    )
    creds.chmod(0o600)
    return settings_for(
        sb,
        tmp_path,
        yaml=f"redis_url: {redis_url}\ncredentials_file: {creds}\n",
        **{
            "site-b": sb.site_conf.read_text() + "export DISK_FORMAT=raw\n",
            # the second OpenStack destination: the source's own Glance, through its API
            "site-c": api_site_conf(sb.source.endpoint, "DISK_FORMAT=raw"),
            "aws-eu": moto.site_conf(),
        },
    )


def worker(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(worker_argv(settings))


@pytest.mark.slow
def test_three_destinations_one_download_one_conversion(
    redis_server: RedisServer, clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    sb = clean_sandbox
    redis: Redis = redis_server.client()
    redis.flushall()
    settings = three_destinations(sb, tmp_path, redis_server.url, moto)
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=64 * MiB, data_bytes=16 * MiB)
    image_id = sb.source.upload_image(image, name="template", disk_format="qcow2")
    queue = migration_queue(settings.name)
    for site, job_class in (
        ("site-b", OPENSTACK_MIGRATOR),
        ("site-c", OPENSTACK_MIGRATOR),
        ("aws-eu", AMAZON_MIGRATOR),
    ):
        sidekiq.push(settings.redis_url, settings.namespace, queue, job_class, [image_id, site])
    Service(settings, redis).run_once()
    with ThreadPoolExecutor(3) as pool:  # three real RQ workers, one job each, at once
        procs = list(pool.map(lambda _: worker(settings), range(3)))
    for proc in procs:
        assert proc.wait(300) == 0

    # one download of the image's size, one conversion (qcow2 → raw) for all three
    assert downloaded_bytes(sb, image_id) == [image.stat().st_size]
    log = (settings.log_dir / "worker.log").read_text()
    assert log.count("staging: made ") == 2
    assert len(re.findall(rf"staging: made {image_id}-\w+\.raw", log)) == 1
    # every destination has the same bytes: the raw disk of the image
    raw = tmp_path / "raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    [b_copy] = sb.destination.find_by_property("source_uuid", image_id)
    [c_copy] = sb.source.find_by_property("source_uuid", image_id)
    for glance, copy in ((sb.destination, b_copy), (sb.source, c_copy)):
        arrived = tmp_path / f"arrived-{copy['id']}"
        glance.download_to(str(copy["id"]), arrived)
        assert sha256_file(arrived) == sha256_file(raw)
    ec2 = moto.client("ec2")
    [ami] = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": "tag:source_uuid", "Values": [image_id]}]
    )["Images"]
    assert ami["State"] == "available"
    # the entries stay for later jobs; no work dir, nothing half made
    cache = settings.staging_dir / "cache"
    assert no_work_left(settings.staging_dir)
    assert len(list(cache.glob("*.json"))) == 2
    assert not list(cache.glob("*.partial"))

    # a new upload of other content (a new image id) is downloaded, never served from the old
    other = make_qcow2(tmp_path / "u.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB, seed=1)
    other_id = sb.source.upload_image(other, name="template", disk_format="qcow2")
    sidekiq.push(
        settings.redis_url, settings.namespace, queue, OPENSTACK_MIGRATOR, [other_id, "site-b"]
    )
    Service(settings, redis).run_once()
    assert worker(settings).wait(300) == 0
    assert downloaded_bytes(sb, other_id) == [other.stat().st_size]
    [copy] = sb.destination.find_by_property("source_uuid", other_id)
    arrived = tmp_path / "arrived-other"
    sb.destination.download_to(str(copy["id"]), arrived)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(other), str(raw)], check=True)
    assert sha256_file(arrived) == sha256_file(raw)


def test_check_reports_the_staging_dir(tmp_path: Path) -> None:
    settings = redis_only_settings(tmp_path, "redis://127.0.0.1:9", yaml="staging_max_bytes: 1T\n")
    assert settings.staging_max_bytes == 2**40
    check = check_staging(settings)
    assert "writable" in check.detail and "staging_max_bytes 1.0 TiB" in check.detail
    blocked = tmp_path / "file"
    blocked.write_text("")
    settings = redis_only_settings(
        tmp_path, "redis://127.0.0.1:9", yaml=f"staging_dir: {blocked}\n"
    )
    check = check_staging(settings)
    assert check.level is Level.FAIL and "not writable" in check.detail
