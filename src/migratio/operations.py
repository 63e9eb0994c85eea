"""What operators ask of a running site: ``migratio status`` and ``migratio retry``."""

from __future__ import annotations

import json
from collections.abc import Iterator

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from migratio.config import Settings
from migratio.errors import MigratioError
from migratio.keys import Keys, migration_queue
from migratio.redis_client import redacted
from migratio.service import rq_queue

SHOWN = 20


def operator_status(settings: Settings, redis: Redis) -> Iterator[str]:
    """Lines describing the queues, running, failed and refused jobs."""
    keys = Keys(settings.namespace)
    queue = rq_queue(settings, redis)
    yield f"site {settings.name}, Redis {redacted(settings.redis_url)}"
    yield f"waiting in Atmosphere's queue ({keys.queue(migration_queue(settings.name))}): " + str(
        redis.llen(keys.queue(migration_queue(settings.name)))
    )
    yield f"in flight (taken, not yet handed over): {redis.llen(keys.inflight(settings.name))}"
    yield f"queued for the workers ({queue.name}): {queue.count}"
    started = StartedJobRegistry(queue=queue)
    yield f"running: {started.count}"
    for job in _jobs(started.get_job_ids()[:SHOWN], redis):
        yield f"  {job.id}  {job.description}: {job.meta.get('status', 'starting')}"
    failed = FailedJobRegistry(queue=queue)
    yield f"failed: {failed.count}"
    for job in _jobs(failed.get_job_ids()[:SHOWN], redis):
        result = job.latest_result()
        reason = (result.exc_string or "").strip().splitlines() if result is not None else []
        yield f"  {job.id}  {job.description}: {reason[-1] if reason else 'unknown'}"
    dead = redis.lrange(keys.dead(settings.name), 0, SHOWN - 1)
    yield f"refused payloads (dead letters, {keys.dead(settings.name)}): " + str(
        redis.llen(keys.dead(settings.name))
    )
    for raw in dead:
        entry = json.loads(raw)
        yield f"  {entry['reason']}: {entry['raw'][:120]}"


def _jobs(job_ids: list[str], redis: Redis) -> Iterator[Job]:
    for job_id in job_ids:
        try:
            yield Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        except NoSuchJobError:
            continue


def retry_failed(settings: Settings, redis: Redis, job_id: str) -> None:
    """Put a failed job back on the queue."""
    registry = FailedJobRegistry(queue=rq_queue(settings, redis))
    if job_id not in registry.get_job_ids():
        raise MigratioError(f"no failed job {job_id} (see 'migratio status')")
    registry.requeue(job_id)
