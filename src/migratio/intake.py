"""Taking Atmosphere's jobs without ever losing one, and handing them to RQ.

Each payload moves atomically from Atmosphere's queue into migratio's in-flight list
(``BLMOVE … RIGHT LEFT``: oldest first, as Sidekiq), is handed to RQ under a job id derived
from its Sidekiq ``jid``, and only then leaves the in-flight list. After a crash, whatever is
still in flight is handed over again; the derived job id makes that a no-op for a job RQ
already has, so nothing runs twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from redis import Redis
from rq import Queue, Retry
from rq.job import Job
from rq.queue import EnqueueData

from migratio import metrics
from migratio.config import Settings
from migratio.errors import SiteConfigError, UnknownSiteError
from migratio.keys import Keys, migration_queue
from migratio.sidekiq import BadPayload, MigrationJob, parse_job, push_status

log = logging.getLogger(__name__)

#: most jobs taken from Redis in one iteration
BATCH = 200
#: how long RQ keeps a finished or failed job's record
RESULT_TTL = 7 * 24 * 3600
FAILURE_TTL = 30 * 24 * 3600


def rq_job_id(job: MigrationJob, raw: bytes) -> str:
    """RQ's id for a Sidekiq job: from its jid, else from its bytes (stable across crashes)."""
    return f"migratio-{job.jid or hashlib.sha1(raw).hexdigest()[:24]}"  # noqa: S324


class Intake:
    """One site's intake: Atmosphere's queue → in-flight list → RQ."""

    def __init__(self, settings: Settings, redis: Redis, queue: Queue) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = queue
        self.keys = Keys(settings.namespace)
        self.source = self.keys.queue(migration_queue(settings.name))
        self.inflight = self.keys.inflight(settings.name)
        delays = list(settings.retry_delays)
        self.retry = Retry(max=len(delays), interval=delays) if delays else None

    def recover(self) -> int:
        """Hand over again what a crash left in flight; return how many there were."""
        left = [_bytes(raw) for raw in self.redis.lrange(self.inflight, 0, -1)]
        for raw in reversed(left):  # oldest is at the right
            log.warning("recovering a job left in flight: %.200r", raw)
            self.handle(raw)
        return len(left)

    def run_once(self, timeout: int = 1) -> int:
        """Take the jobs waiting (up to a batch; waiting up to ``timeout`` s for the first).

        Returns how many were taken.
        """
        first = self.redis.blmove(self.source, self.inflight, timeout, "RIGHT", "LEFT")
        if first is None:
            return 0
        batch = [_bytes(first)]
        waiting = min(int(self.redis.llen(self.source)), BATCH - 1)
        if waiting:
            with self.redis.pipeline(transaction=False) as pipe:
                for _ in range(waiting):
                    pipe.lmove(self.source, self.inflight, "RIGHT", "LEFT")
                batch += [_bytes(raw) for raw in pipe.execute() if raw is not None]
        self.handle_batch(batch)
        return len(batch)

    def handle(self, raw: bytes) -> None:
        """Hand one in-flight payload over (see :meth:`handle_batch`)."""
        self.handle_batch([raw])

    def handle_batch(self, batch: list[bytes]) -> None:
        """Hand in-flight payloads to RQ (or to the dead letters), then let them go.

        RQ gets them in one pipeline, in arrival order; a payload whose RQ job already
        exists (handed over before a crash) is not enqueued again.
        """
        jobs: list[tuple[MigrationJob, bytes]] = []
        for raw in batch:
            job = self.understand(raw)
            if job is not None:
                jobs.append((job, raw))
        ids = [rq_job_id(job, raw) for job, raw in jobs]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(Job.key_for(job_id))
            known = pipe.execute()
        fresh, seen = [], set()
        for (job, _), job_id, exists in zip(jobs, ids, known, strict=True):
            if exists or job_id in seen:
                log.info("job %s is already with the workers", job_id)
                continue
            seen.add(job_id)
            fresh.append(self.enqueue_data(job, job_id))
            log.info(
                "job %s: %s of %s to %s queued", job_id, job.kind, job.image_id, job.destination
            )
        with self.redis.pipeline(transaction=False) as pipe:
            if fresh:
                self.queue.enqueue_many(fresh, pipeline=pipe)
                metrics.count_taken(pipe, self.keys, self.settings.name, len(fresh))
            for raw in batch:
                pipe.lrem(self.inflight, 1, raw)  # type: ignore[arg-type]  # redis-py takes bytes
            pipe.execute()

    def understand(self, raw: bytes) -> MigrationJob | None:
        """The job in ``raw``, or None after dead-lettering it with the reason."""
        try:
            job = parse_job(raw)
        except BadPayload as exc:
            self.dead_letter(raw, exc)
            return None
        try:
            self.settings.site(job.destination)
        except UnknownSiteError as exc:  # no config/<destination>.conf
            refused = BadPayload(exc.message, image_id=job.image_id, destination=job.destination)
            self.dead_letter(raw, refused)
            return None
        except SiteConfigError:
            pass  # a broken site file: the job fails with its error and is retried until fixed
        return job

    def enqueue_data(self, job: MigrationJob, job_id: str) -> EnqueueData:
        """RQ's description of the job that runs ``job``."""
        return Queue.prepare_data(
            "migratio.jobs.run_migration",
            kwargs={
                "kind": job.kind,
                "image_id": job.image_id,
                "destination": job.destination,
                "jid": job.jid,
            },
            job_id=job_id,
            description=f"{job.kind} migration of {job.image_id} to {job.destination}",
            timeout=int(self.settings.job_timeout),
            result_ttl=RESULT_TTL,
            failure_ttl=FAILURE_TTL,
            retry=self.retry,
            meta={"jid": job.jid, "enqueued_at": job.enqueued_at},
        )

    def dead_letter(self, raw: bytes, exc: BadPayload) -> None:
        """Keep a payload that cannot run, with why; tell Atmosphere when it can be told."""
        entry = {"reason": exc.message, "at": time.time(), "raw": raw.decode("utf-8", "replace")}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.keys.dead(self.settings.name), json.dumps(entry))
            metrics.count_refused(pipe, self.keys, self.settings.name)
            pipe.execute()
        log.error("refused a job: %s; payload kept in the dead letters: %.200r", exc.message, raw)
        if exc.image_id is not None and exc.destination is not None:
            push_status(
                self.redis,
                self.keys,
                exc.image_id,
                self.settings.name,
                exc.destination,
                f"Error: job refused: {exc.message}",
            )


def _bytes(value: bytes | str) -> bytes:
    """Redis replies are bytes (no decode_responses); the stubs also allow str."""
    return value if isinstance(value, bytes) else value.encode()
