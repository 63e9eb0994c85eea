"""The functions RQ workers run: a thin call into the migrations, under the pair's lease."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from functools import cache

from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from migratio import metrics
from migratio.atmosphere.feedback import AtmosphereSink
from migratio.atmosphere.keys import Keys
from migratio.atmosphere.status import FanOut, LogSink, StatusSink
from migratio.config import Settings, load_settings
from migratio.errors import MigratioError
from migratio.fair_share import DestinationShare, first_job, leave_no_record, wait_off_worker
from migratio.lease import Lease
from migratio.logs import job_context, job_tag, mark_logged
from migratio.migration import migrate
from migratio.request import MigrationRequest, MigrationResult
from migratio.rq_worker import record_failure

log = logging.getLogger(__name__)

#: seconds a job whose pair is busy waits before it looks again (it leaves its worker meanwhile)
BUSY_DELAY = 10


@cache
def worker_settings() -> Settings:
    """This worker's settings (``$MIGRATIO_CONFIG``), loaded once per process."""
    return load_settings()


class JobMetaSink:
    """Keeps a job's latest status line in its RQ metadata, for ``migratio status``.

    Only a convenience: a Redis error here is logged, never raised into the migration.
    """

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


def run_sweep() -> str:
    """The periodic sweep of leftovers (see :mod:`migratio.sweep`); returns what it did."""
    from migratio.sweep import sweep  # noqa: PLC0415 (only this job needs it)

    job = get_current_job()
    assert job is not None, "run_sweep runs inside an RQ worker"
    report = sweep(worker_settings(), job.connection)
    return f"removed {len(report.removed)}, busy {len(report.busy)}"


def _leased(
    job: Job, settings: Settings, request: MigrationRequest, kind: str, sink: StatusSink
) -> MigrationResult | None:
    """Migrate under the pair's lease and in the destination's turn; None when the job waits
    for either (off its worker: it is run again later)."""
    image_id, destination = request.image_id, request.destination
    keys = Keys(settings.namespace)
    lease = Lease(job.connection, keys, settings.name, image_id, destination, job_id=job.id)
    if not lease.acquire():
        holder = lease.holder()
        again = wait_off_worker(job, f"the migration {holder} of the same image", BUSY_DELAY)
        log.info(
            "%s to %s is being migrated (%s); again as %s", image_id, destination, holder, again.id
        )
        if not job.meta.get("waits"):
            sink(f"Waiting: another migration of image {image_id} to {destination} is running")
        return None
    try:
        turn = _destination_turn(job, settings, destination, sink)
    except BaseException:
        lease.release()
        raise
    if turn is None:
        lease.release()
        return None
    cancel = threading.Event()
    with lease.held(cancel) as held, turn:
        return migrate(
            settings,
            request,
            sink,
            kind="amazon" if kind == "amazon" else "openstack",
            cancel=cancel,
            fence=held.fence,
        )


def _unexpected(exc: Exception) -> tuple[str, str, str]:
    """(status line, message, reason) of a failure migratio did not raise on purpose.

    Redis going away under a job (a restart) is not a bug: RQ runs the job again.
    """
    if isinstance(exc, RedisError):
        message = f"lost contact with Redis ({exc}); the job will be tried again"
        return f"Error: {message}", message, "RedisError"
    return (
        "Error: internal error in migratio; the traceback is in its log",
        f"internal error ({type(exc).__name__}: {exc}); the traceback is in worker.log",
        "InternalError",
    )


def run_migration(kind: str, image_id: str, destination: str, jid: str = "") -> str:
    """Run one of Atmosphere's migration jobs; status lines go to Atmosphere and the log.

    The migration runs under its pair's lease; while another attempt holds it, the job is
    put back to wait (without a worker) and says so once.
    """
    settings = worker_settings()
    job = get_current_job()
    assert job is not None, "run_migration runs inside an RQ worker"
    job_context.set(job_tag(job.id, image_id))
    started = time.monotonic()
    keys = Keys(settings.namespace)
    atmosphere = AtmosphereSink(job.connection, keys, image_id, settings.name, destination)
    sink = FanOut(atmosphere, LogSink(log), JobMetaSink())
    log.info("job %s (jid %s): %s migration of %s to %s", job.id, jid, kind, image_id, destination)
    try:
        try:
            request = MigrationRequest(image_id, destination)
            settings.site(destination)
        except MigratioError as exc:
            sink(exc.status_line())
            raise
        result = _leased(job, settings, request, kind, sink)
    except MigratioError as exc:
        if not exc.retryable:
            _no_more_retries()
        then = record_failure(job, settings, exc.message, type(exc).__name__)
        log.error("job %s failed: %s (%s)", job.id, exc.message, then)
        mark_logged(exc)
        raise
    except JobTimeoutException as exc:
        # a time limit the operator set: running it again would run out of it again
        _no_more_retries()
        message = f"the migration ran longer than job_timeout ({settings.job_timeout:.0f} s)"
        atmosphere(f"Error: {message}")
        then = record_failure(job, settings, message, "JobTimeout")
        log.error("job %s failed: %s (%s)", job.id, message, then)
        mark_logged(exc)
        raise
    except Exception as exc:
        line, message, reason = _unexpected(exc)
        atmosphere(line)
        then = record_failure(job, settings, message, reason)
        log.error("job %s failed: %s (%s)", job.id, message, then, exc_info=reason != "RedisError")
        mark_logged(exc)
        raise
    finally:
        atmosphere.flush()
    if result is None:  # it waits, as a new job: nothing can fail any more
        leave_no_record(job)
        return "waiting"
    metrics.count_attempt(
        job.connection,
        keys,
        settings.name,
        outcome="succeeded",
        kind=kind,
        destination=destination,
        seconds=time.monotonic() - started,
        bytes_moved=result.bytes_sent,
    )
    return result.outcome.value
