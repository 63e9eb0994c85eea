"""MAX_PARALLEL: a fair share of the workers for each destination (real Redis, real service)."""

from __future__ import annotations

import re
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer
from tests.sandbox.images import make_raw
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import max_parallel_settings, push, start_service

from migratio.atmosphere.keys import Keys
from migratio.cli import main
from migratio.fair_share import DestinationShare, leave_no_record, wait_off_worker
from migratio.service import rq_queue

MiB = 1024 * 1024


def test_slots_are_capped_given_in_arrival_order_and_freed_by_expiry(redis: Redis) -> None:
    share = DestinationShare(redis, Keys("atmosphere"), "site-a", "site-b", 2, slot_ttl=1.0)
    assert share.take("j1", 1.0).took
    assert share.take("j2", 2.0).took
    later, earlier = share.take("j4", 4.0), share.take("j3", 3.0)
    assert not later.took and not earlier.took
    assert share.waiting() == ["j3", "j4"]  # by arrival, not by when they asked
    assert earlier.running == 2
    share.release("j1")
    assert not share.take("j4", 4.0).took  # j3 arrived first: the free slot is its
    assert share.take("j3", 3.0).took
    assert sorted(share.running()) == ["j2", "j3"]
    # a holder that stops renewing (its worker was killed) loses the slot by itself
    time.sleep(1.2)
    assert share.take("j4", 4.0).took
    assert share.waiting() == []
    assert share.take("j4", 4.0).took  # the same job again (a re-run after a kill) keeps it


def test_only_a_continuation_that_returns_waiting_drops_its_record(redis: Redis) -> None:
    """The record of a ``-wN`` goes only when it returns: one that fails after looking (a
    Redis error, say) is saved by RQ with its TTL, and its next, successful run is recorded."""
    queue = Queue("atmosphere-migratio-site-a", connection=redis, serializer=JSONSerializer)
    first = queue.enqueue("migratio.jobs.run_sweep", job_id="migratio-j1", result_ttl=604800)
    again = wait_off_worker(first, "a test")
    assert again.id == "migratio-j1-w1" and again.result_ttl == 604800
    leave_no_record(first)
    assert first.result_ttl == 604800  # the first job's record stays
    fetched = Job.fetch(again.id, connection=redis, serializer=JSONSerializer)
    third = wait_off_worker(fetched, "a test")
    fetched.save()  # what RQ does with a job that fails (to retry it, or as failed)
    assert Job.fetch(again.id, connection=redis, serializer=JSONSerializer).result_ttl == 604800
    assert third.id == "migratio-j1-w2" and third.result_ttl == 604800
    leave_no_record(fetched)
    assert fetched.result_ttl == 0


def attempts(log: str, images: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Per image: (start, end) of each attempt at migrating it (from worker.log).

    An attempt starts at "Migration started" and ends at "Registered" (site-c, the source's own
    Glance, finds the image itself there: "Requested image was uploaded") or an "Error" (a
    failed attempt, retried).
    """
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
    pattern = (
        stamp
        + r".*\[job \S+ image (\S+)\] status: "
        + r"(Migration started|Registered|Requested image was uploaded|Error)"
    )
    found: dict[str, list[tuple[float, float]]] = {image: [] for image in images}
    started: dict[str, float] = {}
    for when, image, what in re.findall(pattern, log):
        if image not in found:
            continue
        at = datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if what == "Migration started":
            started[image] = at
        elif image in started:
            found[image].append((started.pop(image), at))
    return found


def active(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [image for image in images if image["status"] == "active"]


@pytest.mark.slow
def test_max_parallel_through_the_service(
    redis_server: RedisServer,
    redis: Redis,
    clean_sandbox: Sandbox,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sb = clean_sandbox
    settings = max_parallel_settings(sb, tmp_path, redis_server.url)
    images = []
    for i in range(10):
        raw = make_raw(tmp_path / f"i{i}.raw", virtual_size=2 * MiB, data_bytes=MiB, seed=i)
        images.append(sb.source.upload_image(raw, name=f"t{i}", disk_format="raw"))
    crowded, other = images[:8], images[8:]
    for image_id in crowded:
        push(settings, [image_id, "site-b-api"])
    for image_id in other:
        push(settings, [image_id, "site-c"])
    service = start_service(settings)
    share = DestinationShare(redis, Keys(settings.namespace), settings.name, "site-b-api", 2)
    seen_waiting = False
    shown = ""
    try:
        deadline = time.monotonic() + 400
        while len(active(sb.destination.find_by_property("source_cs", "site-a"))) < len(crowded):
            assert time.monotonic() < deadline, "the migrations did not finish in time"
            assert len(share.running()) <= 2
            if share.waiting() and not seen_waiting:
                seen_waiting = True
                capsys.readouterr()
                assert main(["status", "--config", str(settings.config_path)]) == 0
                shown = capsys.readouterr().out
            time.sleep(0.2)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
    assert seen_waiting
    # migratio status said what waits for which destination
    assert re.search(r"site-b-api: [0-2] of MAX_PARALLEL=2 running, [1-8] waiting", shown)
    assert re.search(r"waits: migratio-\S+", shown)
    log = (settings.log_dir / "worker.log").read_text()
    assert "status: Error" not in log  # uploads at once to the sandbox's Glance all succeed
    to_b, to_c = attempts(log, crowded), attempts(log, other)
    assert all(to_b.values()) and all(to_c.values())
    # at no moment more than two migrations to site-b-api
    spans = [span for spans in to_b.values() for span in spans]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= 2
    # the other destination did not wait for site-b-api's queue to drain
    first_start = {image: min(s for s, _ in spans) for image, spans in {**to_b, **to_c}.items()}
    assert max(first_start[i] for i in other) < max(first_start[i] for i in crowded)
    # those that waited started in the order they arrived: a later one never before an earlier
    # one, except by the moment two jobs let in at the same look (one 15 s scheduler round
    # apart from the next) take to log their first line
    late = crowded[4:]
    for n, earlier in enumerate(late):
        for later in late[n + 1 :]:
            assert first_start[later] > first_start[earlier] - 3.0
    # a continuation that only waited leaves no record (each would be kept for 7 days): per
    # job, the first one (the intake knows a pushed-again job by it) and the one that ran
    assert re.search(r"again as job migratio-\S+-w[2-9]", log), "no job waited twice"
    finished = FinishedJobRegistry(queue=rq_queue(settings, redis)).get_job_ids()
    records = [key.decode() for key in redis.scan_iter("rq:job:migratio-*")]
    continued = [name for name in records if re.search(r"-w\d+$", name)]
    assert continued
    assert len(continued) == len({name.rsplit("-w", 1)[0] for name in continued})
    assert all(f"rq:job:{job_id}" in records for job_id in finished)
