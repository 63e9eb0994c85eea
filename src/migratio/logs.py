"""Logging: one line per event to stderr (for journald) and to a rotating file in log/."""

from __future__ import annotations

import logging
import logging.handlers
from contextvars import ContextVar
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s:%(job)s %(message)s"
#: " [job <id> image <uuid>]" while a worker runs a job, so every line says which
job_context: ContextVar[str] = ContextVar("job_context", default="")


class _JobContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = job_context.get()
        return True


#: the rotating log: this many bytes per file, this many old files kept
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 10


def setup_logging(
    log_dir: Path | None, *, stderr_level: int = logging.WARNING, filename: str = "migratio.log"
) -> None:
    """Send INFO and above to ``log_dir/filename`` (rotated), ``stderr_level`` to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if stderr_level <= logging.DEBUG else logging.INFO)
    stderr = logging.StreamHandler()
    stderr.setLevel(stderr_level)
    stderr.setFormatter(logging.Formatter(FORMAT))
    stderr.addFilter(_JobContext())
    root.addHandler(stderr)
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            rotating = logging.handlers.RotatingFileHandler(
                log_dir / filename, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
            )
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot write logs to %s: %s", log_dir, exc)
        else:
            rotating.setLevel(logging.INFO)
            rotating.setFormatter(logging.Formatter(FORMAT))
            rotating.addFilter(_JobContext())
            root.addHandler(rotating)
    for noisy in ("urllib3", "keystoneauth", "glanceclient", "stevedore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
