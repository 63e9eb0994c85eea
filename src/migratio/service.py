"""``migratio run``: the long-running service for one site.

The loop is ``while not stopping: run_once()``; :meth:`Service.run_once` is what tests drive.
It takes Atmosphere's jobs (see :mod:`~migratio.atmosphere.intake`), keeps the RQ worker
processes alive, and re-queues jobs whose worker died. Redis being down is an outage to wait
out with capped exponential backoff, logged once, never a crash. Signal handlers only count
requests: the first SIGTERM is a warm stop (workers finish their current job), every later one
a cold one (see :mod:`migratio.rq_worker`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from migratio import redis_client, sweep
from migratio.adapters import processes
from migratio.atmosphere.intake import Intake
from migratio.atmosphere.keys import Keys
from migratio.config import Settings
from migratio.rq_worker import MigratioWorker, reclaim_abandoned

log = logging.getLogger(__name__)

#: seconds between looks for jobs whose worker died (RQ's own cycle is 10 minutes)
CLEANUP_INTERVAL = 15
#: a worker's heartbeat period; a job without one for this + 60 s is taken as abandoned
JOB_MONITORING_INTERVAL = 10
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


def connect(settings: Settings) -> Redis:
    """A Redis client for ``redis_url`` (and its TLS files)."""
    return redis_client.connect(settings.redis_url, settings.redis_tls)


def rq_queue(settings: Settings, redis: Redis) -> Queue:
    """The RQ queue of this site's migrations (JSON-serialised jobs)."""
    name = Keys(settings.namespace).rq_queue_name(settings.name)
    return Queue(name, connection=redis, serializer=JSONSerializer)


def run_worker(settings: Settings, *, burst: bool = False) -> bool:
    """Run one RQ worker for this site (``migratio worker``) until it is told to stop."""
    # loaded once here, not in every forked work-horse: the migrations' libraries take ~0.7 s
    importlib.import_module("migratio.jobs")
    redis = connect(settings)
    worker = MigratioWorker(
        [rq_queue(settings, redis)],
        settings=settings,
        connection=redis,
        serializer=JSONSerializer,
        job_monitoring_interval=JOB_MONITORING_INTERVAL,
        maintenance_interval=60,
    )
    # the site's service is the one scheduler (see Service.maintain): a worker blocked in its
    # dequeue would not take over the lock of a scheduler that was killed
    return bool(worker.work(burst=burst, with_scheduler=False, logging_level="INFO"))


class Service:
    """One site's intake plus its worker processes."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        worker_argv: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = rq_queue(settings, redis)
        self.intake = Intake(settings, redis, self.queue)
        self.scheduler = RQScheduler(
            [self.queue], connection=redis, serializer=JSONSerializer, interval=CLEANUP_INTERVAL
        )
        self.worker_argv = worker_argv
        self.workers: list[processes.Daemon | None] = [None] * settings.workers
        self.clock = clock
        self.sleep = sleep
        self.stop_requests = 0
        self.next_cleanup = 0.0
        self.retry_at = 0.0
        self.backoff = BACKOFF_START
        self.outage_since: float | None = None
        #: the sweep's timer was started by this service (the first sweep waits one interval)
        self.sweep_timer_set = False
        #: Redis outages seen since start (for the metrics endpoint)
        self.outages = 0

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self.stop_requests > 0

    def request_stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Signal handler: only count the request; the loop acts on it."""
        self.stop_requests += 1

    def run_once(self, timeout: int = 1) -> None:
        """One iteration: take a job (waiting up to ``timeout``), tidy up, mind the workers."""
        now = self.clock()
        if now < self.retry_at:
            self.sleep(min(self.retry_at - now, timeout))
            return
        try:
            self.intake.run_once(timeout)  # first hands over again what an error left in flight
            if now >= self.next_cleanup:
                self.maintain()
                self.next_cleanup = now + CLEANUP_INTERVAL
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._outage(exc)
            return
        except RedisError:
            # Redis answered, but not as expected: a bug, not an outage; say so loudly
            log.exception("unexpected Redis error; retrying in %.0f s", self.backoff)
            self._back_off()
            return
        except Exception:
            # a bug; the loop must go on (the intake hands over what is in flight next time)
            log.exception("internal error in the service loop; retrying in %.0f s", self.backoff)
            self._back_off()
            return
        if self.outage_since is not None:
            log.warning("Redis is back after %.0f s", self.clock() - self.outage_since)
            self.outage_since = None
            self.backoff = BACKOFF_START
        self.supervise()

    def maintain(self) -> None:
        """Re-queue jobs whose worker died; start retries that are due; queue the sweep.

        RQ's own cycle for this is 10 minutes, and a scheduler lock held by a killed worker
        would block retries for longer; here it is every CLEANUP_INTERVAL seconds. The sweep
        of leftovers (:mod:`migratio.sweep`) is queued every sweep.INTERVAL seconds (the
        first one that long after start), by whichever service of the site gets there first.
        """
        reclaim_abandoned(self.queue, self.settings)
        self.scheduler.acquire_locks()  # type: ignore[no-untyped-call]
        if self.scheduler.acquired_locks:
            self.scheduler.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
        keys = Keys(self.settings.namespace)
        due = self.redis.set(keys.sweep(self.settings.name), "1", nx=True, ex=sweep.INTERVAL)
        if due and self.sweep_timer_set:
            self.queue.enqueue(
                "migratio.jobs.run_sweep",
                job_id=f"migratio-sweep-{int(time.time())}",
                description="sweep of what dead attempts left behind",
                result_ttl=sweep.INTERVAL * 6,
                failure_ttl=sweep.INTERVAL * 6,
            )
        self.sweep_timer_set = True

    def _outage(self, exc: RedisError) -> None:
        if self.outage_since is None:
            self.outage_since = self.clock()
            self.outages += 1
            log.error(
                "Redis is unreachable; waiting for it: %s",
                redis_client.describe(exc, self.settings.redis_url).message,
            )
        self._back_off()

    def _back_off(self) -> None:
        self.retry_at = self.clock() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def supervise(self) -> None:
        """Start worker processes that are missing (a worker that died is replaced)."""
        if self.worker_argv is None or self.stopping:
            return
        for index, worker in enumerate(self.workers):
            if worker is not None and worker.poll() is None:
                continue
            if worker is not None:
                log.warning("worker %d exited with %s; starting another", index, worker.poll())
            self.workers[index] = processes.Daemon(self.worker_argv, what=f"worker {index}")

    def shutdown(self) -> None:
        """Stop the workers: warm (finish the current job), cold on any later request.

        The first request goes on as SIGTERM, every later one as SIGUSR1, which a worker takes
        as a cold stop (it kills its work-horse and puts the job back on the queue): two
        SIGTERMs sent close together would reach a worker as one.
        """
        forwarded = 0
        while any(w is not None and w.poll() is None for w in self.workers):
            while forwarded < self.stop_requests:
                forwarded += 1
                log.warning("%s stop: telling the workers", "warm" if forwarded == 1 else "cold")
                for worker in self.workers:
                    if worker is not None:
                        worker.signal(signal.SIGTERM if forwarded == 1 else signal.SIGUSR1)
            self.sleep(0.1)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info(
            "migratio for site %s: taking jobs from %s with %d worker(s)",
            self.settings.name,
            self.intake.source,
            len(self.workers),
        )
        while not self.stopping:
            self.run_once()
        self.shutdown()
        # the exit is decided: a later SIGTERM/SIGINT changes nothing, and must not land in
        # the interpreter's finalization, which puts back the default action (killed, -15)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        with contextlib.suppress(RedisError):  # the lock expires by itself
            self.scheduler.release_locks()  # type: ignore[no-untyped-call]
        log.info("stopped")
        return 0


def worker_command(config_path: Path) -> list[str]:
    """The argv of one worker process for ``config_path``."""
    return [sys.executable, "-m", "migratio", "worker", "--config", str(config_path.resolve())]


def environment_for_workers(config_path: Path) -> None:
    """Workers load their settings from ``$MIGRATIO_CONFIG``."""
    os.environ["MIGRATIO_CONFIG"] = str(config_path.resolve())
