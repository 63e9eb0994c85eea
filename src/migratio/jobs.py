"""The functions RQ workers run: a thin call into the migrations."""

from __future__ import annotations

import logging
from functools import cache

from rq import get_current_job

from migratio.config import Settings, load_settings
from migratio.errors import MigratioError
from migratio.feedback import AtmosphereSink
from migratio.keys import Keys
from migratio.logs import job_context
from migratio.migration import migrate
from migratio.request import MigrationRequest
from migratio.status import FanOut, LogSink

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
            job.save_meta()  # type: ignore[no-untyped-call]


def _no_more_retries() -> None:
    """Tell RQ that retrying the current job cannot help."""
    job = get_current_job()
    if job is not None and job.retries_left:
        job.retries_left = 0
        job.save()


def run_migration(kind: str, image_id: str, destination: str, jid: str = "") -> str:
    """Run one of Atmosphere's migration jobs; status lines go to Atmosphere and the log."""
    settings = worker_settings()
    job = get_current_job()
    assert job is not None, "run_migration runs inside an RQ worker"
    job_context.set(f" [job {job.id} image {image_id}]")
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
        result = migrate(
            settings, request, sink, kind="amazon" if kind == "amazon" else "openstack"
        )
    except MigratioError as exc:
        if not exc.retryable:
            _no_more_retries()
        log.error("job %s failed: %s", job.id, exc.message)
        raise
    except Exception:
        atmosphere("Error: internal error in migratio; the traceback is in its log")
        log.exception("job %s failed with an internal error", job.id)
        raise
    finally:
        atmosphere.flush()
    return result.outcome.value
