"""The staging cache: one download and one conversion of an image, shared by every job.

When several jobs move the same image (one per destination), the bytes downloaded from the
source Glance and each conversion (``raw``, ``vmdk``) are made once, in ``staging_dir/cache``,
and used by every job that needs them, while they run and for ``staging_keep`` seconds after.

An entry is named by the image id, a digest of the image's content hash (a changed image never
matches an old entry) and the format. The worker processes of one host share it through
``flock`` locks on small files next to each entry:

- ``NAME.use``: held shared by every job using the entry; eviction takes it exclusively and
  without waiting, so an entry in use is never removed;
- ``NAME.make``: held exclusively by the one job making the entry; the others wait for it;
- ``.lock``: held briefly while space is reserved or entries are evicted.

An entry is made in ``NAME.partial/`` and renamed into place only when complete (and synced):
a job killed half-way leaves a ``.partial`` directory that is never served and is removed by
the next job that makes the entry or needs the space. The cache holds at most
``staging_max_bytes`` (disk blocks, sparse files counted as stored): least recently used
entries go first, and a job whose image cannot fit next to the entries in use stops with a
:class:`StagingFullError` that says so. Workers on other hosts keep their own caches; nothing
is shared between hosts.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migratio.atmosphere.status import human_bytes
from migratio.errors import Cancelled, StagingFullError

log = logging.getLogger(__name__)

#: seconds between two looks at a lock another job holds
POLL = 0.2


@dataclass(frozen=True)
class Entry:
    """A complete cache entry: the file, and what its maker recorded about it."""

    path: Path
    meta: dict[str, Any]

    def unchanged(self) -> bool:
        """Whether the file is still the one its maker wrote and described in ``meta``.

        Its size, modification time, inode and inode change time are those the maker recorded
        once the file was in place (entries made before they were recorded are not taken as
        unchanged). Nothing of migratio writes an entry once made; this notices a file that
        something else rewrote or replaced since, even one whose modification time was set
        back afterwards (``touch -d``, ``os.utime``): that changes the inode change time,
        which nothing can set back.
        """
        try:
            stat = self.path.stat()
        except OSError:
            return False
        return self.meta.get("ctime_ns") is not None and (
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ino,
            stat.st_ctime_ns,
        ) == (
            self.meta.get("size"),
            self.meta.get("mtime_ns"),
            self.meta.get("ino"),
            self.meta.get("ctime_ns"),
        )


def entry_name(image_id: str, content_hash: str, fmt: str) -> str:
    """The name of the entry holding image ``image_id`` with that content, in ``fmt``."""
    digest = hashlib.sha256(content_hash.encode()).hexdigest()[:32]
    return f"{image_id}-{digest}.{fmt}"


def disk_usage(path: Path) -> int:
    """Bytes ``path`` (a file or a directory tree) takes on disk; 0 if it is gone."""
    try:
        if path.is_dir():
            return sum(disk_usage(child) for child in path.iterdir())
        return path.lstat().st_blocks * 512
    except FileNotFoundError:
        return 0


class _Lock:
    """An ``flock`` on a lock file, robust against the file being removed by an evictor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, mode: int, *, wait: bool, cancel: threading.Event | None = None) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                got = self._flock(fd, mode, wait=wait, cancel=cancel)
            except BaseException:
                os.close(fd)
                raise
            if not got:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)  # removed (evicted) while we waited: lock the new file

    @staticmethod
    def _flock(fd: int, mode: int, *, wait: bool, cancel: threading.Event | None) -> bool:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not wait:
                return False
            if cancel is not None and cancel.wait(POLL):
                raise Cancelled("stopped while waiting for another job's staging")
            if cancel is None:
                time.sleep(POLL)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def remove(self) -> None:
        """Remove the lock file, then release it (held exclusively: nobody else relies on it;
        a job waiting on it finds it gone and locks a new one)."""
        if self.fd is not None:
            with suppress(OSError):  # left behind, it only waits for the next clean-up
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                    self.path.unlink()
        self.release()


def _unlink_if_free(path: Path) -> None:
    """Remove the lock file ``path`` if nobody holds it."""
    if not path.exists():
        return
    lock = _Lock(path)
    with suppress(OSError):  # never in the way of what the caller raises
        if lock.acquire(fcntl.LOCK_EX, wait=False):
            lock.remove()


class StagingCache:
    """The cache in ``root`` (``staging_dir/cache``), bounded by ``max_bytes`` (None: the disk)."""

    def __init__(self, root: Path, max_bytes: int | None, keep_seconds: float) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.keep_seconds = keep_seconds

    # -- using an entry -------------------------------------------------------------------

    @contextmanager
    def use(
        self,
        name: str,
        estimate: int,
        make: Callable[[Path], dict[str, Any]],
        *,
        cancel: threading.Event | None = None,
    ) -> Iterator[Entry]:
        """The entry ``name``, made by ``make`` if missing, kept while the block runs.

        ``make(target)`` writes the complete file at ``target`` and returns what should be
        remembered about it (sizes, digests); ``estimate`` is the disk space it will need.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        use = _Lock(self.root / f"{name}.use")
        use.acquire(fcntl.LOCK_SH, wait=True, cancel=cancel)
        try:
            entry = self._complete(name)
            if entry is None:
                entry = self._make(name, estimate, make, cancel)
            else:
                log.info("staging: using %s from the cache", name)
            self._touch(name)
            yield entry
        finally:
            use.release()
            if not (self.root / f"{name}.json").exists():  # its making failed: nothing to guard
                _unlink_if_free(self.root / f"{name}.use")

    def _complete(self, name: str) -> Entry | None:
        path, meta_path = self.root / name, self.root / f"{name}.json"
        try:
            meta = json.loads(meta_path.read_text())
            if path.stat().st_size != meta["size"]:
                log.warning("staging: %s has the wrong size; making it again", name)
                return None
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        entry = Entry(path, meta)
        if "ctime_ns" in meta and not entry.unchanged():
            log.warning("staging: %s was changed since it was made; making it again", name)
            return None
        return entry

    def _make(
        self,
        name: str,
        estimate: int,
        make: Callable[[Path], dict[str, Any]],
        cancel: threading.Event | None,
    ) -> Entry:
        maker = _Lock(self.root / f"{name}.make")
        maker.acquire(fcntl.LOCK_EX, wait=True, cancel=cancel)
        try:
            entry = self._complete(name)  # another job made it while we waited
            if entry is not None:
                log.info("staging: using %s, made by another job meanwhile", name)
                return entry
            partial = self.root / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)  # a killed maker's: never served
            partial.mkdir()
            try:
                self._reserve(name, estimate)
                target = partial / name
                try:
                    meta = dict(make(target))
                    _fsync(target)
                except Exception as exc:
                    if not _disk_full(exc):
                        raise
                    raise StagingFullError(
                        f"the disk of the staging cache {self.root} filled up while {name} "
                        f"was being made there (No space left on device; "
                        f"{human_bytes(_free_bytes(self.root))} free now); the job will be "
                        "tried again",
                        retryable=True,
                    ) from exc
                made = target.stat()
                meta["size"], meta["mtime_ns"] = made.st_size, made.st_mtime_ns
                meta_part = partial / f"{name}.json"
                meta_part.write_text(json.dumps(meta))
                _fsync(meta_part)
                (self.root / name).unlink(missing_ok=True)
                meta_part.rename(self.root / f"{name}.json")
                target.rename(self.root / name)
                # the renamed inode's change time (a rename sets it) and number, recorded now:
                # Entry.unchanged compares them (a meta without them: hashed on the way)
                placed = (self.root / name).stat()
                meta["ino"], meta["ctime_ns"] = placed.st_ino, placed.st_ctime_ns
                meta_part.write_text(json.dumps(meta))
                _fsync(meta_part)
                meta_part.rename(self.root / f"{name}.json")
                _fsync(self.root)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            log.info(
                "staging: made %s (%s on disk)",
                name,
                human_bytes(disk_usage(self.root / name)),
            )
            return Entry(self.root / name, meta)
        finally:
            maker.remove()  # waiters find it gone and lock a new one (_Lock.acquire)

    def _touch(self, name: str) -> None:
        with suppress(FileNotFoundError):
            os.utime(self.root / f"{name}.json")

    # -- space ----------------------------------------------------------------------------

    @contextmanager
    def _bookkeeping(self) -> Iterator[None]:
        lock = _Lock(self.root / ".lock")
        lock.acquire(fcntl.LOCK_EX, wait=True)
        try:
            yield
        finally:
            lock.release()

    def entries(self) -> list[tuple[float, str, int]]:
        """(last use, name, bytes on disk) of each complete entry, least recently used first."""
        found = []
        for meta in self.root.glob("*.json"):
            name = meta.name[: -len(".json")]
            try:
                used = meta.stat().st_mtime
            except FileNotFoundError:
                continue
            found.append((used, name, disk_usage(self.root / name)))
        return sorted(found)

    def _reserve(self, name: str, need: int) -> None:
        """Make room for ``need`` more bytes (evicting unused entries) and note the reservation."""
        with self._bookkeeping():
            now = time.time()
            in_progress = self._in_progress(name)  # removes what killed makers left
            self._remove_stray_locks()
            entries = self.entries()
            used = in_progress + sum(size for _, _, size in entries)
            kept: list[tuple[str, int]] = []
            for last_use, other, size in entries:
                over = self.max_bytes is not None and used + need > self.max_bytes
                stale = now - last_use > self.keep_seconds
                if (over or stale) and self._evict(other):
                    used -= size
                else:
                    kept.append((other, size))
            if self.max_bytes is not None and used + need > self.max_bytes:
                in_use = human_bytes(used)
                raise StagingFullError(
                    f"the image needs {human_bytes(need)} in the staging cache {self.root}, "
                    f"which staging_max_bytes limits to {human_bytes(self.max_bytes)}; "
                    f"{in_use} of it is in use by running migrations"
                    + (
                        " (raise staging_max_bytes)"
                        if need > self.max_bytes
                        else "; the job will be tried again"
                    ),
                    retryable=need <= self.max_bytes,
                )
            free = _free_bytes(self.root)
            if need > free:
                raise StagingFullError(
                    f"the image needs {human_bytes(need)} in {self.root}, but its disk has only "
                    f"{human_bytes(free)} free",
                    retryable=True,
                )
            (self.root / f"{name}.partial" / "reserved").write_text(str(need))

    def _remove_stray_locks(self) -> None:
        """Remove the lock files of entries that are neither there nor being made (a killed
        job's), so that years of images leave no trail of them."""
        for lock in [*self.root.glob("*.use"), *self.root.glob("*.make")]:
            name = lock.name.rsplit(".", 1)[0]
            if lock.suffix == ".use" and (self.root / f"{name}.json").exists():
                continue  # guards a complete entry
            if (self.root / f"{name}.partial").exists():
                continue  # being made, or left by a killed maker: _in_progress sees to it
            _unlink_if_free(lock)

    def _in_progress(self, mine: str) -> int:
        """Bytes reserved by entries being made; removes what killed makers left."""
        total = 0
        for partial in self.root.glob("*.partial"):
            other = partial.name[: -len(".partial")]
            if other == mine:
                continue
            maker = _Lock(self.root / f"{other}.make")
            if maker.acquire(fcntl.LOCK_EX, wait=False):
                try:  # nobody is making it: a killed job's leftover
                    log.info("staging: removing %s, left by an interrupted job", partial.name)
                    shutil.rmtree(partial, ignore_errors=True)
                finally:
                    maker.remove()
                continue
            try:
                reserved = int((partial / "reserved").read_text())
            except (FileNotFoundError, ValueError):
                reserved = 0
            total += max(reserved, disk_usage(partial))
        return total

    def _evict(self, name: str) -> bool:
        """Remove entry ``name`` unless a job is using it; True if it is gone."""
        use = _Lock(self.root / f"{name}.use")
        if not use.acquire(fcntl.LOCK_EX, wait=False):
            return False
        try:
            log.info("staging: removing %s (least recently used)", name)
            (self.root / name).unlink(missing_ok=True)
            (self.root / f"{name}.json").unlink(missing_ok=True)
        finally:
            use.remove()
        return True


#: what a tool (qemu-img) prints when its disk is full
_NO_SPACE = os.strerror(errno.ENOSPC)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or what caused it (a download's write, wrapped as a Glance error),
    is a full disk or quota -- or a tool's error that says so."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _NO_SPACE in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
