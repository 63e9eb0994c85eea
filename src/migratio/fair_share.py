"""A fair share for each destination: at most ``MAX_PARALLEL`` of its migrations run at once.

Each destination has, in Redis, a set of *slots* (the jobs running to it, each with an expiry
that a thread of the running job keeps pushing back, so a killed worker frees its slot within
:data:`SLOT_TTL` seconds) and a *queue of waiters* ordered by arrival. A job takes a slot when
fewer than ``MAX_PARALLEL`` run and no earlier waiter is still owed one; otherwise it joins the
waiters and leaves its worker: it is put back as a new RQ job ``<first job id>-wN`` that runs
again in ``delay`` seconds (RQ's scheduled registry, which the service moves on), so the other
destinations' jobs take the workers meanwhile. Waiters start in arrival order; a waiter that
stops coming back (its job deleted) is forgotten after :data:`WAITER_TTL` seconds.

The decision is one Lua script, so any number of workers on any number of hosts share it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from migratio.atmosphere.keys import Keys

log = logging.getLogger(__name__)

#: seconds a slot lives without renewal (what a killed worker holds it for at most)
SLOT_TTL = 60
#: seconds between renewals of a held slot
RENEW_EVERY = 10
#: seconds after which a waiter that has not come back is forgotten
WAITER_TTL = 600
#: seconds a waiting job stays off the workers before it looks again
WAIT_DELAY = 10

# KEYS: slots (zset job → expiry), waiters (zset job → arrival), seen (zset job → last look)
# ARGV: job, arrival, cap, slot ttl, waiter ttl.  Returns {took, running, ahead}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[5]))) do
  redis.call('ZREM', KEYS[2], gone)
  redis.call('ZREM', KEYS[3], gone)
end
local me = ARGV[1]
if redis.call('ZSCORE', KEYS[1], me) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), me)
  return {1, redis.call('ZCARD', KEYS[1]), 0}
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], me)
redis.call('ZADD', KEYS[3], now, me)
local running = redis.call('ZCARD', KEYS[1])
local ahead = redis.call('ZRANK', KEYS[2], me)
if running + ahead < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), me)
  redis.call('ZREM', KEYS[2], me)
  redis.call('ZREM', KEYS[3], me)
  return {1, running + 1, ahead}
end
return {0, running, ahead}
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""


@dataclass(frozen=True)
class Turn:
    """The answer to "may this job run now?"."""

    took: bool
    running: int
    ahead: int


class DestinationShare:
    """The slots and the waiters of one destination of one source site."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        site: str,
        destination: str,
        cap: int,
        *,
        slot_ttl: float = SLOT_TTL,
    ) -> None:
        self.redis = redis
        self.destination = destination
        self.cap = cap
        self.slot_ttl = slot_ttl
        self.slots = keys.running(site, destination)
        self.waiters = keys.waiting(site, destination)
        self.seen = keys.waiting_seen(site, destination)

    def take(self, job_id: str, arrival: float) -> Turn:
        """Take a slot for ``job_id`` (first arrived at ``arrival``), or join the waiters."""
        took, running, ahead = self.redis.eval(
            _TAKE,
            3,
            self.slots,
            self.waiters,
            self.seen,
            job_id,
            repr(arrival),
            self.cap,
            self.slot_ttl,
            WAITER_TTL,
        )
        return Turn(bool(took), int(running), int(ahead))

    def release(self, job_id: str) -> None:
        self.redis.zrem(self.slots, job_id)

    def renew(self, job_id: str) -> None:
        self.redis.eval(_RENEW, 1, self.slots, job_id, self.slot_ttl)

    @contextmanager
    def held(self, job_id: str) -> Iterator[None]:
        """Keep the slot renewed while the block runs; free it at the end."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(RENEW_EVERY):
                try:
                    self.renew(job_id)
                except RedisError as exc:
                    log.warning("cannot renew the slot to %s: %s", self.destination, exc)

        thread = threading.Thread(target=renew, name="slot", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            try:
                self.release(job_id)
            except RedisError as exc:
                log.warning("cannot free the slot to %s (%s); it expires", self.destination, exc)

    def running(self) -> list[str]:
        """The jobs holding a slot now (by this host's clock)."""
        live = self.redis.zrangebyscore(self.slots, time.time(), "+inf")
        return [_text(m) for m in live]  # type: ignore[arg-type]

    def waiting(self) -> list[str]:
        """The jobs waiting for a slot, first arrived first."""
        return [_text(m) for m in self.redis.zrange(self.waiters, 0, -1)]  # type: ignore[arg-type]


def first_job(job: Job) -> tuple[str, float]:
    """The id and arrival time of the job that ``job`` continues (itself, unless it waited)."""
    first = str(job.meta.get("first_job", job.id))
    arrival = job.meta.get("arrived")
    if arrival is None:
        stamp = job.enqueued_at or job.created_at
        arrival = stamp.timestamp() if stamp is not None else 0.0
    return first, float(arrival)


def wait_off_worker(job: Job, reason: str, delay: int = WAIT_DELAY) -> Job:
    """Run ``job`` again in ``delay`` seconds as a new job ``<first>-wN``; return that job.

    The new job keeps the function, arguments, timeouts, retries left and the first job's
    arrival; its meta says what it waits for (``migratio status`` shows it).

    Once ``job`` has nothing left to do but return, :func:`leave_no_record` drops its record.
    """
    waits = int(job.meta.get("waits", 0)) + 1
    first, arrival = first_job(job)
    queue = Queue(job.origin, connection=job.connection, serializer=JSONSerializer)
    retry = None
    if job.retries_left:
        retry = Retry(max=job.retries_left, interval=list(job.retry_intervals or [0]))
    meta = {k: v for k, v in job.meta.items() if k not in {"status", "status_at", "error"}}
    meta.update(waits=waits, first_job=first, arrived=arrival, waiting_for=reason)
    return queue.enqueue_in(
        timedelta(seconds=delay),
        str(job.func_name),
        kwargs=job.kwargs,
        job_id=f"{first}-w{waits}",
        description=job.description,
        job_timeout=job.timeout,
        result_ttl=job.result_ttl,
        failure_ttl=job.failure_ttl,
        retry=retry,
        meta=meta,
    )


def leave_no_record(job: Job) -> None:
    """Let RQ delete ``job``'s record when it returns, if it continued an earlier job and
    only waited: a job that waits an hour looks 150-360 times, and each record would be kept
    for its result TTL (7 days). The first job's record stays: the intake knows a
    pushed-again job by it. Only for a job that returns now: should it fail instead, RQ would
    save the TTL with it, and a later successful run would leave no record either."""
    if job.id != first_job(job)[0]:
        job.result_ttl = 0  # RQ deletes a finished job with no result TTL


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
