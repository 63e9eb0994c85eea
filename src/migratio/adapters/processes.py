"""The one place where migratio starts child processes.

Every external tool (qemu-img, rsync, ssh) runs through here: argv lists only, never a shell;
each child in its own session so that a Ctrl-C or a signal aimed at migratio never reaches a
running ``qemu-img`` directly; every run has a deadline and can be cancelled, and stopping a
child is always SIGTERM to its process group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from migratio.errors import Cancelled, ToolError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started us dies.

    A worker killed with SIGKILL must not leave an rsync writing on while its job is re-run.
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


#: how often, and how far apart, a session's nice value is tried (the kernel takes one
#: change per 100 ms from the whole machine, and says EAGAIN to the rest)
AUTOGROUP_TRIES = 8
AUTOGROUP_PAUSE = 0.05


def _preexec(nice: int) -> Callable[[], None]:
    def setup() -> None:
        _die_with_parent()
        if nice:
            os.nice(nice)

    return setup


def lower_autogroup(pid: int, nice: int) -> None:
    """Give the session of ``pid`` (a child of ours, in a session of its own) the nice value
    ``nice`` too, from a thread of ours, the child going on meanwhile.

    With the kernel's autogroups (``sched_autogroup_enabled``, on by default in Debian's and
    Ubuntu's kernels) the CPU is shared between sessions first, and a process's own nice
    value only counts within its session: an rsync at nice 10 in a session of its own took
    as much of the CPU as the Glance upload it was niced to make way for. A kernel without
    autogroups has no such file: its nice value is all there is.
    """

    def lower() -> None:
        for attempt in range(AUTOGROUP_TRIES):
            try:
                fd = os.open(f"/proc/{pid}/autogroup", os.O_WRONLY)
            except OSError:
                return  # no autogroups here, or the child is gone
            try:
                os.write(fd, str(nice).encode())
                return
            except BlockingIOError:  # EAGAIN: another change within the last 100 ms
                if attempt + 1 < AUTOGROUP_TRIES:
                    time.sleep(AUTOGROUP_PAUSE)
            except OSError:
                return
            finally:
                os.close(fd)

    threading.Thread(target=lower, name=f"autogroup-{pid}", daemon=True).start()


#: how long a child gets between SIGTERM and SIGKILL
STOP_GRACE = 10.0
_POLL = 0.25


@dataclass(frozen=True)
class Completed:
    """A finished child: its exit code and what it printed."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def tail(self, lines: int = 5) -> str:
        """The last lines of stderr (else stdout), for error messages."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(text[-lines:])


class Child:
    """A running child process in its own process group."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        what: str,
        stdin: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        nice: int = 0,
    ) -> None:
        """Start ``argv``; ``nice`` lowers its CPU priority (and its children's)."""
        self.argv = tuple(argv)
        self.what = what
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_preexec(nice),  # noqa: PLW1509  # no threads touch this in the child
            )
        except FileNotFoundError as exc:
            raise ToolError(f"{what}: program {self.argv[0]!r} not found on PATH") from exc
        except OSError as exc:
            raise ToolError(f"{what}: cannot start {self.argv[0]!r}: {exc}") from exc
        log.debug("started %s (pid %d): %s", what, self.popen.pid, " ".join(self.argv))
        if nice:
            lower_autogroup(self.popen.pid, nice)

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.popen.poll()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the child's whole process group, SIGKILL it if it is still there after grace."""
        if self.popen.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs of SIGTERM; killing it", self.what, grace)
            self._signal(signal.SIGKILL)
            self.popen.wait()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)

    def communicate(
        self,
        *,
        timeout: float,
        cancel: threading.Event | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> Completed:
        """Wait for the child, collecting its output; lines of stdout go to ``on_line``.

        Lines end at ``\\n`` or ``\\r`` (rsync redraws its progress with ``\\r``).
        Raises :class:`ToolError` on timeout and :class:`Cancelled` when ``cancel`` is set;
        in both cases the child is stopped first.
        """
        assert self.popen.stdout is not None
        assert self.popen.stderr is not None
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        pending = b""
        selector = selectors.DefaultSelector()
        selector.register(self.popen.stdout, selectors.EVENT_READ, out)
        selector.register(self.popen.stderr, selectors.EVENT_READ, err)
        try:
            while selector.get_map():
                if cancel is not None and cancel.is_set():
                    self.stop()
                    raise Cancelled(f"{self.what} was stopped on request")
                if time.monotonic() > deadline:
                    self.stop()
                    raise ToolError(f"{self.what} timed out after {timeout:.0f}s", retryable=True)
                for key, _ in selector.select(_POLL):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    key.data.append(chunk)
                    if on_line is not None and key.data is out:
                        pending += chunk
                        *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                        for line in lines:
                            if line.strip():
                                on_line(line.decode("utf-8", "replace"))
            if on_line is not None and pending.strip():
                on_line(pending.decode("utf-8", "replace"))
            remaining = max(deadline - time.monotonic(), 1.0)
            try:
                returncode = self.popen.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                self.stop()
                raise ToolError(
                    f"{self.what} timed out after {timeout:.0f}s", retryable=True
                ) from None
        finally:
            selector.close()
        return Completed(
            self.argv,
            returncode,
            b"".join(out).decode("utf-8", "replace"),
            b"".join(err).decode("utf-8", "replace"),
        )


class Daemon:
    """A long-running child (a worker process) sharing migratio's stdout and stderr.

    It gets the signals migratio forwards to it, not migratio's own (its own session), and
    SIGTERM (a warm stop) if migratio dies.
    """

    def __init__(self, argv: Sequence[str], *, what: str) -> None:
        self.what = what
        try:
            self.popen = subprocess.Popen(
                tuple(argv),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509  # as in Child
            )
        except OSError as exc:
            raise ToolError(f"{what}: cannot start {argv[0]!r}: {exc}") from exc
        log.info("started %s (pid %d)", what, self.popen.pid)

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child itself."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)


def run(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    cancel: threading.Event | None = None,
    on_line: Callable[[str], None] | None = None,
    error: type[ToolError] = ToolError,
    nice: int = 0,
) -> Completed:
    """Run ``argv`` to completion; with ``check``, a non-zero exit raises ``error``."""
    child = Child(argv, what=what, env=env, cwd=cwd, nice=nice)
    try:
        done = child.communicate(timeout=timeout, cancel=cancel, on_line=on_line)
    finally:
        child.stop()
    if check and done.returncode != 0:
        raise error(f"{what} failed (exit {done.returncode}): {done.tail()}")
    return done
