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

from migratio.config import Settings
from migratio.errors import MigratioError
from migratio.keys import Keys, migration_queue
from migratio.sidekiq import BadPayload, MigrationJob, parse_job, push_status

log = logging.getLogger(__name__)

#: waits between RQ's retries of a job that failed for a reason that may pass
RETRY_INTERVALS = (60, 300, 900)
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

    def recover(self) -> int:
        """Hand over again what a crash left in flight; return how many there were."""
        left = [_bytes(raw) for raw in self.redis.lrange(self.inflight, 0, -1)]
        for raw in reversed(left):  # oldest is at the right
            log.warning("recovering a job left in flight: %.200r", raw)
            self.handle(raw)
        return len(left)

    def run_once(self, timeout: int = 1) -> bool:
        """Take at most one job (waiting up to ``timeout`` s); True if there was one."""
        raw = self.redis.blmove(self.source, self.inflight, timeout, "RIGHT", "LEFT")
        if raw is None:
            return False
        self.handle(_bytes(raw))
        return True

    def handle(self, raw: bytes) -> None:
        """Hand one in-flight payload to RQ (or to the dead letters), then let it go."""
        try:
            job = parse_job(raw)
        except BadPayload as exc:
            self.dead_letter(raw, exc)
        else:
            try:
                self.settings.site(job.destination)
            except MigratioError as exc:  # no config/<destination>.conf
                refused = BadPayload(
                    exc.message, image_id=job.image_id, destination=job.destination
                )
                self.dead_letter(raw, refused)
            else:
                self.hand_over(job, raw)
        self.redis.lrem(self.inflight, 1, raw)  # type: ignore[arg-type]  # redis-py takes bytes

    def hand_over(self, job: MigrationJob, raw: bytes) -> None:
        """Enqueue the migration in RQ once, whatever happens around it."""
        job_id = rq_job_id(job, raw)
        if Job.exists(job_id, connection=self.redis):
            log.info("job %s is already with the workers", job_id)
            return
        self.queue.enqueue(
            "migratio.jobs.run_migration",
            kwargs={
                "kind": job.kind,
                "image_id": job.image_id,
                "destination": job.destination,
                "jid": job.jid,
            },
            job_id=job_id,
            description=f"{job.kind} migration of {job.image_id} to {job.destination}",
            job_timeout=int(self.settings.job_timeout),
            result_ttl=RESULT_TTL,
            failure_ttl=FAILURE_TTL,
            retry=Retry(max=len(RETRY_INTERVALS), interval=list(RETRY_INTERVALS)),
        )
        log.info("job %s: %s of %s to %s queued", job_id, job.kind, job.image_id, job.destination)

    def dead_letter(self, raw: bytes, exc: BadPayload) -> None:
        """Keep a payload that cannot run, with why; tell Atmosphere when it can be told."""
        entry = {"reason": exc.message, "at": time.time(), "raw": raw.decode("utf-8", "replace")}
        self.redis.lpush(self.keys.dead(self.settings.name), json.dumps(entry))
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
