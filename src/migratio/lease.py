"""One attempt at a time for each (image, destination): a lease in Redis.

An attempt takes the lease of its pair (``SET NX PX``) before it looks at the destination,
renews it every :data:`RENEW_EVERY` seconds from a thread, and releases it at the end. A holder
that dies stops renewing, and the lease expires by itself after :data:`TTL` seconds.

Fencing: a holder that cannot renew (Redis unreachable, the key taken by someone else) counts
its lease as lost once its own clock says the lease may have expired — :data:`MARGIN` seconds
before Redis would let it go — and from then on :meth:`HeldLease.fence` raises
:class:`LeaseLost`. Every step that touches the destination calls it first, and the attempt's
``cancel`` event is set so that running transfers and waits stop too.

Every lease event goes to a capped Redis stream (:meth:`Keys.lease_history`), with Redis's own
clock in the entry id: operators can see who held what, and tests prove from it that two
attempts of one pair never overlapped.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from redis import Redis
from redis.exceptions import RedisError

from migratio.atmosphere.keys import Keys
from migratio.errors import Cancelled

log = logging.getLogger(__name__)

#: seconds a lease lives without renewal (what a dead holder blocks its pair for at most)
TTL = 60.0
#: seconds between renewals
RENEW_EVERY = 10.0
#: a holder counts its lease as lost this long before Redis would expire it
MARGIN = 10.0
#: entries kept in the lease history stream
HISTORY_MAX = 20000

# renew if still ours; take it again if it vanished (a Redis restart without the key) and the
# caller's own clock says it cannot have expired yet
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v and ARGV[3] == '1' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# release the lease of a job whose process is known to be dead (its value starts with the id)
_RELEASE_JOB = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  redis.call('DEL', KEYS[1])
  return v
end
return false
"""


class LeaseLost(Cancelled):
    """This attempt no longer holds its pair's lease; another may be running."""


def new_attempt_id() -> str:
    """A fresh attempt id (12 hex digits)."""
    return secrets.token_hex(6)


class Lease:
    """The lease of one (image, destination) pair of one source site, for one attempt."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        site: str,
        image_id: str,
        destination: str,
        *,
        job_id: str,
        attempt: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.site = site
        self.pair = f"{image_id}:{destination}"
        self.key = keys.lease(site, image_id, destination)
        self.job_id = job_id
        self.attempt = attempt or new_attempt_id()
        #: what the key holds while this attempt has it: job id first (see release_job)
        self.value = f"{job_id} {self.attempt} {os.getpid()}"

    def acquire(self) -> bool:
        """Take the lease if it is free; True if this attempt has it now."""
        taken = bool(self.redis.set(self.key, self.value, nx=True, px=int(TTL * 1000)))
        if taken:
            self.record("acquired")
        return taken

    def holder(self) -> str | None:
        """Who holds the lease (``job attempt pid``), or None."""
        value = self.redis.get(self.key)
        return None if value is None else _text(value)

    def renew(self, *, may_retake: bool) -> bool:
        """Extend the lease; False if it is no longer ours."""
        answer = self.redis.eval(
            _RENEW, 1, self.key, self.value, int(TTL * 1000), "1" if may_retake else "0"
        )
        if answer == 2:
            self.record("retaken")
            log.warning("the lease on %s had vanished (Redis restarted?); took it again", self.pair)
        return bool(answer)

    def release(self) -> None:
        """Give the lease up (only if it is still ours)."""
        if self.redis.eval(_RELEASE, 1, self.key, self.value):
            self.record("released")

    def record(self, event: str, job_id: str | None = None) -> None:
        """Append an event to the lease history."""
        self.redis.xadd(
            self.keys.lease_history(self.site),
            {
                "pair": self.pair,
                "event": event,
                "job": job_id or self.job_id,
                "attempt": self.attempt,
                "pid": str(os.getpid()),
            },
            maxlen=HISTORY_MAX,
            approximate=True,
        )

    @contextmanager
    def held(self, cancel: threading.Event) -> Iterator[HeldLease]:
        """Keep the (acquired) lease renewed while the block runs; release it at the end."""
        keeper = HeldLease(self, cancel)
        keeper.start()
        try:
            yield keeper
        finally:
            keeper.stop()
            try:
                self.release()
            except RedisError as exc:
                log.warning("cannot release the lease on %s (%s); it expires", self.pair, exc)


def release_job(
    redis: Redis, keys: Keys, site: str, image_id: str, destination: str, job_id: str
) -> bool:
    """Release the pair's lease if job ``job_id`` holds it: for a worker whose work-horse died."""
    lease = Lease(redis, keys, site, image_id, destination, job_id=job_id)
    value = redis.eval(_RELEASE_JOB, 1, lease.key, job_id)
    if not value:
        return False
    lease.attempt = _text(value).split(" ")[1]
    lease.record("released for a dead process")
    return True


class HeldLease:
    """A renewal thread for an acquired lease, and the fence that guards the destination."""

    def __init__(
        self, lease: Lease, cancel: threading.Event, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lease = lease
        self.cancel = cancel
        self.clock = clock
        self.valid_until = clock() + TTL - MARGIN
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def fence(self) -> None:
        """Raise :class:`LeaseLost` unless this attempt still holds its lease."""
        if self.lost is None and self.clock() > self.valid_until:
            self._lose("it could not be renewed in time")
        if self.lost is not None:
            image, destination = self.lease.pair.split(":", 1)
            raise LeaseLost(
                f"stopped: this attempt lost its lease on image {image} to {destination} "
                f"({self.lost}); the job will be tried again"
            )

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            self.cancel.set()
            log.error("lost the lease on %s: %s; stopping", self.lease.pair, why)
            with suppress(RedisError):
                self.lease.record("lost")

    def _run(self) -> None:
        while not self._stop.wait(RENEW_EVERY):
            asked = self.clock()
            in_time = asked < self.valid_until
            try:
                ours = self.lease.renew(may_retake=in_time)
            except RedisError as exc:
                if not in_time:
                    self._lose(f"Redis unreachable: {exc}")
                    return
                log.warning("cannot renew the lease on %s yet: %s", self.lease.pair, exc)
                continue
            if not ours:
                self._lose("another attempt holds it" if in_time else "it expired")
                return
            self.valid_until = asked + TTL - MARGIN
            with suppress(RedisError):
                self.lease.record("renewed")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
