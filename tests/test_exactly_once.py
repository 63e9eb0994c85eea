"""Exactly one migration per (image, destination): twins, killed processes and every kind of stop.

Real Redis, real RQ workers under ``migratio run``, real Glance, sshd, rsync, moto and Sidekiq.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from tests.sandbox import sidekiq
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.moto_server import MotoServer
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import (
    alive,
    children_of,
    descendants,
    push,
    settings_for,
    start_service,
    wait_for_part,
)

from migratio import lease
from migratio.adapters.glance_cli import RemoteGlance, staging_name
from migratio.amazon.raw_blocks import BLOCK_SIZE
from migratio.atmosphere.keys import AMAZON_MIGRATOR, OPENSTACK_MIGRATOR, Keys, migration_queue
from migratio.atmosphere.status import ALREADY_UPLOADED
from migratio.config import OpenStackSite, Settings, load_settings
from migratio.sweep import sweep

MiB = 1024 * 1024


pytestmark = pytest.mark.persistent_redis  # saves to disk, as production runs it


def site_settings(
    sb: Sandbox, tmp_path: Path, redis_url: str, workers: int = 2, **sites: str
) -> Settings:
    yaml = f"redis_url: {redis_url}\nworkers: {workers}\nretry_delays: [1, 1, 1]\n"
    return settings_for(sb, tmp_path, yaml=yaml, **sites)


# -- processes -------------------------------------------------------------------------------


def started_at(pid: int) -> str | None:
    """The process's start time (ticks since boot): tells it from a later one with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def still_there(processes: dict[int, str | None]) -> list[int]:
    """Which of ``processes`` (pid: start time) still run (not another process reusing a pid)."""
    return [p for p, start in processes.items() if alive(p) and started_at(p) == start]


def wait_left(processes: dict[int, str | None], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and still_there(processes):
        time.sleep(0.05)
    return still_there(processes)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


class Service:
    """``migratio run`` as systemd runs it; ``seen`` collects every process it ever had."""

    def __init__(self, settings: Settings) -> None:
        self.proc = start_service(settings)
        self.seen: dict[int, str | None] = {}

    def tree(self) -> list[int]:
        found = descendants(self.proc.pid)
        for pid in found:
            self.seen.setdefault(pid, started_at(pid))
        return found

    def workers(self) -> list[int]:
        return children_of().get(self.proc.pid, [])

    def horse(self, timeout: float = 60) -> tuple[int, int]:
        """(worker pid, horse pid) of a worker that is running a job."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tree()
            kids = children_of()
            for worker in kids.get(self.proc.pid, []):
                for horse in kids.get(worker, []):
                    return worker, horse
            time.sleep(0.05)
        raise AssertionError("no work-horse started")

    def kill_group(self) -> None:
        """SIGKILL the service and everything below it at once (systemd's stop timeout)."""
        pids = [self.proc.pid, *self.tree()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        deadline = time.monotonic() + 30  # up: its signal handlers are in place
        while not self.workers() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return self.proc.returncode

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill_group()


# -- what the destination and Redis say ------------------------------------------------------


def wait_final(redis: Redis, jid: str, timeout: float) -> Job:
    """The last job of Atmosphere's request ``jid`` (through its waits), once it has ended."""
    deadline = time.monotonic() + timeout
    last: Job | None = None
    while time.monotonic() < deadline:
        job_id, n = f"migratio-{jid}", 0
        while True:
            try:
                last = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
            except NoSuchJobError:
                break
            if last.get_status() != "finished" or last.return_value() != "waiting":
                break
            n += 1
            job_id = f"migratio-{jid}-w{n}"
        if last is not None and last.get_status() in {"finished", "failed"}:
            if last.get_status() == "failed" and last.retries_left:
                time.sleep(0.5)
                continue
            return last
        time.sleep(0.5)
    raise AssertionError(f"request {jid} did not end in {timeout}s (last: {last and last.id})")


def lease_intervals(redis: Redis, settings: Settings) -> dict[str, list[tuple[int, int, str]]]:
    """Per pair: (start ms, end ms, attempt) of every attempt, from the lease history.

    An attempt ends when it released its lease, else (its holder died) when the lease could
    expire at the earliest: its last renewal + the lease's TTL.
    """
    attempts: dict[str, dict[str, list[int]]] = {}
    pairs: dict[str, str] = {}
    for entry_id, fields in redis.xrange(Keys(settings.namespace).lease_history(settings.name)):
        ms = int(entry_id.decode().split("-")[0])
        event = fields[b"event"].decode()
        attempt = fields[b"attempt"].decode()
        pairs[attempt] = fields[b"pair"].decode()
        span = attempts.setdefault(attempt, [ms, ms + int(lease.TTL * 1000)])
        if event.startswith("released") or event == "lost":
            span[1] = ms
        else:
            span[1] = max(span[1], ms + int(lease.TTL * 1000))
    by_pair: dict[str, list[tuple[int, int, str]]] = {}
    for attempt, (start, end) in attempts.items():
        by_pair.setdefault(pairs[attempt], []).append((start, end, attempt))
    return {pair: sorted(spans) for pair, spans in by_pair.items()}


def assert_never_two_at_once(redis: Redis, settings: Settings) -> int:
    """No two attempts of a pair overlapped; returns how many attempts there were."""
    count = 0
    for pair, spans in lease_intervals(redis, settings).items():
        count += len(spans)
        for (_, end, first), (start, _, second) in itertools.pairwise(spans):
            assert start >= end, f"{pair}: attempt {second} began while {first} held the lease"
    return count


def staged(where: Path) -> list[str]:
    """What is in a staging directory but for what is kept there on purpose: the dot-files
    (what was learnt about a link, a destination's project) and the shared cache of downloads
    and conversions (:mod:`migratio.staging`, which evicts its own entries)."""
    if not where.exists():
        return []
    return sorted(
        p.name for p in where.iterdir() if not p.name.startswith(".") and p.name != "cache"
    )


def assert_no_staging(sb: Sandbox, settings: Settings) -> None:
    remote, local = staged(sb.remote_staging), staged(settings.staging_dir)
    assert remote == [], f"left in the destination's staging: {remote}"
    assert local == [], f"left in local staging: {local}"


def assert_one_copy(sb: Sandbox, image_id: str, image: Path, tmp_path: Path) -> None:
    copies = sb.destination.find_by_property("source_uuid", image_id)
    assert [c["status"] for c in copies] == ["active"], copies
    arrived = tmp_path / "arrived"
    sb.destination.download_to(str(copies[0]["id"]), arrived)
    assert sha256_file(arrived) == sha256_file(image)


def assert_one_ami(moto: MotoServer, image_id: str, image: Path, tmp_path: Path) -> None:
    ec2, ebs = moto.client("ec2"), moto.client("ebs")
    link = [{"Name": "tag:source_uuid", "Values": [image_id]}]
    amis = ec2.describe_images(Owners=["self"], Filters=link)["Images"]
    assert [a["State"] for a in amis] == ["available"]
    snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=link)["Snapshots"]
    # one snapshot: no other attempt's (moto names the AMI's mapping differently, so by tag)
    assert len(snapshots) == 1, snapshots
    used = [snapshots[0]["SnapshotId"]]
    raw_path = tmp_path / "expected.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw_path)], check=True
    )
    raw = raw_path.read_bytes()
    blocks = ebs.list_snapshot_blocks(SnapshotId=used[0])["Blocks"]
    expected = [
        i // BLOCK_SIZE
        for i in range(0, len(raw), BLOCK_SIZE)
        if raw[i : i + BLOCK_SIZE].strip(b"\0")
    ]
    assert sorted(b["BlockIndex"] for b in blocks) == expected
    for block in blocks:
        got = ebs.get_snapshot_block(
            SnapshotId=used[0], BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )["BlockData"].read()
        start = block["BlockIndex"] * BLOCK_SIZE
        assert got == raw[start : start + BLOCK_SIZE]


def lines_for(atmosphere: sidekiq.FeedbackServer, image_id: str, destination: str) -> list[str]:
    return [
        line[3] for line in atmosphere.received() if line[0] == image_id and line[2] == destination
    ]


def assert_nothing_waiting(redis: Redis, settings: Settings) -> None:
    keys = Keys(settings.namespace)
    assert redis.llen(keys.queue(migration_queue(settings.name))) == 0
    assert redis.llen(keys.inflight(settings.name)) == 0


# -- the same request twice --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 2.0], ids=["at-once", "2s-apart"])
@pytest.mark.parametrize("destination", ["site-b", "site-b-api", "aws-eu"])
def test_the_same_request_twice_makes_one_copy(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    atmosphere: sidekiq.FeedbackServer,
    moto: MotoServer,
    destination: str,
    gap: float,
) -> None:
    sb = clean_sandbox
    settings = site_settings(sb, tmp_path, redis_server.url, **{"aws-eu": moto.site_conf()})
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=256 * MiB, data_bytes=64 * MiB)
    image_id = sb.source.upload_image(image, name="twice", disk_format="qcow2")
    job_class = AMAZON_MIGRATOR if destination == "aws-eu" else OPENSTACK_MIGRATOR
    first = push(settings, [image_id, destination], job_class)
    if gap:
        service = Service(settings)
        service.horse()
        time.sleep(gap)
        second = push(settings, [image_id, destination], job_class)
    else:
        second = push(settings, [image_id, destination], job_class)
        service = Service(settings)
    with service:
        finals = [wait_final(redis, jid, timeout=240) for jid in (first, second)]
        assert service.stop() == 0
    assert sorted(job.return_value() for job in finals) == ["already there", "migrated"]
    if destination == "aws-eu":
        assert_one_ami(moto, image_id, image, tmp_path)
    else:
        assert_one_copy(sb, image_id, image, tmp_path)
    lines = lines_for(atmosphere, image_id, destination)
    assert sum(line.startswith("Registered") for line in lines) == 1, lines
    assert sum(line.startswith(ALREADY_UPLOADED) for line in lines) == 1, lines
    assert not [line for line in lines if line.startswith("Error")], lines
    assert_never_two_at_once(redis, settings)
    assert_no_staging(sb, settings)
    assert_nothing_waiting(redis, settings)


# -- a worker killed on its own ----------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_the_worker_alone_never_makes_twins(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    atmosphere: sidekiq.FeedbackServer,
) -> None:
    sb = clean_sandbox
    settings = site_settings(sb, tmp_path, redis_server.url, workers=1)
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=1024 * MiB, data_bytes=300 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    jid = push(settings, [image_id, "site-b"], OPENSTACK_MIGRATOR)
    with Service(settings) as service:
        worker, horse = service.horse()
        wait_for_part(sb, image_id, 30 * MiB)
        os.kill(worker, signal.SIGKILL)  # the OOM killer's way: the worker's main process only
        assert wait_gone([horse], timeout=5) == [], "the work-horse outlived its worker"
        horse_gone_ms = time.time() * 1000
        final = wait_final(redis, jid, timeout=300)
        assert service.stop() == 0
    assert final.return_value() == "migrated"
    assert final.meta.get("interruptions") == 1
    assert_one_copy(sb, image_id, image, tmp_path)
    [_, (second_start, _, _)] = lease_intervals(redis, settings)[f"{image_id}:site-b"]
    assert second_start >= horse_gone_ms  # the second attempt began after the first was dead
    assert assert_never_two_at_once(redis, settings) == 2
    lines = lines_for(atmosphere, image_id, "site-b")
    assert sum(line.startswith("Migration started") for line in lines) == 2
    assert lines[-1].startswith("Registered")
    assert_no_staging(sb, settings)
    assert wait_left(service.seen, timeout=10) == []


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").rstrip("\0").split("\0")


def written(path: Path) -> int:
    """Bytes ``path`` holds on disk (0 while it does not exist)."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def conversion_into_the_cache(service: Service, timeout: float = 120) -> tuple[int, Path]:
    """(pid, output file) of the ``qemu-img convert`` writing a staging cache entry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in service.tree():
            argv = cmdline(pid)
            if argv and argv[0].endswith("qemu-img") and "convert" in argv:
                target = Path(argv[-1])
                if target.parent.name.endswith(".partial") and target.parent.parent.name == "cache":
                    return pid, target
        time.sleep(0.01)
    raise AssertionError("no qemu-img conversion into the staging cache started")


@pytest.mark.slow
def test_sigkill_of_the_work_horse_mid_conversion_serves_no_half_entry(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    atmosphere: sidekiq.FeedbackServer,
) -> None:
    """The work-horse dies (SIGKILL) while qemu-img writes the raw entry into the staging cache:
    the half-written entry is never served; the retry converts again; one copy arrives."""
    sb = clean_sandbox
    raw_site = sb.site_api_conf.read_text() + "export DISK_FORMAT=raw\n"
    settings = site_settings(sb, tmp_path, redis_server.url, workers=1, **{"site-raw": raw_site})
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=1024 * MiB, data_bytes=256 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    jid = push(settings, [image_id, "site-raw"], OPENSTACK_MIGRATOR)
    cache = settings.staging_dir / "cache"
    with Service(settings) as service:
        qemu, target = conversion_into_the_cache(service)
        horse = parent_of(qemu)
        # hold the conversion once it has written something, so that it is surely half-way
        while alive(qemu) and written(target) < 8 * MiB:
            time.sleep(0.005)
        os.kill(qemu, signal.SIGSTOP)
        assert alive(qemu), "the conversion ended before it could be stopped: make it longer"
        assert written(target) >= 8 * MiB
        os.kill(horse, signal.SIGKILL)  # the work-horse, mid-conversion
        assert wait_gone([horse], timeout=10) == []
        os.kill(qemu, signal.SIGCONT)  # its parent-death SIGTERM is delivered now
        assert wait_gone([qemu], timeout=10) == [], "qemu-img outlived its work-horse"
        name = target.parent.name[: -len(".partial")]
        assert not (cache / name).exists() and not (cache / f"{name}.json").exists()
        final = wait_final(redis, jid, timeout=300)
        assert service.stop() == 0
    assert final.return_value() == "migrated"
    assert final.meta.get("interruptions") == 1
    # the retry did not take the half-written file: it converted again, and made the entry
    log = (settings.log_dir / "worker.log").read_text()
    assert log.count(f"staging: made {name}") == 1
    assert f"staging: using {name}" not in log
    assert (cache / f"{name}.json").exists() and not list(cache.glob("*.partial"))
    raw = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    assert (cache / name).stat().st_size == raw.stat().st_size
    copies = sb.destination.find_by_property("source_uuid", image_id)
    assert [c["status"] for c in copies] == ["active"], copies
    arrived = sb.destination.download_to(str(copies[0]["id"]), tmp_path / "arrived")
    assert sha256_file(arrived) == sha256_file(raw)
    # exactly once: two attempts, never at the same time, one registration
    assert assert_never_two_at_once(redis, settings) == 2
    lines = lines_for(atmosphere, image_id, "site-raw")
    assert sum(line.startswith("Registered") for line in lines) == 1, lines
    assert lines[-1].startswith("Registered"), lines
    assert_no_staging(sb, settings)
    assert wait_left(service.seen, timeout=10) == []


# -- stops -------------------------------------------------------------------------------------

STOPS = {
    "warm": [],
    "cold-after-0.1s": [0.1],
    "cold-after-1s": [1.0],
    "cold-after-10s": [10.0],
    "three-sigterms": [0.3, 0.3],
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [*STOPS, "sigkill-of-the-group"])
def test_stops_lose_nothing_and_leave_nothing(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    atmosphere: sidekiq.FeedbackServer,
    stop: str,
) -> None:
    sb = clean_sandbox
    settings = site_settings(sb, tmp_path, redis_server.url, workers=1)
    with (settings.sites_dir / "site-b.conf").open("a") as conf:
        conf.write("\nBWLIMIT=30M\n")  # ~20 s of transfer: still running at each stop
    settings = load_settings(settings.config_path)
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=2048 * MiB, data_bytes=600 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    jid = push(settings, [image_id, "site-b"], OPENSTACK_MIGRATOR)
    with Service(settings) as service:
        _, horse = service.horse()
        wait_for_part(sb, image_id, 20 * MiB)
        if stop == "sigkill-of-the-group":
            service.kill_group()
        else:
            service.proc.send_signal(signal.SIGTERM)
            for n, delay in enumerate(STOPS[stop]):
                time.sleep(delay)
                if n == 0:
                    assert alive(horse), "the migration ended before the cold stop: make it longer"
                service.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert service.proc.wait(timeout=300) == 0
            if STOPS[stop]:
                assert time.monotonic() - started < 15  # cold: gone within seconds
        assert wait_left(service.seen, timeout=10) == [], "processes left behind"
    job = Job.fetch(f"migratio-{jid}", connection=redis, serializer=JSONSerializer)
    if stop == "warm":
        assert job.get_status() == "finished"
    elif stop != "sigkill-of-the-group":
        assert job.get_status() == "queued"  # put back, first in line
    # the re-run (systemd starting the service again) finishes it: nothing lost, nothing twice
    with Service(settings) as again:
        final = wait_final(redis, jid, timeout=400)
        assert again.stop() == 0
        assert wait_left(again.seen, timeout=10) == []
    assert final.return_value() in {"migrated", "already there"}
    assert_one_copy(sb, image_id, image, tmp_path)
    assert_never_two_at_once(redis, settings)
    assert_no_staging(sb, settings)
    assert_nothing_waiting(redis, settings)
    lines = lines_for(atmosphere, image_id, "site-b")
    assert lines[-1].startswith(("Registered", ALREADY_UPLOADED)), lines


# -- the lease itself, and the sweep -----------------------------------------------------------


def test_lease_keys_are_exact() -> None:
    keys = Keys("atmosphere")
    image = "6f3c9a0e-1111-2222-3333-444455556666"
    assert (
        keys.lease("site-a", image, "site-b") == f"atmosphere:migratio:lease:site-a:{image}:site-b"
    )
    assert keys.lease_history("site-a") == "atmosphere:migratio:leases:site-a"
    assert keys.sweep("site-a") == "atmosphere:migratio:sweep:site-a"


def test_one_holder_renewed_fenced_and_released(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease, "RENEW_EVERY", 0.05)
    keys, image = Keys("atmosphere"), "6f3c9a0e-1111-2222-3333-444455556666"
    first = lease.Lease(redis, keys, "site-a", image, "site-b", job_id="job-1")
    second = lease.Lease(redis, keys, "site-a", image, "site-b", job_id="job-2")
    assert first.acquire()
    assert not second.acquire()
    assert (first.holder() or "").startswith("job-1 ")
    cancel = threading.Event()
    with first.held(cancel) as held:
        redis.pexpire(first.key, 200)
        time.sleep(0.5)  # renewed meanwhile: it did not expire
        assert not second.acquire()
        held.fence()
        redis.set(first.key, "someone else")  # taken over (as after an expiry)
        deadline = time.monotonic() + 5
        while not cancel.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cancel.is_set()  # the attempt's transfers are told to stop
        with pytest.raises(lease.LeaseLost, match="lost its lease"):
            held.fence()
    assert redis.get(first.key) == b"someone else"  # a lost lease is not released
    redis.delete(first.key)
    # Redis lost the key (a restart without it) while the holder was in time: taken again
    with first.held(threading.Event()) as held:
        assert first.acquire() is True
        redis.delete(first.key)
        time.sleep(0.3)
        assert (first.holder() or "").startswith("job-1 ")
        held.fence()
    assert first.holder() is None
    # a worker whose horse died releases the horse's lease by job id
    assert second.acquire()
    assert lease.release_job(redis, keys, "site-a", image, "site-b", "job-1") is False
    assert lease.release_job(redis, keys, "site-a", image, "site-b", "job-2") is True
    events = [f[b"event"] for _, f in redis.xrange(keys.lease_history("site-a"))]
    assert events[0] == b"acquired" and b"lost" in events and b"retaken" in events
    assert events[-1] == b"released for a dead process"


def test_the_sweep_removes_only_what_free_pairs_left(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    moto: MotoServer,
) -> None:
    sb = clean_sandbox
    settings = site_settings(sb, tmp_path, redis_server.url, **{"aws-eu": moto.site_conf()})
    keys = Keys(settings.namespace)
    dead, busy, queued, snapped = (f"6f3c9a0e-1111-2222-3333-44445555666{i}" for i in range(4))
    for image_id in (dead, busy):
        workdir = settings.staging_dir / f"{image_id}-site-b"
        workdir.mkdir(parents=True)
        (workdir / "x.qcow2").write_bytes(b"x" * 1000)
    site = settings.sites["site-b"]
    assert isinstance(site, OpenStackSite)
    remote = RemoteGlance(site)
    remote.ssh.run(["mkdir", "-p", ".migratio-staging"], what="make the staging directory",
                   creds=False)  # fmt: skip
    for image_id in (dead, busy):
        remote.ssh.run(["truncate", "-s", "1M", f".migratio-staging/{image_id}-abc.raw.part"],
                       what="make a part", creds=False)  # fmt: skip
    made = sb.destination.client().images.create(
        name="half", disk_format="raw", container_format="bare",
        source_uuid=queued, source_cs="site-a", source_t="site-a",
    )  # fmt: skip
    ec2 = moto.client("ec2")
    volume = ec2.create_volume(Size=1, AvailabilityZone="eu-west-1a")["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    link = {"source_uuid": snapped, "source_t": "site-a"}
    ec2.create_tags(Resources=[snapshot], Tags=[{"Key": k, "Value": v} for k, v in link.items()])
    holder = lease.Lease(redis, keys, "site-a", busy, "site-b", job_id="running")
    assert holder.acquire()

    report = sweep(settings, redis, min_age=0)

    assert sorted(p.name for p in settings.staging_dir.iterdir()) == [f"{busy}-site-b"]
    assert sorted(p.name for p in sb.remote_staging.iterdir()) == [f"{busy}-abc.raw.part"]
    assert sb.destination.find_by_property("source_uuid", queued) == []
    assert snapshot not in [s["SnapshotId"] for s in ec2.describe_snapshots()["Snapshots"]]
    assert len(report.removed) == 4, report.removed
    assert report.busy == [f"{busy} to site-b", f"{busy} to site-b"]
    assert made["id"] not in [i["id"] for i in sb.destination.images()]
    assert holder.holder() is not None  # the busy pair's lease is untouched
    # a second sweep finds nothing more
    assert sweep(settings, redis, min_age=0).removed == []
    # files younger than the retry window are left for the retry
    assert sweep(settings, redis).busy == []


def test_the_sweep_leaves_the_files_of_another_site_on_the_same_account(
    clean_sandbox: Sandbox, tmp_path: Path, redis_server: RedisServer, redis: Redis
) -> None:
    """Two sites reached through one account share its staging directory. The sweep of one,
    whose pair is free, removes its own and untagged (older) files of the image, never
    those of the other site, whose attempt holds its pair's lease."""
    sb = clean_sandbox
    settings = site_settings(sb, tmp_path, redis_server.url, **{"site-t": sb.site_conf.read_text()})
    image_id = "6f3c9a0e-1111-2222-3333-444455556677"
    mine = staging_name(image_id, "0123456789abcdef", "site-b", "qcow2")
    theirs = staging_name(image_id, "0123456789abcdef", "site-t", "qcow2")
    older = f"{image_id}-0123456789ab.qcow2.part"
    for name in (mine, f"{theirs}.0", f"{theirs}.1", older):
        sb.ssh.write_home_file(f".migratio-staging/{name}", "x")
    running = lease.Lease(redis, Keys(settings.namespace), "site-a", image_id, "site-t", job_id="t")
    assert running.acquire()

    sweep(settings, redis, min_age=0)

    assert sorted(p.name for p in sb.remote_staging.iterdir()) == [f"{theirs}.0", f"{theirs}.1"]
    running.release()
    sweep(settings, redis, min_age=0)
    assert list(sb.remote_staging.iterdir()) == []


def test_migrate_by_hand_waits_for_the_running_attempt(
    clean_sandbox: Sandbox, tmp_path: Path, redis_server: RedisServer, redis: Redis
) -> None:
    sb = clean_sandbox
    settings = site_settings(sb, tmp_path, redis_server.url)
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="by-hand", disk_format="qcow2")
    running = lease.Lease(
        redis, Keys(settings.namespace), "site-a", image_id, "site-b", job_id="migratio-job"
    )
    assert running.acquire()
    argv = [sys.executable, "-m", "migratio", "migrate", "--config", str(settings.config_path)]
    proc = subprocess.Popen([*argv, image_id, "site-b"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"Waiting: another migration of image {image_id} to site-b")
        assert "migratio-job" in first
        time.sleep(1)
        assert sb.destination.find_by_property("source_uuid", image_id) == []
        running.release()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert out.splitlines()[-1].startswith("Registered")
    assert_one_copy(sb, image_id, image, tmp_path)


# -- Redis restarted under an upload ---------------------------------------------------------


def wait_for_saving(sb: Sandbox, image_id: str, timeout: float = 120) -> None:
    """Until the destination has a copy of ``image_id`` receiving its bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(
            c["status"] == "saving"
            for c in sb.destination.find_by_property("source_uuid", image_id)
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"no copy of {image_id} started saving within {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bytes_from", "outage"),
    [("file-store", 3.0), ("staged", 3.0), ("staged", lease.TTL + 10)],
    ids=["file-store", "staged", "staged-past-the-lease"],
)
def test_redis_restarted_during_an_api_upload(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    atmosphere: sidekiq.FeedbackServer,
    bytes_from: str,
    outage: float,
) -> None:
    """Redis goes down (SIGKILL, as the OOM killer does) and comes back while REGISTER=api
    uploads: the bytes of the source's file store (hashed on the way) or a staged download
    (sent as it is). The job is not lost, no half-written copy stays, one good copy results.
    Past the lease's TTL the upload ends while Redis is away: its worker is taken for dead,
    and the job's re-run finds the copy."""
    sb = clean_sandbox
    yaml = ""
    if bytes_from == "staged":
        creds = tmp_path / "creds"
        creds.write_text(
            sb.creds_path.read_text().replace(str(sb.source.images_dir), str(tmp_path / "no-store"))
        )
        creds.chmod(0o600)
        yaml = f"credentials_file: {creds}\n"
    settings = site_settings(
        sb, tmp_path, redis_server.url, workers=1,
        **{"site-b-api": sb.site_api_conf.read_text() + "export BWLIMIT=8M\n"},
    )  # fmt: skip
    if yaml:
        settings.config_path.write_text(settings.config_path.read_text() + yaml)
        settings = load_settings(settings.config_path)
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=256 * MiB, data_bytes=64 * MiB)
    image_id = sb.source.upload_image(image, name="restart", disk_format="qcow2")
    jid = push(settings, [image_id, "site-b-api"], OPENSTACK_MIGRATOR)
    with Service(settings) as service:
        wait_for_saving(sb, image_id)
        redis_server.crash()
        time.sleep(outage)
        redis_server.start()
        final = wait_final(redis, jid, timeout=300)
        assert service.stop() == 0
        assert wait_left(service.seen, timeout=10) == []
    assert final.get_status() == "finished", final.exc_info
    assert final.return_value() in {"migrated", "already there"}
    assert_one_copy(sb, image_id, image, tmp_path)
    assert_never_two_at_once(redis, settings)
    assert_no_staging(sb, settings)
    assert_nothing_waiting(redis, settings)
    lines = lines_for(atmosphere, image_id, "site-b-api")
    assert lines[-1].startswith(("Registered", ALREADY_UPLOADED)), lines
