"""Watching a running site: ``migratio status`` (text and JSON), the metrics endpoint, the logs."""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from redis import Redis
from tests.sandbox import sidekiq
from tests.sandbox.images import make_qcow2
from tests.sandbox.ports import free_port, wait_port
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox, api_site_conf
from tests.support import descendants, push, redis_only_settings, settings_for, worker_argv

from migratio import metrics
from migratio.atmosphere.keys import AMAZON_MIGRATOR, Keys, migration_queue
from migratio.cli import main
from migratio.config import Settings
from migratio.errors import ConfigError
from migratio.logs import DailyFile
from migratio.service import Service

MiB = 1024 * 1024


def worker_burst(settings: Settings, *, inject_bug: bool = False) -> None:
    """A real ``migratio worker --burst`` (its own process, a forked work-horse per job).

    ``inject_bug`` replaces the migration with a function that raises ZeroDivisionError: the
    only way to have a bug on purpose (this test says so; nothing else is faked).
    """
    argv = ["worker", "--burst", "--config", str(settings.config_path)]
    code = (
        "import sys, migratio.jobs as jobs\n"
        "from migratio.cli import main\n"
        "def bug(*args, **kwargs):\n"
        "    return 1 / 0\n"
        f"if {inject_bug}:\n"
        "    jobs.migrate = bug\n"
        f"sys.exit(main({argv!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def status_json(settings: Settings, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["status", "--json", "--config", str(settings.config_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, dict)
    return data


def error_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " ERROR " in line]


def test_status_shows_a_scheduled_retry_and_the_log_has_one_line_for_it(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = clean_sandbox
    closed = free_port()  # nothing listens: a destination Glance that is down
    settings = settings_for(
        sb,
        tmp_path,
        yaml=f"redis_url: {redis_server.url}\nretry_delays: [600, 900]\n",
        **{
            "site-down": api_site_conf(f"http://127.0.0.1:{closed}"),
        },
    )
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=16 * MiB, data_bytes=2 * MiB)
    image_id = sb.source.upload_image(image, name="template", disk_format="qcow2")
    jid = push(settings, [image_id, "site-down"])
    Service(settings, redis).run_once()
    before = time.time()
    worker_burst(settings)

    config = str(settings.config_path)
    assert main(["status", "--config", config]) == 0
    text = capsys.readouterr().out
    assert "scheduled for a retry: 1" in text
    [line] = [x for x in text.splitlines() if f"migratio-{jid}" in x]
    assert f"openstack migration of {image_id} to site-down, retry at " in line
    assert "1 more after that" in line
    assert f"127.0.0.1:{closed}" in line  # the reason: the operator's message
    assert "migratio.errors" not in text and "Traceback" not in text
    assert "queued for the workers (atmosphere-migratio-site-a): 0" in text
    assert "\nfailed: 0\n" in text

    data = status_json(settings, capsys)
    assert data["version"] == 1 and data["site"] == "site-a"
    counts = data["counts"]
    assert isinstance(counts, dict)
    assert counts == {
        "waiting": 0, "in_flight": 0, "queued": 0, "running": 0, "scheduled": 1,
        "deferred": 0, "failed": 0, "finished": 0, "canceled": 0, "dead_letters": 0,
    }  # fmt: skip
    jobs = data["jobs"]
    assert isinstance(jobs, list)
    [job] = jobs
    assert job["id"] == f"migratio-{jid}" and job["state"] == "scheduled"
    assert (job["image_id"], job["destination"], job["kind"]) == (
        image_id,
        "site-down",
        "openstack",
    )
    assert before + 590 < job["retry_at"] < time.time() + 610
    assert job["retries_left"] == 1
    assert f"127.0.0.1:{closed}" in job["error"] and "migratio.errors" not in job["error"]

    # the worker's log: one ERROR line for the failure, with the job and the image; no traceback
    log = settings.log_dir / "worker.log"
    [error] = error_lines(log)
    assert f"[job migratio-{jid} image {image_id}]" in error and "retry in 600 s" in error
    assert "Traceback" not in log.read_text()
    # every line about the job says which job and which image
    about = [x for x in log.read_text().splitlines() if f"migratio-{jid}" in x]
    assert about and all(image_id in x for x in about)

    # and Atmosphere's queue, RQ's and the metrics agree
    families = collect(settings, redis)
    assert sample(families, "migratio_jobs_retried_total", destination="site-down") == 1
    assert sample(families, "migratio_jobs", state="scheduled") == 1


def test_a_failed_job_has_one_error_line_and_a_bug_has_its_traceback(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_for(clean_sandbox, tmp_path, yaml=f"redis_url: {redis_server.url}\n")
    missing = "6f3c9a0e-1111-2222-3333-999999999999"
    first = push(settings, [missing, "site-b"])  # no such image: fails for good
    wrong = "6f3c9a0e-1111-2222-3333-777777777777"  # an Amazon job for an OpenStack site
    [amazon] = sidekiq.push(
        settings.redis_url, settings.namespace, migration_queue("site-a"), AMAZON_MIGRATOR,
        [wrong, "site-b"],
    )  # fmt: skip
    Service(settings, redis).run_once()
    worker_burst(settings)
    log = settings.log_dir / "worker.log"
    errors = error_lines(log)
    assert len(errors) == 2  # one line per failed job
    [error] = [x for x in errors if f"migratio-{first}" in x]
    assert f"[job migratio-{first} image {missing}]" in error
    assert f"image {missing} is not on site site-a (not retried)" in error
    [error] = [x for x in errors if f"migratio-{amazon}" in x]
    assert f"[job migratio-{amazon} image {wrong}]" in error
    assert "site site-b is an OpenStack site, but the job asks for a migration to Amazon" in error
    assert "Traceback" not in log.read_text()
    assert "cleaning registries" not in log.read_text()  # RQ's routine upkeep: not an event

    second = push(settings, ["6f3c9a0e-1111-2222-3333-888888888888", "site-b"])
    Service(settings, redis).run_once()
    worker_burst(settings, inject_bug=True)
    text = log.read_text()
    bug_errors = [x for x in error_lines(log) if f"migratio-{second}" in x]
    assert len(bug_errors) == 1 and "internal error" in bug_errors[0]
    assert text.count("Traceback (most recent call last)") == 1  # ours; RQ adds none
    assert "ZeroDivisionError: division by zero" in text

    data = status_json(settings, capsys)
    counts = data["counts"]
    assert isinstance(counts, dict)
    assert (counts["failed"], counts["scheduled"]) == (2, 1)  # a bug may pass: it is retried
    jobs = data["jobs"]
    assert isinstance(jobs, list)
    reasons = {job["id"]: job["error"] for job in jobs}
    assert reasons[f"migratio-{first}"] == f"image {missing} is not on site site-a"
    assert reasons[f"migratio-{second}"].startswith(
        "internal error (ZeroDivisionError: division by zero)"
    )
    families = collect(settings, redis)
    assert sample(families, "migratio_jobs_failed_total", reason="ImageNotFoundError") == 1
    assert sample(families, "migratio_jobs_retried_total", reason="InternalError") == 1


# --- the metrics endpoint ------------------------------------------------------------------


def collect(settings: Settings, redis: Redis) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One scrape's samples, read through the collector the endpoint serves."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.MetricsCollector(settings, redis, None))  # type: ignore[arg-type]
    return parse(generate_latest(registry).decode())


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return samples


def sample(
    families: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for found, value in families.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


@pytest.mark.slow
def test_metrics_endpoint_during_a_real_migration(
    clean_sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sb = clean_sandbox
    port = free_port()
    with RedisServer(tmp_path / "redis") as server:
        settings = settings_for(
            sb, tmp_path, yaml=f"redis_url: {server.url}\nmetrics_port: {port}\n"
        )
        image = make_qcow2(tmp_path / "t.qcow2", virtual_size=512 * MiB, data_bytes=128 * MiB)
        image_id = sb.source.upload_image(image, name="template", disk_format="qcow2")
        env = {**os.environ, "MIGRATIO_CONFIG": str(settings.config_path)}
        service = subprocess.Popen([sys.executable, "-m", "migratio", "run"], env=env)
        try:
            assert wait_port(port, timeout=20), "no metrics endpoint"
            before = scrape(port)
            assert sample(before, "migratio_redis_up") == 1
            assert sample(before, "migratio_jobs_taken_total") == 0
            assert sample(before, "migratio_jobs_succeeded_total") == 0
            assert sample(before, "migratio_info", site="site-a") == 1
            push(settings, [image_id, "site-b"])
            seen_running = False
            running: list[dict[str, object]] = []
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                now = scrape(port)
                if sample(now, "migratio_jobs", state="running") == 1:
                    seen_running = True
                    if not running:  # what 'status' says of a running job, once it said one
                        jobs = status_json(settings, capsys)["jobs"]
                        assert isinstance(jobs, list)
                        running = [j for j in jobs if j["state"] == "running" and j["status"]]
                if sample(now, "migratio_jobs_succeeded_total", destination="site-b") == 1:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the migration did not succeed in time")
            assert seen_running, "no scrape saw the job running"
            assert running, "'status' never showed the running job's status line"
            [job] = running
            assert job["image_id"] == image_id and job["destination"] == "site-b"
            assert isinstance(job["age_seconds"], float) and 0 <= job["age_seconds"] < 120
            assert job["started_at"] is not None
            assert str(job["status"]).startswith(("Migration started", "Downloading", "Transfer"))
            assert isinstance(job["status_at"], float)
            assert sample(now, "migratio_jobs_taken_total") == 1
            deadline = time.monotonic() + 10  # RQ files the job as finished just after
            while sample(now, "migratio_jobs", state="running") != 0:
                assert time.monotonic() < deadline, "the job still shows as running"
                time.sleep(0.1)
                now = scrape(port)
            assert sample(now, "migratio_bytes_moved_total", destination="site-b") > 100 * MiB
            count = sample(now, "migratio_migration_duration_seconds_count", outcome="succeeded")
            assert count == 1
            assert sample(now, "migratio_migration_duration_seconds_sum") > 0
            assert sample(now, "migratio_redis_outages_total") == 0

            server.stop()  # an outage: the endpoint still answers, and counts it
            deadline = time.monotonic() + 30
            while sample(scrape(port), "migratio_redis_outages_total") != 1:
                assert time.monotonic() < deadline, "the outage was not counted"
                time.sleep(0.2)
            assert sample(scrape(port), "migratio_redis_up") == 0
            server.start()
            deadline = time.monotonic() + 30
            while sample(scrape(port), "migratio_redis_up") != 1:
                assert time.monotonic() < deadline, "Redis is back but not seen"
                time.sleep(0.2)
        finally:
            service.send_signal(signal.SIGTERM)
            assert service.wait(timeout=60) == 0


def test_metrics_collector_reads_counters_from_every_process(
    tmp_path: Path, redis_server: RedisServer, redis: Redis
) -> None:
    settings = redis_only_settings(tmp_path, redis_server.url)
    keys = Keys(settings.namespace)
    for seconds in (5.0, 45.0, 50000.0):  # as three work-horses would, each its own client
        metrics.count_attempt(
            Redis.from_url(settings.redis_url), keys, "site-a", outcome="succeeded",
            kind="openstack", destination="site-b", seconds=seconds, bytes_moved=1000,
        )  # fmt: skip
    metrics.count_attempt(
        redis, keys, "site-a", outcome="retried", kind="amazon", destination="aws",
        seconds=1.0, reason="AwsError",
    )  # fmt: skip
    families = collect(settings, redis)
    assert sample(families, "migratio_bytes_moved_total", destination="site-b") == 3000
    assert sample(families, "migratio_jobs_succeeded_total") == 3
    assert sample(families, "migratio_jobs_retried_total", reason="AwsError") == 1
    buckets = {
        labels["le"]: value
        for labels, value in families["migratio_migration_duration_seconds_bucket"]
        if labels["outcome"] == "succeeded"
    }
    assert buckets["10.0"] == 1 and buckets["60.0"] == 2 and buckets["43200.0"] == 2
    assert buckets["+Inf"] == 3
    assert sample(families, "migratio_migration_duration_seconds_sum", kind="openstack") == 50050
    assert redis.hget(keys.metrics("site-a"), "jobs_succeeded|destination=site-b") == b"3"

    # the intake counts what it takes and what it refuses
    push(settings, ["6f3c9a0e-1111-2222-3333-444455556666", "site-b"])
    redis.lpush(keys.queue(migration_queue("site-a")), b"not json")
    service = Service(settings, redis)
    service.run_once()
    service.run_once()
    families = collect(settings, redis)
    assert sample(families, "migratio_jobs_taken_total") == 1
    assert sample(families, "migratio_jobs_refused_total") == 1
    assert sample(families, "migratio_jobs", state="queued") == 1
    assert sample(families, "migratio_jobs", state="dead_letters") == 1


@pytest.mark.parametrize(
    ("yaml", "reason"),
    [
        ("metrics_port: 0\n", "'metrics_port' must be a TCP port"),
        ("metrics_port: 70000\n", "'metrics_port' must be a TCP port"),
        ("metrics_port: '9187'\n", "'metrics_port' must be a TCP port"),
        ("metrics_address: localhost\n", "'metrics_address' must be an IP address"),
        ("log_keep_days: -1\n", "'log_keep_days' must be a whole number"),
    ],
)
def test_bad_metrics_and_log_settings(tmp_path: Path, yaml: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        redis_only_settings(tmp_path, "redis://127.0.0.1:6379/0", yaml=yaml)


def test_metrics_default_off_and_busy_port_is_a_config_error(tmp_path: Path) -> None:
    settings = redis_only_settings(tmp_path, "redis://127.0.0.1:6379/0")
    assert settings.metrics_port is None and settings.log_keep_days == 90
    metrics.serve(settings)  # off: nothing listens, nothing fails
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        settings = redis_only_settings(
            tmp_path, "redis://127.0.0.1:6379/0", yaml=f"metrics_port: {taken}\n"
        )
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{taken}"):
            metrics.serve(settings)


# --- log rotation ----------------------------------------------------------------------------


def record(text: str, when: float) -> logging.LogRecord:
    rec = logging.LogRecord("migratio.test", logging.INFO, __file__, 1, text, None, None)
    rec.created = when
    return rec


def day(days_ago: int) -> float:
    return time.time() - days_ago * 86400


def test_log_files_rotate_daily_across_processes_and_keep_a_count(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    one, two = DailyFile(path, keep=3), DailyFile(path, keep=3)  # two processes' handlers
    for handler in (one, two):
        handler.setFormatter(logging.Formatter("%(message)s"))
    one.emit(record("old line", day(1)))
    two.emit(record("another old line", day(1)))
    yesterday = datetime.date.fromtimestamp(day(1))
    os.utime(path, (day(1), day(1)))
    one.emit(record("new line", day(0)))  # the first line of today rotates
    two.emit(record("new line from two", day(0)))  # the other one reopens, does not rotate again
    rotated = tmp_path / f"worker.log.{yesterday.isoformat()}"
    assert rotated.read_text() == "old line\nanother old line\n"
    assert path.read_text() == "new line\nnew line from two\n"

    # older days: the newest rotated file stays plain, older ones are gzipped, 3 are kept
    for age in range(2, 7):
        old = tmp_path / f"worker.log.{datetime.date.fromtimestamp(day(age)).isoformat()}"
        old.write_text(f"day -{age}\n")
        os.utime(old, (day(age), day(age)))
    os.utime(rotated, (day(1), day(1)))
    os.utime(path, (day(1) + 60, day(1) + 60))  # as if today's lines were yesterday's
    one.checked = None
    one.emit(record("next", day(0)))
    kept = {p.name for p in tmp_path.iterdir() if p.name.startswith("worker.log.")}
    two_days = datetime.date.fromtimestamp(day(2)).isoformat()
    assert kept == {
        f"worker.log.{yesterday.isoformat()}.1",  # the one just rotated stays plain
        f"worker.log.{yesterday.isoformat()}.gz",
        f"worker.log.{two_days}.gz",
    }
    with gzip.open(tmp_path / f"worker.log.{yesterday.isoformat()}.gz", "rt") as packed:
        assert packed.read() == "old line\nanother old line\n"
    assert path.read_text() == "next\n"
    one.close()
    two.close()


def test_log_rotation_off_leaves_it_to_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "migratio.log"
    handler = DailyFile(path, keep=0)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(record("a", day(3)))
    os.utime(path, (day(3), day(3)))
    handler.emit(record("b", day(0)))
    assert path.read_text() == "a\nb\n"
    path.rename(tmp_path / "migratio.log.1")  # logrotate without copytruncate
    handler.emit(record("c", day(0)))
    assert path.read_text() == "c\n"
    handler.close()


def _write_lines(path: str, start: object, count: int) -> None:
    """One process's handler writing ``count`` lines as soon as ``start`` is set."""
    handler = DailyFile(Path(path), keep=5)
    handler.setFormatter(logging.Formatter("%(message)s"))
    start.wait()  # type: ignore[attr-defined]
    for i in range(count):
        handler.emit(record(f"{os.getpid()} {i}", time.time()))
    handler.close()


def test_log_rotation_by_many_processes_at_once_loses_no_line(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    path.write_text("yesterday's line\n")
    os.utime(path, (day(1), day(1)))
    context = multiprocessing.get_context("fork")  # as RQ forks its work-horses
    start = context.Event()
    procs = [context.Process(target=_write_lines, args=(str(path), start, 500)) for _ in range(6)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    yesterday = datetime.date.fromtimestamp(day(1)).isoformat()
    assert (tmp_path / f"worker.log.{yesterday}").read_text() == "yesterday's line\n"
    lines = path.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 6 * 500  # every line, once, in today's file
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "worker.log",
        f"worker.log.{yesterday}",
    ]


@pytest.mark.slow
def test_a_job_over_its_time_limit_has_one_error_line(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = clean_sandbox
    settings = settings_for(
        sb, tmp_path, yaml=f"redis_url: {redis_server.url}\njob_timeout: 1\nretry_delays: []\n"
    )
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=512 * MiB, data_bytes=192 * MiB)
    image_id = sb.source.upload_image(image, name="template", disk_format="qcow2")
    jid = push(settings, [image_id, "site-b"])
    Service(settings, redis).run_once()
    worker_burst(settings)
    log = settings.log_dir / "worker.log"
    [error] = error_lines(log)
    assert f"[job migratio-{jid} image {image_id}]" in error
    assert "the migration ran longer than job_timeout (1 s) (not retried)" in error
    assert "Traceback" not in log.read_text()
    [job] = status_json(settings, capsys)["jobs"]  # type: ignore[misc]
    assert job["state"] == "failed"
    assert job["error"] == "the migration ran longer than job_timeout (1 s)"
    assert not sb.destination.find_by_property("source_uuid", image_id)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.slow
def test_a_killed_work_horse_gives_one_line_and_a_reason(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = clean_sandbox
    settings = settings_for(sb, tmp_path, yaml=f"redis_url: {redis_server.url}\n")
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=1024 * MiB, data_bytes=300 * MiB)
    image_id = sb.source.upload_image(image, name="template", disk_format="qcow2")
    jid = push(settings, [image_id, "site-b"])
    Service(settings, redis).run_once()
    worker = subprocess.Popen(worker_argv(settings))
    below: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not children(worker.pid):  # the work-horse RQ forks for the job
            assert time.monotonic() < deadline, "no work-horse"
            time.sleep(0.05)
        time.sleep(1)  # into the migration
        [horse] = children(worker.pid)
        below = descendants(horse)  # its rsync and ssh, if any: tidied up below
        os.kill(horse, signal.SIGKILL)  # as the OOM killer does
        assert worker.wait(timeout=60) == 0  # the worker itself carries on
    finally:
        if worker.poll() is None:
            worker.kill()
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    log = settings.log_dir / "worker.log"
    [error] = error_lines(log)
    assert f"[job migratio-{jid} image {image_id}]" in error
    assert "the process running it died (killed by signal 9" in error and "retry in 60 s" in error
    assert "Traceback" not in log.read_text() and " WARNING " not in log.read_text()
    [job] = status_json(settings, capsys)["jobs"]  # type: ignore[misc]
    assert job["state"] == "scheduled" and "killed by signal 9" in job["error"]
    families = collect(settings, redis)
    assert sample(families, "migratio_jobs_retried_total", reason="WorkerLost") == 1
