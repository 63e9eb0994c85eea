"""Taking Atmosphere's jobs without ever losing one, and handing each to RQ exactly once.

Each payload moves atomically from Atmosphere's queue into migratio's in-flight list
(``BLMOVE … RIGHT LEFT``: oldest first, as Sidekiq). The hand-over is one MULTI/EXEC
transaction: the RQ jobs (hash and queue entry), the dead letters and their refusal lines, and
the removal from the in-flight list are applied together or not at all. So a payload is either
still in flight or handed over, never half of each, and whatever is in flight after a crash, an
outage or any Redis error is handed over again before anything new is taken.

The client never re-sends a command by itself (``Redis(host=…)`` with redis-py's defaults
re-sends up to 10 times): a re-sent ``EXEC`` whose first reply was lost would hand a job over
twice. Errors go to the caller, who backs off
and comes back; the next iteration recovers what is in flight.

No payload can stop the intake: whatever goes wrong while understanding one (too big, too
deep, not UTF-8, not JSON, wrong types, unknown site, or a bug) dead-letters that payload with
the reason, and the others go on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from redis import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry
from rq import Queue
from rq import Retry as RqRetry
from rq.job import Job, JobStatus
from rq.queue import EnqueueData

from migratio import metrics
from migratio.atmosphere.keys import FEEDBACK_QUEUE, Keys, migration_queue
from migratio.atmosphere.sidekiq import (
    MAX_PAYLOAD_BYTES,
    BadPayload,
    MigrationJob,
    parse_job,
    printable,
    queue_push,
    shown,
    status_payload,
)
from migratio.config import Settings
from migratio.errors import SiteConfigError, UnknownSiteError

log = logging.getLogger(__name__)

#: most jobs, and about the most bytes, taken from Redis in one iteration
BATCH = 200
BATCH_BYTES = 1024 * 1024
#: the dead letters kept: the newest this many (each takes at most ~130 KB: 130 MB at worst)
DEAD_LETTERS_KEPT = 1000
#: bytes of a payload kept as text beside its exact base64 (see Intake.dead_letter)
PREVIEW = 1024
#: how long RQ keeps a finished or failed job's record
RESULT_TTL = 7 * 24 * 3600
FAILURE_TTL = 30 * 24 * 3600
#: longest image id or site id echoed back to Atmosphere in a refusal line
ECHOED = 255

#: move up to ARGV[1] payloads (and about ARGV[2] bytes) from KEYS[1] to KEYS[2], oldest first
_TAKE = """
local taken, size = {}, 0
while #taken < tonumber(ARGV[1]) and size < tonumber(ARGV[2]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not raw then break end
  taken[#taken + 1] = raw
  size = size + #raw
end
return taken
"""
#: the oldest ARGV[1] payloads of KEYS[1] (about ARGV[2] bytes at most), oldest first
_OLDEST = """
local found, size = {}, 0
for i = 1, tonumber(ARGV[1]) do
  local raw = redis.call('LINDEX', KEYS[1], -i)
  if not raw then break end
  found[#found + 1] = raw
  size = size + #raw
  if size >= tonumber(ARGV[2]) then break end
end
return found
"""


def rq_job_id(job: MigrationJob) -> str:
    """RQ's id for a Sidekiq job: from its jid, else a new one.

    A request without a jid is a new request every time it is pushed, even with the same
    bytes; the atomic hand-over is what keeps one payload from being handed over twice.
    """
    return f"migratio-{job.jid or os.urandom(12).hex()}"


def exactly_once(redis: Redis) -> Redis:
    """A client of the same server (and pool settings) that never re-sends a command itself."""
    pool = redis.connection_pool
    kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0), "retry_on_error": []}
    return Redis(
        connection_pool=ConnectionPool(
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **kwargs,
        )
    )


@dataclass(frozen=True)
class _Accepted:
    raw: bytes
    job: MigrationJob
    job_id: str
    data: EnqueueData


class Intake:
    """One site's intake: Atmosphere's queue → in-flight list → RQ (or the dead letters)."""

    def __init__(self, settings: Settings, redis: Redis, queue: Queue) -> None:
        self.settings = settings
        self.redis = exactly_once(redis)
        self.queue = queue
        self.keys = Keys(settings.namespace)
        self.source = self.keys.queue(migration_queue(settings.name))
        self.inflight = self.keys.inflight(settings.name)
        self.dead = self.keys.dead(settings.name)
        delays = list(settings.retry_delays)
        self.retry = RqRetry(max=len(delays), interval=delays) if delays else None
        self._take = self.redis.register_script(_TAKE)
        self._oldest = self.redis.register_script(_OLDEST)
        #: True until what is in flight has been handed over (at start, after any error)
        self.must_recover = True

    def run_once(self, timeout: int = 1) -> int:
        """Hand over what is in flight if needed, then take the jobs waiting (up to a batch).

        Waits up to ``timeout`` s for the first job; returns how many were taken. Any error
        (Redis down, a reply lost) is raised after noting that the in-flight list must be
        handed over again before the next take.
        """
        try:
            if self.must_recover:
                self.recover()
            first = self.redis.blmove(self.source, self.inflight, timeout, "RIGHT", "LEFT")
            if first is None:
                return 0
            batch = [_bytes(first)]
            if len(batch[0]) < BATCH_BYTES:
                more = self._take(
                    keys=[self.source, self.inflight],
                    args=[BATCH - 1, BATCH_BYTES - len(batch[0])],
                )
                batch += [_bytes(raw) for raw in more]
            self.handle_batch(batch)
            return len(batch)
        except BaseException:
            self.must_recover = True
            raise

    def recover(self) -> int:
        """Hand over again whatever is in flight, oldest first; return how many there were."""
        self.must_recover = True
        left = int(self.redis.llen(self.inflight))
        done = 0
        while done < left:
            batch = [
                _bytes(raw)
                for raw in self._oldest(
                    keys=[self.inflight], args=[min(BATCH, left - done), BATCH_BYTES]
                )
            ]
            if not batch:
                break
            for raw in batch:
                log.warning("handing over again a job left in flight: %r", raw[:200])
            self.handle_batch(batch)
            done += len(batch)
        self.must_recover = False
        return done

    def handle_batch(self, batch: list[bytes]) -> None:
        """Hand in-flight payloads to RQ or to the dead letters, and let them go, atomically.

        RQ gets them in arrival order. A job RQ already has (the same Sidekiq jid pushed again,
        or handed over before a crash) is not enqueued again; one whose record was written but
        that is in no queue (a partly applied hand-over) is queued.
        """
        accepted: list[_Accepted] = []
        refused: list[tuple[bytes, BadPayload]] = []
        for raw in batch:
            try:
                job = self.understand(raw)
                job_id = rq_job_id(job)
                accepted.append(_Accepted(raw, job, job_id, self.enqueue_data(job, job_id)))
            except BadPayload as exc:
                # a fresh copy, without traceback or context: those lead back to this frame,
                # and the cycle would keep every refused payload in memory until a gc run
                refusal = BadPayload(
                    exc.message, image_id=exc.image_id, destination=exc.destination
                )
                refused.append((raw, refusal))
            except Exception as exc:  # a bug must not stop the intake: refuse, say why, go on
                log.exception("internal error while reading a payload")
                reason = f"internal error while reading the payload ({type(exc).__name__})"
                refused.append((raw, BadPayload(reason)))
        known = self.with_the_workers([a.job_id for a in accepted if a.job.jid])
        fresh: list[_Accepted] = []
        for item in accepted:
            if item.job_id in known:
                log.info("job %s is already with the workers", item.job_id)
                continue
            known.add(item.job_id)
            fresh.append(item)
        with self.redis.pipeline(transaction=True) as pipe:
            for raw, refusal in refused:
                self.dead_letter(pipe, raw, refusal)
            if refused:  # years of a producer's bug must not fill Redis: the oldest go
                pipe.ltrim(self.dead, 0, DEAD_LETTERS_KEPT - 1)
            if fresh:
                self.queue.enqueue_many([item.data for item in fresh], pipeline=pipe)
                metrics.count_taken(pipe, self.keys, self.settings.name, len(fresh))
            for raw in batch:
                pipe.lrem(self.inflight, 1, raw)  # type: ignore[arg-type]  # redis-py takes bytes
            pipe.execute()
        for item in fresh:
            log.info(
                "job %s: %s of %s to %s queued",
                item.job_id,
                item.job.kind,
                item.job.image_id,
                item.job.destination,
            )
        for raw, refusal in refused:
            log.error(
                "refused a job: %s; payload (%d bytes) kept in the dead letters: %r",
                printable(refusal.message),
                len(raw),
                raw[:200],
            )

    def with_the_workers(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` RQ already has: queued, running, scheduled, finished or failed.

        A job record in state ``queued`` that is neither in the queue nor being taken by a
        worker is not with the workers: a hand-over applied in part (by a version without
        transactions) left it, and it is queued again.
        """
        if not job_ids:
            return set()
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
        known = {job_id for job_id, status in zip(job_ids, statuses, strict=True) if status}
        queued = [
            job_id
            for job_id, status in zip(job_ids, statuses, strict=True)
            if status == JobStatus.QUEUED.value.encode()
        ]
        if queued:
            # one snapshot: a worker moves a job queue → intermediate → started atomically
            with self.redis.pipeline(transaction=True) as pipe:
                for job_id in queued:
                    pipe.hget(Job.key_for(job_id), "status")
                    pipe.lpos(self.queue.key, job_id)
                    pipe.lpos(self.queue.intermediate_queue_key, job_id)
                replies = pipe.execute()
            for index, job_id in enumerate(queued):
                status, in_queue, taken = replies[3 * index : 3 * index + 3]
                if status == JobStatus.QUEUED.value.encode() and in_queue is None and taken is None:
                    log.warning("job %s was recorded but never queued; queuing it", job_id)
                    known.discard(job_id)
        return known

    def understand(self, raw: bytes) -> MigrationJob:
        """The job in ``raw``, or :class:`BadPayload` saying why it cannot run."""
        job = parse_job(raw)
        try:
            self.settings.site(job.destination)
        except UnknownSiteError as exc:  # no config/<destination>.conf
            raise BadPayload(
                exc.message, image_id=job.image_id, destination=job.destination
            ) from None
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

    def dead_letter(self, pipe: Pipeline, raw: bytes, exc: BadPayload) -> None:
        """Add to ``pipe``: keep a payload that cannot run, with why; tell Atmosphere if it can.

        The newest :data:`DEAD_LETTERS_KEPT` are kept (:meth:`handle_batch` trims the list;
        ``migratio_jobs_refused_total`` counts them all). The entry is JSON: ``reason``,
        ``at``, ``size`` and ``raw``: the payload as text, when it is UTF-8 that JSON writes in
        at most twice its size; else its first :data:`PREVIEW` bytes (U+FFFD for what is not
        UTF-8) and ``raw_base64``, the bytes exactly -- so that no entry takes more than
        ~130 KB, whatever the payload (a byte JSON escapes takes 6). ``truncated`` and
        ``sha256`` when it was over ``MAX_PAYLOAD_BYTES`` (only that much of it is kept).
        """
        reason = printable(exc.message)
        kept = raw[:MAX_PAYLOAD_BYTES]
        entry: dict[str, object] = {"reason": reason, "at": time.time(), "size": len(raw)}
        try:
            text: str | None = kept.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and len(json.dumps(text)) <= 2 * len(kept) + 2:
            entry["raw"] = text
        else:
            entry["raw"] = kept[:PREVIEW].decode("utf-8", "replace")
            entry["raw_base64"] = base64.b64encode(kept).decode()
        if len(kept) < len(raw):
            entry["truncated"] = True
            entry["sha256"] = hashlib.sha256(raw).hexdigest()
        pipe.lpush(self.dead, json.dumps(entry))
        metrics.count_refused(pipe, self.keys, self.settings.name)
        if isinstance(exc.image_id, str) and isinstance(exc.destination, str):
            image_id, destination = printable(exc.image_id), printable(exc.destination)
            if len(image_id) <= ECHOED and len(destination) <= ECHOED:
                line = status_payload(
                    image_id, self.settings.name, destination, f"Error: job refused: {reason}"
                )
                queue_push(pipe, self.keys, FEEDBACK_QUEUE, line)
            else:
                log.warning(
                    "not telling Atmosphere: the payload's image id or site is over %d "
                    "characters (%s, %s)",
                    ECHOED,
                    shown(exc.image_id),
                    shown(exc.destination),
                )


def _bytes(value: bytes | str) -> bytes:
    """Redis replies are bytes (no decode_responses); the stubs also allow str."""
    return value if isinstance(value, bytes) else value.encode()
