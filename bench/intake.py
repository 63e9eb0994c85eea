"""Benchmark: how fast the service takes Atmosphere's jobs in, and push → start latency.

1. 10,000 jobs pushed with the real Sidekiq client (Debian's ruby-sidekiq, as Atmosphere),
   then the service's loop drains them into RQ: jobs per second taken in.
2. With ``migratio run`` and one idle worker, jobs pushed one at a time (no-op migrations:
   the destination already has the image): from Sidekiq's ``enqueued_at`` to RQ's
   ``started_at`` on the worker.

    .venv/bin/python bench/intake.py [--jobs 10000] [--samples 100]

Targets (issue 3): >= 2,000 jobs/s taken in; push → start p50 <= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._measure import verdict  # noqa: E402
from bench._sandbox import sandbox_with_redis  # noqa: E402
from redis import Redis  # noqa: E402
from rq.job import Job, JobStatus  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402
from tests.sandbox import sidekiq  # noqa: E402
from tests.sandbox.images import make_qcow2  # noqa: E402

from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, Keys, migration_queue  # noqa: E402
from migratio.openstack.migration import migrate_to_openstack  # noqa: E402
from migratio.request import MigrationRequest  # noqa: E402
from migratio.service import Service  # noqa: E402

MiB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()

    with sandbox_with_redis() as site:
        server, sb, settings, work = site.server, site.sandbox, site.settings, site.work
        redis = server.client()
        keys = Keys(settings.namespace)
        queue = migration_queue(settings.name)

        # 1. intake rate
        started = time.perf_counter()
        sidekiq.push(
            server.url, settings.namespace, queue, OPENSTACK_MIGRATOR,
            [str(uuid.uuid4()), "site-b-api"], count=args.jobs,
        )  # fmt: skip
        pushed = time.perf_counter() - started
        service = Service(settings, redis)
        started = time.perf_counter()
        while redis.llen(keys.queue(queue)):
            service.run_once()
        intake = time.perf_counter() - started
        taken = service.queue.count
        rate = taken / intake
        redis.flushall()

        # 2. push -> start latency, no-op migrations on an idle worker
        image = make_qcow2(work / "t.qcow2", virtual_size=16 * MiB, data_bytes=MiB)
        image_id = sb.source.upload_image(image, name="bench", disk_format="qcow2")
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-b-api"), lambda _: None)
        env = {**os.environ, "MIGRATIO_CONFIG": str(site.config)}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "migratio", "run"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        latencies = []
        try:
            time.sleep(3)  # let the worker register and go idle
            for _ in range(args.samples):
                [jid] = sidekiq.push(
                    server.url, settings.namespace, queue, OPENSTACK_MIGRATOR,
                    [image_id, "site-b-api"],
                )  # fmt: skip
                job = wait_finished(redis, f"migratio-{jid}")
                body = json.loads(redis.lindex(keys.queue("feedback"), -1) or b"{}")
                assert body.get("args", [None])[0] == image_id
                assert job.started_at is not None
                latencies.append(job.started_at.timestamp() - job.meta["enqueued_at"])
                redis.delete(keys.queue("feedback"))
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)

    p50 = statistics.median(latencies) * 1000
    p95 = statistics.quantiles(latencies, n=20)[-1] * 1000
    print(f"pushed {args.jobs} jobs with the real Sidekiq client in {pushed:.1f} s")
    print(f"taken in: {taken} jobs in {intake:.2f} s = {rate:,.0f} jobs/s (target >= 2,000) "
          f"{verdict(rate >= 2000)}")  # fmt: skip
    print(f"push -> start on an idle worker ({len(latencies)} no-op jobs): p50 {p50:.0f} ms, "
          f"p95 {p95:.0f} ms (target p50 <= 100 ms) {verdict(p50 <= 100)}")  # fmt: skip
    return 0


def wait_finished(redis: Redis, job_id: str, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        except Exception:
            time.sleep(0.005)
            continue
        if job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED):
            return job
        time.sleep(0.005)
    raise SystemExit(f"job {job_id} did not finish")


if __name__ == "__main__":
    sys.exit(main())
