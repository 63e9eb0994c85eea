"""Small helpers for the sandbox's long-running child processes."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from .ports import LOOPBACK, free_port

_LIVE: set[subprocess.Popen[bytes]] = set()

# A tiny init for one daemon: it becomes a "child subreaper", runs argv, forwards
# SIGTERM/SIGINT/SIGHUP to it and reaps every orphan that the daemon leaves behind.
# sshd orphans a process per connection; where PID 1 does not reap (containers,
# microVMs) those would pile up as zombies. When the daemon exits, remaining
# descendants get SIGTERM (then SIGKILL) so nothing outlives the sandbox.
_REAPER = r"""
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = subprocess.Popen(sys.argv[1:])
def forward(sig, _frame):
    if child.returncode is None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
def orphans():
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.append(int(entry))
    return found
code, deadline = 0, None
while True:
    try:
        pid, status = os.waitpid(-1, os.WNOHANG if deadline else 0)
    except ChildProcessError:
        break
    if pid == child.pid:
        child.returncode = code = os.waitstatus_to_exitcode(status)
        deadline = time.monotonic() + 5
    if deadline and pid == 0:
        sig = signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL
        for orphan in orphans():
            try:
                os.kill(orphan, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
sys.exit(code if code >= 0 else 128 - code)
"""


def reaped(argv: list[str]) -> list[str]:
    """``argv`` run under a subreaper that reaps (and finally ends) the daemon's orphans."""
    return [sys.executable, "-c", _REAPER, *argv]


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen a daemon in its own session; it is stopped at interpreter exit if still alive."""
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    _LIVE.add(proc)
    return proc


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM a child started by ``spawn`` and its process group; SIGKILL if slow."""
    if proc is None:
        return
    _LIVE.discard(proc)
    if proc.poll() is not None:
        return
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    _kill_group(proc.pid, signal.SIGKILL)  # stragglers of the group, right after the leader


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


def child_env(**extra: str) -> dict[str, str]:
    """The current environment minus Python settings that would leak into other venvs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
        and not k.startswith("OS_")
    }
    env.update(extra)
    return env


def spawn_logged(
    argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``spawn`` a daemon whose stdout and stderr go to ``log_path``."""
    log_file = log_path.open("ab")
    proc = spawn(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    return proc, log_file


def wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float) -> str:
    """Poll ``ready()`` until it is true (return ''), or say why the daemon is not ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if ready():
            return ""
        time.sleep(0.1)
    code = proc.poll()
    return "timed out" if code is None else f"it exited with {code}"


class Service:
    """A start()/stop() pair usable as a context manager."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PortDaemon(Service):
    """A Service that is one child process listening on a free port of 127.0.0.1.

    Subclasses implement ``_serve()``: start on ``self.port``, return '' once it answers or
    say why not (having stopped it). ``_serve_on_a_free_port()`` tries fresh ports.
    """

    START_ATTEMPTS = 3

    def __init__(self) -> None:
        self.port = 0
        #: where it listens: 127.0.0.1, or the destination host's address (``place()``)
        self.address = LOOPBACK
        self._exec_prefix: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def place(self, address: str, exec_prefix: list[str]) -> None:
        """Run on another host: listen on ``address``, start through ``exec_prefix``.

        ``exec_prefix`` is e.g. ``["ip", "netns", "exec", NAME]`` (see ``network.py``).
        """
        self.address = address
        self._exec_prefix = list(exec_prefix)

    @property
    def endpoint(self) -> str:
        """``http://ADDRESS:PORT`` (``ADDRESS`` is 127.0.0.1 unless placed elsewhere)."""
        return f"http://{self.address}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the daemon is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The daemon's pid, which is also its process group's (valid while it runs)."""
        assert self._proc is not None, "not running"
        return self._proc.pid

    def _serve(self) -> str:
        raise NotImplementedError

    def _serve_on_a_free_port(self) -> str:
        """'' once ``_serve()`` worked on some port, else the last attempt's error text."""
        error = ""
        for _ in range(self.START_ATTEMPTS):  # a port can be taken between pick and bind
            self.port = free_port()
            error = self._serve()
            if not error:
                return ""
        return error

    def stop(self) -> None:
        """Terminate the daemon (its whole process group) and close its log."""
        stop_process(self._proc)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class UwsgiDaemon(PortDaemon):
    """An OpenStack API (Glance, Keystone) served by uWSGI from the venv ``venv``.

    Subclasses set ``KIND`` and ``ERROR`` and the attributes below, and implement ``_env()``
    (the service's environment) and ``_ready()`` (it answers).
    """

    #: the service's name in messages ("Glance") and, lower case, in the process name
    KIND = ""
    #: what a failed start or set-up raises
    ERROR: type[Exception] = RuntimeError
    READY_TIMEOUT = 60.0
    #: a second address to listen on (same port), besides where it is placed
    also_on: str | None = None

    name: str
    dir: Path
    venv: Path
    log_path: Path
    uwsgi_log_path: Path

    def _env(self) -> dict[str, str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _manage(self, argv: list[str], what: str, *, cwd: Path | None = None) -> None:
        """Run a set-up command (``*-manage``); raise ``ERROR`` with its output if it fails."""
        result = subprocess.run(
            argv, cwd=cwd, env=self._env(), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise self.ERROR(
                f"{what} failed ({result.returncode}) for {self.name}:\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}\n{tail(self.log_path)}"
            )

    def _serve_uwsgi(self, app: list[str], options: list[str]) -> str:
        """Start uWSGI with the application ``app`` and ``options`` and wait for the API;
        return '' when ready, else an error text."""
        sockets = ["--http-socket", f"{self.address}:{self.port}"]
        if self.also_on:
            sockets += ["--http-socket", f"{self.also_on}:{self.port}"]
        argv = [
            *self._exec_prefix,
            str(self.venv / "bin" / "uwsgi"),
            *sockets,
            *app,
            "--master", "--processes", "1", "--threads", "4", "--enable-threads",
            "--die-on-term", "--need-app", "--lazy-apps",
            *options,
            "--buffer-size", "65535",
            # --http-socket closes every connection after the response; saying so stops
            # clients from reusing a pooled, already-closed connection ("connection reset")
            "--add-header", "Connection: close",
            "--procname-prefix-spaced", f"migratio-sandbox-{self.KIND.lower()}-{self.name}",
        ]  # fmt: skip
        self._proc, self._log_file = spawn_logged(
            argv, cwd=self.dir, env=self._env(), log_path=self.uwsgi_log_path
        )
        why = wait_ready(self._proc, self._ready, self.READY_TIMEOUT)
        if not why:
            return ""
        self.stop()
        return (
            f"{self.KIND} {self.name!r} on {self.endpoint} did not start ({why}).\n"
            f"--- {self.uwsgi_log_path} ---\n{tail(self.uwsgi_log_path)}\n"
            f"--- {self.log_path} ---\n{tail(self.log_path)}"
        )
