"""Adapter for OpenSSH: one place that knows how migratio logs in to a destination host.

Host keys are always verified (``StrictHostKeyChecking=yes``; never ``no``), logins are by key
only (``BatchMode``), and a remote command is built from an argv list with every word quoted,
so that no image name, property or path can become shell syntax on the other side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from migratio.adapters import processes
from migratio.config import SshTarget
from migratio.errors import RemoteError

log = logging.getLogger(__name__)

SSH = "ssh"
#: pauses (seconds) before the next try when sshd refused a login (busy: ``MaxStartups``)
LOGIN_RETRIES = (0.5, 1.0, 2.0)
#: the bulk copy (rsync, and the ssh that encrypts its bytes) runs at this lower CPU priority
#: at both ends: it has slack, while the head node's services -- and at the destination, the
#: upload into Glance that follows the copy -- should not wait for it
NICE = 10
#: keepalives: a host that stops answering (packets dropped, no RST) is given up on after
#: SERVER_ALIVE_INTERVAL * SERVER_ALIVE_COUNT seconds, mid-command or mid-transfer
SERVER_ALIVE_INTERVAL = 15
SERVER_ALIVE_COUNT = 4


def lost_connection(target: SshTarget) -> str:
    """What an ssh connection that ended without a word of its own means."""
    return (
        f"lost the ssh connection to {target.destination} port {target.port}: {target.host} "
        f"stopped answering (no reply for {SERVER_ALIVE_INTERVAL * SERVER_ALIVE_COUNT} s) or "
        "the connection was cut"
    )


def login_refused(stderr: str) -> bool:
    """Whether sshd closed the connection before the login -- too many logins at once (sshd's
    ``MaxStartups``, 10 by default) -- which a moment later succeeds."""
    return "kex_exchange_identification" in stderr


def cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def ssh_options(target: SshTarget) -> list[str]:
    """The ``ssh`` argv for ``target`` up to (not including) the destination."""
    argv = [
        SSH,
        "-p", str(target.port),
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={target.connect_timeout}",
        "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
        "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT}",
        "-o", "LogLevel=ERROR",
        "-c", target.ciphers,
    ]  # fmt: skip
    if target.key_file is not None:
        argv += ["-i", str(target.key_file), "-o", "IdentitiesOnly=yes"]
    if target.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={target.known_hosts}"]
    if target.control_path is not None:
        # through the master while it is up; without it (not yet, or gone) a login of its own
        argv += ["-o", f"ControlPath={target.control_path}", "-o", "ControlMaster=no"]
    return argv


def rsync_shell(target: SshTarget) -> str:
    """The ``-e`` value for rsync: the same ssh command, as one quoted string."""
    return shlex.join(ssh_options(target))


def remote_command(argv: Sequence[str], *, creds: str | None = None, stdin: bool = False) -> str:
    """Quote ``argv`` for the remote POSIX shell, optionally after sourcing ``creds``.

    Without ``stdin`` the command's standard input is closed (``<&-``): the glance CLI reads
    image data from any stdin that is not a terminal, and would upload an empty image.
    """
    command = shlex.join(argv)
    if not stdin:
        command += " <&-"
    if creds:
        if creds.startswith("~/"):
            source = '"$HOME"/' + shlex.quote(creds[2:])
        else:
            source = shlex.quote(creds)
        command = f". {source} && {command}"
    return command


class SshClient:
    """Runs commands on one destination account."""

    def __init__(self, target: SshTarget, *, creds: str | None = None) -> None:
        self.target = target
        self.creds = creds

    def argv(self, remote: Sequence[str], *, stdin: bool = False, creds: bool = True) -> list[str]:
        """The local argv that runs ``remote`` on the destination."""
        command = remote_command(remote, creds=self.creds if creds else None, stdin=stdin)
        return [*ssh_options(self.target), "--", self.target.destination, command]

    def run(
        self,
        remote: Sequence[str],
        *,
        what: str,
        timeout: float = 300,
        creds: bool = True,
        check: bool = True,
        cancel: threading.Event | None = None,
    ) -> processes.Completed:
        """Run ``remote`` there and wait; a failure raises :class:`RemoteError` with its output."""
        argv = self.argv(remote, creds=creds)
        done = processes.run(argv, what=what, timeout=timeout, check=False, cancel=cancel)
        for pause in LOGIN_RETRIES:
            if done.returncode != 255 or not login_refused(done.stderr) or cancelled(cancel):
                break
            log.info("the ssh login to %s was refused (%s); again in %.0f s",
                     self.target.destination, done.tail(1), pause)  # fmt: skip
            time.sleep(pause)
            done = processes.run(argv, what=what, timeout=timeout, check=False, cancel=cancel)
        if done.returncode == 255:
            raise RemoteError(self.lost(what, done))
        if check and done.returncode != 0:
            raise RemoteError(
                f"{what} on {self.target.host} failed (exit {done.returncode}): {done.tail()}"
            )
        return done

    def lost(self, what: str, done: processes.Completed) -> str:
        """Why ssh ended with 255: its own words, or (none: a command through a master whose
        connection died) that the connection was lost."""
        if done.tail():
            where = f"{self.target.destination} port {self.target.port}"
            return f"{what}: cannot log in to {where}: {done.tail()}"
        return f"{what}: {lost_connection(self.target)}"

    def start(self, remote: Sequence[str], *, what: str) -> processes.Child:
        """Start ``remote`` there with a pipe to its stdin, and return at once."""
        return processes.Child(self.argv(remote, stdin=True), what=what, stdin=True)


#: a master's private directory: ``<tmp>/migratio-ssh-XXXXXXXX``, holding its control socket
#: and a ``lock`` that the process owning the master holds (``flock``) for as long as it lives
CONTROL_DIR_PREFIX = "migratio-ssh-"
_LOCK = "lock"
#: the longest control socket path a master can use: a socket's path holds 107 bytes, and the
#: master first binds ``<path>.<16 random characters>``
_SOCKET_PATH_MAX = 107 - 17


def control_parent() -> Path:
    """Where master directories are made: the temporary directory, unless its path (a deep
    ``TMPDIR``) leaves no room for a control socket's; then ``/tmp``."""
    parent = Path(tempfile.gettempdir())
    if len(str(parent / f"{CONTROL_DIR_PREFIX}XXXXXXXX" / "master")) > _SOCKET_PATH_MAX:
        return Path("/tmp")  # noqa: S108  # mkdtemp: a private directory of a random name
    return parent


def remove_stale_control_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the master directories whose process is gone, and return them.

    A process killed outright (SIGKILL, the OOM killer) cannot remove its own; its master
    ends with it (parent-death signal), and with it the ``flock`` on the directory's
    ``lock``. A directory whose lock is held, or not there yet, is in use.
    """
    parent = control_parent() if parent is None else parent
    removed = []
    me = os.geteuid()
    for path in parent.glob(f"{CONTROL_DIR_PREFIX}*"):
        try:
            if path.is_symlink() or path.lstat().st_uid != me:
                continue
            fd = os.open(path / _LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its process lives
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d ssh master directories of killed processes", len(removed))
    return removed


def _locked_dir() -> tuple[Path, int]:
    """A new private master directory, and the fd of its ``lock``, held (``flock``).

    The lock is taken under another name and only then named ``lock``, so that
    :func:`remove_stale_control_dirs` never takes a new directory for a dead one.
    """
    path = Path(tempfile.mkdtemp(prefix=CONTROL_DIR_PREFIX, dir=control_parent()))
    try:
        fd = os.open(path / f"{_LOCK}.new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path / f"{_LOCK}.new", path / _LOCK)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, fd


class SshMaster:
    """One SSH connection that the later ssh commands to an account share (``ControlMaster``).

    Each login costs about ten round trips (TCP, key exchange, authentication, a channel) plus
    the key exchange's CPU; through a master a command costs one round trip to open its
    channel. The master is started in the background and never waited for: a command that
    comes before it is up (or after it died) logs in on its own, as without a master.

    The control socket lives in a private directory of its own (0700), and the master is an
    ordinary child (:mod:`~migratio.adapters.processes`): stopped with the migration, never left
    behind (no ``ControlPersist``). The directories of processes that were killed are removed by the
    next master (:func:`remove_stale_control_dirs`).
    """

    def __init__(self, target: SshTarget) -> None:
        self.plain = dataclasses.replace(target, control_path=None)
        remove_stale_control_dirs()
        self._dir, self._lock = _locked_dir()
        #: the target, reached through this master
        self.target = dataclasses.replace(target, control_path=self._dir / "master")
        self._child: processes.Child | None = None
        self._started = 0.0
        self._up = False
        #: one waiter at a time: a refused login is started again by one thread only
        self._waiting = threading.Lock()

    def __enter__(self) -> SshMaster:
        try:
            self._start()
        except Exception:
            self._remove_dir()
            raise
        return self

    def _start(self) -> None:
        argv = [*ssh_options(self.plain), "-M", "-N", "-o", "ControlPersist=no"]
        argv += ["-o", f"ControlPath={self.target.control_path}", "--", self.plain.destination]
        # the rsyncs' ssh hands its channel to the master, which encrypts their bytes: at the
        # bulk copy's priority, as that ssh ran before there were masters
        self._child = processes.Child(argv, what="ssh master connection", nice=NICE)
        self._started = time.monotonic()

    def wait(self) -> bool:
        """Wait until the master is up (True), or has failed or timed out (False).

        Commands that wait for it share its login instead of making one of their own
        at the same time. A login sshd refused (``MaxStartups``) is tried again, as any
        other: without the master every command would log in on its own, each at the
        same risk. Threads may wait at once (the lookups, the first stream).
        """
        with self._waiting:
            return self._wait()

    def _wait(self) -> bool:
        assert self.target.control_path is not None and self._child is not None
        pauses = iter(LOGIN_RETRIES)
        deadline = time.monotonic() + self.plain.connect_timeout + 5
        waited = False
        while time.monotonic() < deadline:
            if self.target.control_path.exists():
                if not self._up:
                    self._up = True
                    log.info("ssh master connection to %s %s %.2f s after its start",
                             self.plain.host, "up" if waited else "up before it was needed,",
                             time.monotonic() - self._started)  # fmt: skip
                return True
            waited = True
            if self._child.poll() is not None:
                ended = self._child.communicate(timeout=5)
                pause = next(pauses, None)
                if pause is None or not login_refused(ended.stderr):
                    log.info(
                        "ssh master connection to %s failed: %s",
                        self.plain.destination, ended.tail(1),
                    )  # fmt: skip
                    return False
                log.info("the ssh login to %s was refused (%s); again in %.1f s",
                         self.plain.destination, ended.tail(1), pause)  # fmt: skip
                time.sleep(pause)
                self._start()
                deadline = time.monotonic() + self.plain.connect_timeout + 5
                continue
            time.sleep(0.01)
        return False

    def __exit__(self, *_exc: object) -> None:
        if self._child is not None:
            self._child.stop(grace=2.0)
        self._remove_dir()

    def _remove_dir(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock)
