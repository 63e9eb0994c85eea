"""Logging: one line per event to stderr (for journald) and to a daily file in log/.

The service, each worker and each work-horse RQ forks all append to the same files, so the
rotation is done by whichever process first writes on a new day, under a lock, and every
process reopens the file when it sees it was renamed: the original's logrotate setup (daily,
90 kept, compressed), built in. Lines of a job carry ``[job <id> image <uuid>]``.
"""

from __future__ import annotations

import datetime
import fcntl
import gzip
import logging
import logging.handlers
import os
import re
import shutil
from contextvars import ContextVar
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s:%(job)s %(message)s"
#: " [job <id> image <uuid>]" while a worker runs a job, so every line says which
job_context: ContextVar[str] = ContextVar("job_context", default="")
#: the attribute that marks an exception whose failure was already logged (see mark_logged)
_LOGGED = "_migratio_logged"


def job_tag(job_id: str, image_id: str | None) -> str:
    """What every log line of a job carries."""
    return f" [job {job_id} image {image_id or '?'}]"


def mark_logged(exc: BaseException) -> None:
    """Note that this failure has had its one log line (RQ then adds none)."""
    setattr(exc, _LOGGED, True)


def was_logged(exc: BaseException | None) -> bool:
    """True if :func:`mark_logged` was called on ``exc``."""
    return bool(getattr(exc, _LOGGED, False))


class _JobContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = job_context.get()
        return True


class DailyFile(logging.handlers.WatchedFileHandler):
    """Appends to a log file that several processes share; rotates it once a day.

    The first record of a new day (by local time) in any process renames ``NAME`` to
    ``NAME.<date of its last line>``, under an ``flock`` so that only one process does; the
    others notice the rename (WatchedFileHandler) and reopen. Rotated files older than the
    newest one are gzipped (the newest may still get a late line), and only ``keep`` are kept.
    ``keep=0`` never rotates: for logrotate (``copytruncate`` or rename both work).
    """

    def __init__(self, path: Path, *, keep: int) -> None:
        super().__init__(path, encoding="utf-8")
        self.keep = keep
        self.checked: datetime.date | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Rotate first if this is the first record of a new day, then write it."""
        if self.keep:
            day = datetime.date.fromtimestamp(record.created)
            if day != self.checked:
                self.checked = day
                try:
                    self.rotate(day)
                except OSError:
                    self.handleError(record)
        try:
            super().emit(record)
        except OSError:  # the log directory is gone: reopening fails outside emit's own guard
            self.handleError(record)

    def rotate(self, today: datetime.date) -> Path | None:
        """Rename the file if its last line is from before ``today``; return the new name."""
        path = Path(self.baseFilename)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                stat = path.stat()
            except FileNotFoundError:
                return None
            last = datetime.date.fromtimestamp(stat.st_mtime)
            if last >= today or stat.st_size == 0:
                return None  # not due, or another process has just done it
            target = path.with_name(f"{path.name}.{last.isoformat()}")
            suffix = 1
            while target.exists() or target.with_name(target.name + ".gz").exists():
                target = path.with_name(f"{path.name}.{last.isoformat()}.{suffix}")
                suffix += 1
            path.rename(target)
            self._tidy(path, newest=target)
            return target

    def _tidy(self, path: Path, *, newest: Path) -> None:
        pattern = re.compile(re.escape(path.name) + r"\.\d{4}-\d{2}-\d{2}(\.\d+)?(\.gz)?")
        rotated = sorted(
            (p for p in path.parent.iterdir() if pattern.fullmatch(p.name)),
            key=lambda p: p.stat().st_mtime,
        )
        for old in rotated[: max(len(rotated) - self.keep, 0)]:
            old.unlink(missing_ok=True)
        for old in rotated[-self.keep :]:
            if old != newest and old.suffix != ".gz" and old.exists():
                _gzip(old)


def _gzip(path: Path) -> None:
    packed = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    stat = path.stat()
    os.utime(packed, (stat.st_atime, stat.st_mtime))  # keeps its place in the order
    path.unlink()


def setup_logging(
    log_dir: Path | None,
    *,
    stderr_level: int = logging.WARNING,
    filename: str = "migratio.log",
    keep_days: int = 90,
) -> None:
    """Send INFO and above to ``log_dir/filename`` (daily, ``keep_days`` kept), more to stderr."""
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
            daily = DailyFile(log_dir / filename, keep=keep_days)
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot write logs to %s: %s", log_dir, exc)
        else:
            daily.setLevel(logging.INFO)
            daily.setFormatter(logging.Formatter(FORMAT))
            daily.addFilter(_JobContext())
            root.addHandler(daily)
    for noisy in ("urllib3", "keystoneauth", "glanceclient", "stevedore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
