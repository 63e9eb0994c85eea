"""RQ's worker, made to log as migratio does: one line per event, the job and image in each.

RQ logs every failed job with the whole exception chain. migratio's job function has already
logged the failure by then (one line for an expected failure, a traceback for a bug), so the
worker adds nothing for those; anything else RQ catches is logged with its traceback.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from rq import Queue, Worker
from rq.job import Job

from migratio.logs import job_context, job_tag, was_logged

log = logging.getLogger(__name__)


class _Routine(logging.Filter):
    """Drops RQ's lines about its routine upkeep (two a minute per worker, forever)."""

    ROUTINE = (
        "Worker %s: cleaning registries for queue: %s",
        "Worker %s: cleaning group registries",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.ROUTINE


class MigratioWorker(Worker):
    """An RQ worker whose log lines carry the job and image, with no duplicate tracebacks."""

    log_result_lifespan = False  # "result is kept for 604800 seconds" after every job

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(isinstance(f, _Routine) for f in self.log.filters):
            self.log.addFilter(_Routine())

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run ``job`` in a work-horse; the horse and this process tag their lines with it."""
        token = job_context.set(job_tag(job.id, _image_of(job)))
        try:
            super().execute_job(job, queue)
        finally:
            job_context.reset(token)

    def handle_exception(
        self,
        job: Job,
        *exc_info: Any,
    ) -> None:
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


def _image_of(job: Job) -> str | None:
    try:
        image = job.kwargs.get("image_id")
    except Exception:  # an undecodable job: RQ reports it itself
        return None
    return image if isinstance(image, str) else None
