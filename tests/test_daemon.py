"""The service: Atmosphere's jobs in (real Sidekiq client), RQ, status back (real Sidekiq)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from tests.sandbox import sidekiq
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.moto_server import MotoServer
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import (
    descendants,
    push,
    redis_only_settings,
    settings_for,
    start_service,
    wait_for_part,
    worker_argv,
)

from migratio.atmosphere.feedback import AtmosphereSink
from migratio.atmosphere.keys import (
    AMAZON_MIGRATOR,
    FEEDBACK_CLASS,
    FEEDBACK_QUEUE,
    OPENSTACK_MIGRATOR,
    Keys,
    migration_queue,
)
from migratio.cli import main
from migratio.config import Settings
from migratio.service import Service

MiB = 1024 * 1024
IMAGE = "6f3c9a0e-1111-2222-3333-444455556666"


@pytest.fixture
def settings(clean_sandbox: Sandbox, tmp_path: Path, redis_server: RedisServer) -> Settings:
    return settings_for(clean_sandbox, tmp_path, yaml=f"redis_url: {redis_server.url}\n")


@pytest.fixture
def redis_settings(tmp_path: Path, redis_server: RedisServer) -> Settings:
    """Settings for tests that need only Redis (they run, and pass, without the sandbox)."""
    return redis_only_settings(tmp_path, redis_server.url)


def rq_job(redis: Redis, jid: str) -> Job:
    return Job.fetch(f"migratio-{jid}", connection=redis, serializer=JSONSerializer)


def run_worker_burst(settings: Settings) -> None:
    """A real RQ worker (its own process, a forked work-horse per job) until the queue is empty."""
    subprocess.run(worker_argv(settings), check=True, timeout=300)


def test_keys_are_exactly_what_sidekiq_uses() -> None:
    keys = Keys("atmosphere")
    assert keys.queues == "atmosphere:queues"
    assert (
        keys.queue(migration_queue("cyfronet-folsom"))
        == "atmosphere:queue:migration_cyfronet-folsom"
    )
    assert keys.queue(FEEDBACK_QUEUE) == "atmosphere:queue:feedback"
    assert keys.inflight("cyfronet-folsom") == "atmosphere:migratio:inflight:cyfronet-folsom"
    assert keys.dead("cyfronet-folsom") == "atmosphere:migratio:dead:cyfronet-folsom"
    assert keys.metrics("cyfronet-folsom") == "atmosphere:migratio:metrics:cyfronet-folsom"
    assert Keys("").queues == ":queues"  # Ruby's empty namespace is a prefix of ':'
    assert Keys(None).queue("feedback") == "queue:feedback"
    assert FEEDBACK_CLASS == "Atmosphere::UpdateMigrationJobStatusWorker"
    assert OPENSTACK_MIGRATOR == "Migratio::Worker::OpenstackOpenstackMigrator"
    assert AMAZON_MIGRATOR == "Migratio::Worker::OpenstackAmazonMigrator"


@pytest.mark.parametrize("namespace", ["atmosphere", ""])
def test_real_sidekiq_jobs_are_taken_in_order(
    tmp_path: Path, redis_server: RedisServer, redis: Redis, namespace: str
) -> None:
    settings = redis_only_settings(tmp_path, redis_server.url, namespace=namespace)
    assert settings.namespace in {"atmosphere", "air"}
    images = [f"6f3c9a0e-1111-2222-3333-44445555666{i}" for i in range(3)]
    jids = [push(settings, [image, "site-b"]) for image in images]
    service = Service(settings, redis)
    for _ in jids:
        service.run_once()
    keys = Keys(settings.namespace)
    assert redis.llen(keys.queue(migration_queue("site-a"))) == 0
    assert redis.llen(keys.inflight("site-a")) == 0
    assert service.queue.get_job_ids() == [f"migratio-{jid}" for jid in jids]
    assert [rq_job(redis, jid).kwargs["image_id"] for jid in jids] == images


LEGACY_PAYLOADS = {
    # Sidekiq 3.1: no created_at
    "sidekiq-3.1": {"retry": True, "queue": "migration_site-a", "class": OPENSTACK_MIGRATOR,
                    "args": [IMAGE, "site-b"], "jid": "0123456789abcdef01234567",
                    "enqueued_at": 1400000000.1},
    # 4.2 and others: another key order, integer timestamps
    "sidekiq-4.2": {"class": OPENSTACK_MIGRATOR, "args": [IMAGE, "site-b"], "retry": True,
                    "queue": "migration_site-a", "jid": "abcdefabcdefabcdefabcdef",
                    "created_at": 1500000000, "enqueued_at": 1500000000},
    "class-and-args-only": {"args": [IMAGE, "site-b-api"], "class": OPENSTACK_MIGRATOR},
}  # fmt: skip


def test_legacy_payload_shapes_are_accepted(redis_settings: Settings, redis: Redis) -> None:
    settings = redis_settings
    keys = Keys(settings.namespace)
    for body in LEGACY_PAYLOADS.values():
        redis.lpush(keys.queue(migration_queue("site-a")), json.dumps(body))
    service = Service(settings, redis)
    for _ in LEGACY_PAYLOADS:
        service.run_once()
    jobs = [
        Job.fetch(i, connection=redis, serializer=JSONSerializer)
        for i in service.queue.get_job_ids()
    ]
    assert [job.kwargs["destination"] for job in jobs] == ["site-b", "site-b", "site-b-api"]
    assert jobs[0].id == "migratio-0123456789abcdef01234567"
    assert redis.llen(keys.dead("site-a")) == 0


J, OS = json.dumps, OPENSTACK_MIGRATOR
MALFORMED = [
    (b"not json at all", "payload is not JSON", False),
    (b'["an", "array"]', "not an object", False),
    (b'"a string"', "not an object", False),
    (J({"class": "Evil::Worker", "args": [IMAGE, "site-b"]}).encode(), "unknown job class", True),
    (J({"class": OS, "args": [IMAGE]}).encode(), "args must be", False),
    (J({"class": OS, "args": [1, 2]}).encode(), "args must be", False),
    (J({"class": OS, "args": ["x; rm", "site-b"]}).encode(), "not an image id", True),
    (J({"class": OS, "args": [IMAGE, "../etc"]}).encode(), "plain site name", True),
    (J({"class": OS, "args": [IMAGE, "nowhere"]}).encode(), "unknown destina", True),
    ("{\"class\": \"\u00e9\", \"args\": []}".encode(), "unknown job class", False),
]  # fmt: skip


def test_malformed_payloads_are_dead_lettered_and_reported(
    redis_settings: Settings, redis: Redis, atmosphere: sidekiq.FeedbackServer
) -> None:
    settings = redis_settings
    keys = Keys(settings.namespace)
    source = keys.queue(migration_queue("site-a"))
    for raw, _, _ in MALFORMED:
        redis.lpush(source, raw)
    good = push(settings, [IMAGE, "site-b"])
    service = Service(settings, redis)
    for _ in range(len(MALFORMED) + 1):
        service.run_once()
    dead = [json.loads(entry) for entry in reversed(redis.lrange(keys.dead("site-a"), 0, -1))]
    assert [entry["raw"].encode() for entry in dead] == [raw for raw, _, _ in MALFORMED]
    for entry, (_, reason, _) in zip(dead, MALFORMED, strict=True):
        assert reason in entry["reason"]
    # the service is alive and the good job behind them went through
    assert service.queue.get_job_ids() == [f"migratio-{good}"]
    assert redis.llen(keys.inflight("site-a")) == 0
    reported = [raw for raw, _, tell in MALFORMED if tell]
    received = atmosphere.wait_for(len(reported))
    assert len(received) == len(reported)
    assert all(
        line[1] == "site-a" and line[3].startswith("Error: job refused: ") for line in received
    )
    assert received[-1] == [IMAGE, "site-a", "nowhere",
                            "Error: job refused: unknown destination site 'nowhere': there is no "
                            f"{settings.sites_dir / 'nowhere.conf'}"]  # fmt: skip


def test_status_lines_reach_a_real_sidekiq_server(
    redis_settings: Settings, redis: Redis, atmosphere: sidekiq.FeedbackServer
) -> None:
    settings = redis_settings
    sink = AtmosphereSink(redis, Keys(settings.namespace), IMAGE, "site-a", "site-b")
    texts = ["Migration started", "Transferring: 5% (x)", "Transferring: 8% (x)",
             "Transferring: 50% (x)", "Transfered", "Registered", "zażółć ✓"]  # fmt: skip
    for text in texts:
        sink(text)
    expected = [t for t in texts if t != "Transferring: 8% (x)"]  # thinned: < 10 points, < 30 s
    received = atmosphere.wait_for(len(expected))
    assert received == [[IMAGE, "site-a", "site-b", t] for t in expected]
    assert redis.smembers(Keys(settings.namespace).queues) >= {b"feedback"}


def test_recovers_a_job_taken_but_not_handed_over(
    settings: Settings, redis: Redis, atmosphere: sidekiq.FeedbackServer
) -> None:
    """The state a kill -9 between BLMOVE and the hand-over leaves: the job is in flight."""
    keys = Keys(settings.namespace)
    jid = push(settings, [IMAGE, "site-b"])
    raw = redis.lmove(
        keys.queue(migration_queue("site-a")), keys.inflight("site-a"), "RIGHT", "LEFT"
    )
    assert raw is not None
    Service(settings, redis).run_once()  # a new service recovers it
    assert redis.llen(keys.inflight("site-a")) == 0
    assert Service(settings, redis).queue.get_job_ids() == [f"migratio-{jid}"]
    # a second crash after the hand-over but before LREM must not run it twice
    redis.lpush(keys.inflight("site-a"), raw)
    service = Service(settings, redis)
    service.run_once()
    assert service.queue.get_job_ids() == [f"migratio-{jid}"]
    assert redis.llen(keys.inflight("site-a")) == 0
    run_worker_burst(settings)
    # it ran, once: one "Migration started", then the (permanent) failure, then nothing
    atmosphere.wait_for(2)
    time.sleep(1)  # anything further would have arrived by now
    received = [line[3] for line in atmosphere.received() if line[0] == IMAGE]
    assert sum(text.startswith("Migration started") for text in received) == 1


def test_redis_restart_is_waited_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer(tmp_path / "redis") as server:
        settings = redis_only_settings(tmp_path, server.url)
        service = Service(settings, server.client(), sleep=lambda s: time.sleep(min(s, 0.05)))
        service.run_once()
        server.stop()
        caplog.set_level(logging.ERROR, logger="migratio.service")
        for _ in range(6):
            service.run_once()  # never raises
        assert sum("unreachable" in r.message for r in caplog.records) == 1
        server.start()
        jid = push(settings, [IMAGE, "site-b"])
        deadline = time.monotonic() + 20
        while not service.queue.get_job_ids() and time.monotonic() < deadline:
            service.run_once()
        assert service.queue.get_job_ids() == [f"migratio-{jid}"]
        assert service.outage_since is None


def test_a_job_end_to_end_through_the_service(
    redis_server: RedisServer,
    redis: Redis,
    atmosphere: sidekiq.FeedbackServer,
    clean_sandbox: Sandbox,
    moto: MotoServer,
    tmp_path: Path,
) -> None:
    sb = clean_sandbox
    settings = settings_for(
        sb, tmp_path, yaml=f"redis_url: {redis_server.url}\n", **{"aws-eu": moto.site_conf()}
    )
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    image_id = sb.source.upload_image(image, name="template", disk_format="qcow2")
    jid = push(settings, [image_id, "site-b"])
    aws_jid = push(settings, [image_id, "aws-eu"], job_class=AMAZON_MIGRATOR)
    push(settings, [IMAGE, "site-b"], job_class=AMAZON_MIGRATOR)  # the wrong kind of site
    service = Service(settings, redis)
    for _ in range(3):
        service.run_once()
    run_worker_burst(settings)
    [copy] = sb.destination.find_by_property("source_uuid", image_id)
    arrived = tmp_path / "arrived"
    sb.destination.download_to(str(copy["id"]), arrived)
    assert sha256_file(arrived) == sha256_file(image)
    [ami] = moto.client("ec2").describe_images(
        Owners=["self"], Filters=[{"Name": "tag:source_uuid", "Values": [image_id]}]
    )["Images"]
    received = atmosphere.wait_for(9)
    mine = [line[3] for line in received if line[0] == image_id and line[2] == "site-b"]
    assert mine[0].startswith("Migration started")
    assert mine[-1].startswith("Registered")
    assert any(line.startswith("Transfered") for line in mine)
    to_aws = [line[3] for line in received if line[0] == image_id and line[2] == "aws-eu"]
    assert to_aws[0].startswith("Migration started")
    assert to_aws[-1] == f"Registered image {ami['ImageId']} in eu-west-1"
    wrong = [line[3] for line in received if line[0] == IMAGE]
    assert wrong == [
        "Error: site site-b is an OpenStack site, but the job asks for a migration to Amazon"
    ]
    # every log line of the job says which job and which image
    tags = (f"[job migratio-{jid} image {image_id}]", f"[job migratio-{aws_jid} image {image_id}]")
    job_lines = [
        x
        for x in (settings.log_dir / "worker.log").read_text().splitlines()
        if "migratio." in x and image_id in x
    ]
    assert job_lines
    assert all(
        any(tag in x for tag in tags)
        for x in job_lines
        if " migratio.openstack.migration:" in x
        or " migratio.amazon.migration:" in x
        or " migratio.jobs:" in x
    )


def test_sigterm_stops_the_service(redis_settings: Settings, redis: Redis) -> None:
    settings = redis_settings  # needs only Redis
    proc = start_service(settings)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            k.startswith(b"rq:worker:") for k in redis.keys("rq:worker:*")
        ):
            time.sleep(0.2)
        assert redis.keys("rq:worker:*"), "the service started no RQ worker"
        info = subprocess.run(
            [str(Path(sys.executable).parent / "rq"), "info", "--url", settings.redis_url,
             "--serializer", "rq.serializers.JSONSerializer"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "atmosphere-migratio-site-a" in info.stdout  # operators' usual tool sees it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterms_until_it_is_gone_still_exit_0(redis_settings: Settings, redis: Redis) -> None:
    """An operator (or a script) repeating SIGTERM until the service is gone: every one of them
    lands somewhere, also in the interpreter's finalization, which puts back the default
    action of the signals Python handled; the exit is still 0, not killed by SIGTERM."""
    settings = redis_settings
    proc = start_service(settings)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not redis.keys("rq:worker:*"):
            time.sleep(0.1)
        assert redis.keys("rq:worker:*"), "the service started no RQ worker"
        sent = 0
        while proc.poll() is None and sent < 20000:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            sent += 1
            time.sleep(0.0005)
        assert proc.wait(timeout=30) == 0, f"after {sent} SIGTERMs"
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for_copy(sb: Sandbox, image_id: str, timeout: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        copies = sb.destination.find_by_property("source_uuid", image_id)
        if any(c["status"] == "active" for c in copies):
            return copies
        time.sleep(0.5)
    raise AssertionError(f"no active copy within {timeout}s")


@pytest.mark.slow
def test_worker_killed_mid_transfer_is_rerun_and_resumes(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    atmosphere: sidekiq.FeedbackServer,
) -> None:
    sb = clean_sandbox
    settings = settings_for(
        sb, tmp_path, yaml=f"redis_url: {redis_server.url}\nretry_delays: [1, 1, 1]\n"
    )
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=1024 * MiB, data_bytes=400 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    push(settings, [image_id, "site-b"])
    service = start_service(settings)
    try:
        wait_for_part(sb, image_id, 100 * MiB)
        for pid in descendants(service.pid):  # the worker, its work-horse, rsync, ssh: OOM-style
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        copies = wait_for_copy(sb, image_id, timeout=240)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
    assert len(copies) == 1  # exactly one image: the interrupted attempt left nothing behind
    arrived = tmp_path / "arrived"
    sb.destination.download_to(str(copies[0]["id"]), arrived)
    assert sha256_file(arrived) == sha256_file(image)
    lines = [line[3] for line in atmosphere.wait_for(3) if line[0] == image_id]
    assert sum(line.startswith("Migration started") for line in lines) == 2
    [transfered] = [line for line in lines if line.startswith("Transfered")]
    sent_mib = float(transfered.split("(")[1].split(" ")[0])
    assert sent_mib < 300  # resumed: the part that had arrived was not sent again
    # the service says so, once, naming the job and the image
    [lost] = [
        x for x in (settings.log_dir / "migratio.log").read_text().splitlines() if " ERROR " in x
    ]
    assert "its worker stopped answering" in lost and f" image {image_id}]" in lost


@pytest.mark.slow
def test_first_sigterm_lets_the_running_job_finish(
    clean_sandbox: Sandbox, tmp_path: Path, settings: Settings, redis: Redis
) -> None:
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=1024 * MiB, data_bytes=300 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    push(settings, [image_id, "site-b"])
    service = start_service(settings)
    try:
        wait_for_part(sb, image_id, 20 * MiB)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=180) == 0
    finally:
        if service.poll() is None:
            service.kill()
    [copy] = sb.destination.find_by_property("source_uuid", image_id)
    assert copy["status"] == "active"


def test_operator_commands_enqueue_status_retry(
    settings: Settings, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(settings.config_path)
    missing = "6f3c9a0e-1111-2222-3333-999999999999"
    assert main(["enqueue", "--config", config, missing, "site-b"]) == 0
    body = json.loads(capsys.readouterr().out)
    keys = Keys(settings.namespace)
    [raw] = redis.lrange(keys.queue(migration_queue("site-a")), 0, -1)
    assert json.loads(raw) == body  # what was printed is what was pushed
    real = json.loads(redis.lindex(keys.queue(migration_queue("site-a")), 0) or b"{}")
    assert list(real) == ["retry", "queue", "class", "args", "jid", "created_at", "enqueued_at"]
    assert (real["class"], real["args"], real["queue"]) == (
        OPENSTACK_MIGRATOR,
        [missing, "site-b"],
        "migration_site-a",
    )
    assert redis.smembers(keys.queues) == {b"migration_site-a"}

    Service(settings, redis).run_once()
    run_worker_burst(settings)  # the image does not exist: a permanent failure
    job = rq_job(redis, body["jid"])
    assert job.get_status() == "failed"
    assert not job.retries_left  # not retried: it can never succeed

    assert main(["status", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "failed: 1" in out
    assert f"migratio-{body['jid']}" in out and f"image {missing} is not on site site-a" in out
    assert "migratio.errors" not in out  # the operator's message, not the exception's class

    assert main(["retry", "--config", config, f"migratio-{body['jid']}"]) == 0
    assert main(["status", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "queued for the workers (atmosphere-migratio-site-a): 1" in out and "failed: 0" in out
    assert main(["retry", "--config", config, "migratio-nonexistent"]) == 1
