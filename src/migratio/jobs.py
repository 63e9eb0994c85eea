"""The functions RQ workers run: a thin call into the migrations."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from functools import cache

from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from migratio import metrics
from migratio.config import Settings, load_settings
from migratio.errors import MigratioError
from migratio.fair_share import DestinationShare, first_job, wait_off_worker
from migratio.feedback import AtmosphereSink
from migratio.keys import Keys
from migratio.logs import job_context, job_tag, mark_logged
from migratio.migration import migrate
from migratio.request import MigrationRequest
from migratio.rq_worker import record_failure
from migratio.status import FanOut, LogSink, StatusSink

log = logging.getLogger(__name__)


@cache
def worker_settings() -> Settings:
    """This worker's settings (``$MIGRATIO_CONFIG``), loaded once per process."""
    return load_settings()


class JobMetaSink:
    """Keeps a job's latest status line in its RQ metadata, for ``migratio status``."""

    def __call__(self, text: str) -> None:
        job = get_current_job()
        if job is not None:
            job.meta["status"] = text
            job.meta["status_at"] = time.time()
            try:
                job.save_meta()  # type: ignore[no-untyped-call]
            except RedisError as exc:  # only 'migratio status' misses it
                log.warning("cannot keep the status line in the job's record: %s", exc)


def _no_more_retries() -> None:
    """Tell RQ that retrying the current job cannot help."""
    job = get_current_job()
    if job is not None and job.retries_left:
        job.retries_left = 0
        job.save()


def _destination_turn(
    job: Job, settings: Settings, destination: str, sink: StatusSink
) -> AbstractContextManager[None] | None:
    """A slot to ``destination`` (see :mod:`migratio.fair_share`), or None: the job waits.

    A destination that cannot be loaded has no cap here: the migration says what is wrong.
    """
    try:
        cap = settings.site(destination).max_parallel
    except MigratioError:
        return nullcontext()
    share = DestinationShare(
        job.connection, Keys(settings.namespace), settings.name, destination, cap
    )
    first, arrival = first_job(job)
    turn = share.take(first, arrival)
    if turn.took:
        return share.held(first)
    reason = (
        f"{turn.running} migrations to {destination} are running (MAX_PARALLEL={cap}), "
        f"{turn.ahead} waiting ahead of this one"
    )
    again = wait_off_worker(job, reason)
    log.info("waiting for a slot: %s; again as job %s", reason, again.id)
    if not job.meta.get("waits"):
        sink(f"Waiting: {reason}")
    return None


def run_migration(kind: str, image_id: str, destination: str, jid: str = "") -> str:
    """Run one of Atmosphere's migration jobs; status lines go to Atmosphere and the log."""
    settings = worker_settings()
    job = get_current_job()
    assert job is not None, "run_migration runs inside an RQ worker"
    job_context.set(job_tag(job.id, image_id))
    started = time.monotonic()
    atmosphere = AtmosphereSink(
        job.connection, Keys(settings.namespace), image_id, settings.name, destination
    )
    sink = FanOut(atmosphere, LogSink(log), JobMetaSink())
    log.info("job %s (jid %s): %s migration of %s to %s", job.id, jid, kind, image_id, destination)
    try:
        try:
            request = MigrationRequest(image_id, destination)
        except MigratioError as exc:
            sink(exc.status_line())
            raise
        turn = _destination_turn(job, settings, destination, sink)
        if turn is None:
            return "waiting"
        with turn:
            result = migrate(
                settings, request, sink, kind="amazon" if kind == "amazon" else "openstack"
            )
    except MigratioError as exc:
        if not exc.retryable:
            _no_more_retries()
        then = record_failure(job, settings, exc.message, type(exc).__name__)
        log.error("job %s failed: %s (%s)", job.id, exc.message, then)
        mark_logged(exc)
        raise
    except JobTimeoutException as exc:
        message = f"the job took longer than job_timeout ({settings.job_timeout:.0f} s)"
        atmosphere(f"Error: {message}")
        then = record_failure(job, settings, message, "JobTimeout")
        log.error("job %s failed: %s (%s)", job.id, message, then)
        mark_logged(exc)
        raise
    except Exception as exc:
        atmosphere("Error: internal error in migratio; the traceback is in its log")
        message = f"internal error ({type(exc).__name__}: {exc}); the traceback is in worker.log"
        then = record_failure(job, settings, message, "InternalError")
        log.exception("job %s failed with an internal error (%s)", job.id, then)
        mark_logged(exc)
        raise
    finally:
        atmosphere.flush()
    metrics.count_attempt(
        job.connection,
        Keys(settings.namespace),
        settings.name,
        outcome="succeeded",
        kind=kind,
        destination=destination,
        seconds=time.monotonic() - started,
        bytes_moved=result.bytes_sent,
    )
    return result.outcome.value
