"""What operators do to a running site's jobs: ``migratio retry`` (``status`` is overview.py)."""

from __future__ import annotations

from redis import Redis
from rq.registry import FailedJobRegistry

from migratio.config import Settings
from migratio.errors import MigratioError
from migratio.service import rq_queue


def retry_failed(settings: Settings, redis: Redis, job_id: str) -> None:
    """Put a failed job back on the queue."""
    registry = FailedJobRegistry(queue=rq_queue(settings, redis))
    if job_id not in registry.get_job_ids():
        raise MigratioError(f"no failed job {job_id} (see 'migratio status')")
    registry.requeue(job_id)
