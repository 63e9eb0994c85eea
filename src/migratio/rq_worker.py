"""RQ's side of migratio's jobs: a worker that logs as migratio does, and failed runs recorded.

RQ logs every failed job with the whole exception chain. migratio's job function has already
logged the failure by then (one line for an expected failure, a traceback for a bug), so the
worker adds nothing for those; anything else RQ catches is logged with its traceback. A run
that ends without the job function seeing it (its work-horse killed, or the whole worker lost)
gets the same one line, the same record for ``migratio status`` and the same metrics.

RQ's worker forks a work-horse per job into its own process group. Here:

* the work-horse gets SIGKILL when its worker dies (``PR_SET_PDEATHSIG``), so a worker killed
  on its own (the OOM killer, ``kill -9 PID``) never leaves a horse migrating on under PID 1
  while the job is re-queued; the horse's tools get SIGTERM in turn (see
  :mod:`migratio.adapters.processes`);
* the first SIGTERM is a warm stop (the running migration finishes), every later one — at any
  time, not only a second after — a cold stop: the horse and its tools are killed, the lease
  is released and the job goes back to the front of the queue, without using up a retry.
  SIGUSR1 is a cold stop at once: the service passes a cold stop on with it, because two
  SIGTERMs sent close together reach a process as one;
* a job whose horse died (killed, or its worker died: see :func:`interrupted`) is run again
  without using up a retry, up to :data:`MAX_INTERRUPTIONS` times; then it fails with a
  status line that says why.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from types import FrameType, TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry

from migratio import metrics
from migratio.atmosphere.keys import Keys
from migratio.atmosphere.sidekiq import push_status
from migratio.config import Settings
from migratio.lease import release_job
from migratio.logs import job_context, job_tag, was_logged

log = logging.getLogger(__name__)


#: times a job may lose its process (killed horse, killed worker) before it is failed
MAX_INTERRUPTIONS = 5
_PR_SET_PDEATHSIG = 1


def _die_with_worker() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def interrupted(settings: Settings, redis: Redis, job: Job, *, horse_reaped: bool) -> None:
    """Book-keep a job that lost its process, before RQ retries or fails it.

    The lease is released only when the horse is known dead (``horse_reaped``: its worker
    waited for it); otherwise it expires by itself. Up to :data:`MAX_INTERRUPTIONS` times the
    job gets its retry back; after that Atmosphere is told why it failed.
    """
    try:
        meta = job.get_meta(refresh=True)
    except RedisError:
        meta = job.meta
    count = int(meta.get("interruptions", 0)) + 1
    job.meta["interruptions"] = count
    kwargs = job.kwargs
    image_id, destination = str(kwargs.get("image_id")), str(kwargs.get("destination"))
    keys = Keys(settings.namespace)
    if horse_reaped:
        release_job(redis, keys, settings.name, image_id, destination, job.id)
    if count <= MAX_INTERRUPTIONS:
        job.retries_left = (job.retries_left or 0) + 1
        log.info("job %s lost its process (%d time(s)); it will run again", job.id, count)
    else:
        job.retries_left = 0
        push_status(
            redis,
            keys,
            image_id,
            settings.name,
            destination,
            f"Error: the migration's process was killed {count} times (out of memory?); "
            "given up — see the worker log",
        )
    job.save_meta()  # type: ignore[no-untyped-call]


def record_failure(job: Job, settings: Settings, message: str, reason: str) -> str:
    """Record a failed run (for ``migratio status`` and the metrics); return what happens next.

    Call it before RQ files the failure: whether RQ retries is read from the job as it is.
    """
    retry = bool(job.retries_left)
    job.meta["error"] = message
    job.meta["failed_at"] = time.time()
    try:
        job.save_meta()  # type: ignore[no-untyped-call]
    except RedisError as exc:
        log.warning("cannot keep the failure in the job's record: %s", exc)
    kwargs = _kwargs(job)
    started = job.started_at.timestamp() if job.started_at is not None else time.time()
    metrics.count_attempt(
        job.connection,
        Keys(settings.namespace),
        settings.name,
        outcome="retried" if retry else "failed",
        kind=str(kwargs.get("kind", "openstack")),
        destination=str(kwargs.get("destination", "")),
        seconds=max(time.time() - started, 0.0),
        reason=reason,
    )
    if not retry:
        return "not retried"
    return f"retry in {job.get_retry_interval()} s, {job.retries_left} left"


def reclaim_abandoned(queue: Queue, settings: Settings) -> None:
    """Hand RQ the jobs whose worker stopped answering, with a line; RQ runs them again (see
    :func:`interrupted`: without using up a retry) or fails them."""

    def handler(job: Job, *exc_info: Any) -> bool:
        token = job_context.set(job_tag(job.id, _image_of(job)))
        try:
            interrupted(settings, queue.connection, job, horse_reaped=False)
            message = "its worker stopped answering (killed, or its host is down)"
            then = record_failure(job, settings, message, "WorkerLost")
            log.error("job %s failed: %s (%s)", job.id, message, then)
        finally:
            job_context.reset(token)
        return True

    StartedJobRegistry(queue=queue).cleanup(exception_handlers=[handler])


class _Routine(logging.Filter):
    """Drops RQ's lines about its routine upkeep (two a minute per worker, forever), and the
    two it writes for a killed work-horse (MigratioWorker writes one instead)."""

    ROUTINE = (
        "Worker %s: cleaning registries for queue: %s",
        "Worker %s: cleaning group registries",
        "Worker %s: job %s failed (%s)",
        "Work horse killed for job %s: retpid=%s, ret_val=%s",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.ROUTINE


class MigratioWorker(Worker):
    """An RQ worker whose log lines carry the job and image, with no duplicate tracebacks,
    whose horse dies with it, and whose cold stop re-queues the job."""

    log_result_lifespan = False  # "result is kept for 604800 seconds" after every job

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        if not any(isinstance(f, _Routine) for f in self.log.filters):
            self.log.addFilter(_Routine())
        self.worker_pid = os.getpid()
        self.cold = False

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()  # type: ignore[no-untyped-call]
        signal.signal(signal.SIGUSR1, self.request_force_stop)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.cold:  # a SIGTERM after a cold stop (SIGUSR1) changes nothing
            super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        _die_with_worker()
        if os.getppid() != self.worker_pid:  # the worker died before the line above
            os._exit(1)
        super().main_work_horse(job, queue)

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        """Cold stop: kill the horse, release its lease, put its job back first in line."""
        if self.cold:
            return
        self.cold = True
        log.warning("worker %s: cold stop", self.name)
        job = self.get_current_job() if self.horse_pid else None
        if self.horse_pid:
            self.kill_horse()
            self.wait_for_horse()
        if job is not None:
            try:
                self.requeue(job)
            except RedisError:
                # the job stays STARTED without a heartbeat: the service re-queues it later
                log.exception("cannot re-queue job %s now", job.id)
        raise SystemExit(0)

    def requeue(self, job: Job) -> None:
        kwargs = job.kwargs
        release_job(
            self.connection,
            Keys(self.settings.namespace),
            self.settings.name,
            str(kwargs.get("image_id")),
            str(kwargs.get("destination")),
            job.id,
        )
        queue = Queue(job.origin, connection=self.connection, serializer=self.serializer)
        StartedJobRegistry(queue=queue).remove_executions(job)
        queue.enqueue_job(job, at_front=True)
        log.warning("job %s put back on the queue", job.id)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run ``job`` in a work-horse; the horse and this process tag their lines with it."""
        token = job_context.set(job_tag(job.id, _image_of(job)))
        try:
            super().execute_job(job, queue)
        finally:
            job_context.reset(token)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """Log a failure the job function did not log (with its traceback: it is a bug)."""
        exc: BaseException | None = exc_info[1] if len(exc_info) > 1 else None
        if was_logged(exc):
            return
        tb: TracebackType | None = exc_info[2] if len(exc_info) > 2 else None
        log.error(
            "job %s failed outside migratio's code: %s",
            job.id,
            exc,
            exc_info=(type(exc), exc, tb) if exc is not None else None,
        )

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        """The work-horse died under the job (OOM killer, kill -9): one line, and the record."""
        if self._stop_requested:
            how = "a cold stop"
        elif os.WIFSIGNALED(ret_val):
            how = f"killed by signal {os.WTERMSIG(ret_val)}: out of memory, or kill -9?"
        else:
            how = f"exit status {os.WEXITSTATUS(ret_val)}"
        message = f"the process running it died ({how})"
        interrupted(self.settings, self.connection, job, horse_reaped=True)
        then = record_failure(job, self.settings, message, "WorkerLost")
        log.error("job %s failed: %s (%s)", job.id, message, then)
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)  # type: ignore[no-untyped-call]


def _kwargs(job: Job) -> dict[str, Any]:
    try:
        kwargs = job.kwargs
    except Exception:  # an undecodable job: RQ reports it itself
        return {}
    return kwargs if isinstance(kwargs, dict) else {}


def _image_of(job: Job) -> str | None:
    image = _kwargs(job).get("image_id")
    return image if isinstance(image, str) else None
