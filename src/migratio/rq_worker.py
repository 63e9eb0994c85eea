"""RQ's side of migratio's jobs: a worker that logs as migratio does, and failed runs recorded.

RQ logs every failed job with the whole exception chain. migratio's job function has already
logged the failure by then (one line for an expected failure, a traceback for a bug), so the
worker adds nothing for those; anything else RQ catches is logged with its traceback. A run
that ends without the job function seeing it (its work-horse killed, or the whole worker lost)
gets the same one line, the same record for ``migratio status`` and the same metrics.
"""

from __future__ import annotations

import logging
import os
import time
from types import TracebackType
from typing import Any

from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from migratio import metrics
from migratio.config import Settings
from migratio.keys import Keys
from migratio.logs import job_context, job_tag, was_logged

log = logging.getLogger(__name__)


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
    """Hand RQ the jobs whose worker stopped answering (it retries or fails them), with a line."""
    registry = StartedJobRegistry(queue=queue)
    for job_id in registry.get_expired_job_ids():
        try:
            job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            continue
        if job.get_status(refresh=False) != JobStatus.STARTED:
            continue  # it ended; only its registry entry is left
        token = job_context.set(job_tag(job.id, _image_of(job)))
        try:
            message = "its worker stopped answering (killed, or its host is down)"
            then = record_failure(job, settings, message, "WorkerLost")
            log.error("job %s failed: %s (%s)", job.id, message, then)
        finally:
            job_context.reset(token)
    registry.cleanup()


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
    """An RQ worker whose log lines carry the job and image, with no duplicate tracebacks."""

    log_result_lifespan = False  # "result is kept for 604800 seconds" after every job

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        if not any(isinstance(f, _Routine) for f in self.log.filters):
            self.log.addFilter(_Routine())

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
