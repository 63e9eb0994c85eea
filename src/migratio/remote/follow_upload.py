"""Runs on the destination host (sent as ``python3 -c``; standard library only, Python 3.6+).

ASCII only: a Python 3.6 in the C locale (an SSH session without LANG) cannot even decode
a ``-c`` program that is not.

Feeds a file that rsync is still writing into a command's standard input -- the destination's
``glance image-create`` -- so that the upload overlaps the transfer instead of following it.
Once the command has succeeded the file is removed: it is in Glance now.

usage: follow_upload.py [--segment-size=BYTES] PATH SIZE ALGO HEXDIGEST IDLE_SECONDS -- COMMAND...
       follow_upload.py --check        (prints the Python version; touches nothing)

With ``--segment-size`` the file arrives in pieces, each written by its own rsync at once:
``PATH.0`` holds the first BYTES, ``PATH.1`` the next, and so on; they are fed in order.

The command gets EOF only after exactly SIZE bytes whose ALGO digest is HEXDIGEST, and only
once the local side has said ``done`` and is still connected; in every other case it is killed
first, so Glance sees a broken upload and never completes an image.
That holds however this helper ends, because EOF on a pipe needs every writer gone:

- this process (the feeder) writes the bytes into the command's stdin pipe;
- a guard, forked from it, holds a second write end of that pipe and is the command's parent
  (the command dies with it: ``PR_SET_PDEATHSIG``). It lets go of its write end only when the
  feeder says ``release`` after checking size and digest. If the feeder ends any other way --
  SIGTERM, SIGKILL, an exception, the SSH connection dropping -- the guard sees its lifeline
  close, kills the command and only then lets go: the command never sees EOF;
- if the guard itself is killed, the command dies with it while the feeder still holds its
  write end.

The local side writes ``done`` to our stdin when rsync has finished, and simply goes away (EOF
on our stdin) to abort.
"""

import contextlib
import ctypes
import fcntl
import hashlib
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

READ = 1 << 20
#: the pipe into the command holds this much (fcntl F_SETPIPE_SZ; the default is 64 KiB),
#: so that the command and this feeder are not woken for every 64 KiB
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
PR_SET_PDEATHSIG = 1
ABORTED = 3


class Hasher:
    """A digest computed in a thread of its own (hashlib lets go of the GIL), so that
    hashing a chunk overlaps writing the next one into the pipe."""

    def __init__(self, algo: str) -> None:
        self.hash = hashlib.new(algo)
        self.chunks = queue.Queue(maxsize=16)  # type: queue.Queue[Optional[bytes]]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            chunk = self.chunks.get()
            if chunk is None:
                return
            self.hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.chunks.put(chunk)

    def hexdigest(self) -> str:
        self.chunks.put(None)
        self.thread.join()
        return self.hash.hexdigest()


class Abort(Exception):
    """End the upload without letting the command complete it."""


def die_with(parent: int) -> None:
    """In the command, before exec: SIGKILL when ``parent`` (the guard) dies."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the guard's kill remains
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the guard died before prctl took effect
        os._exit(ABORTED)


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def guard(command: List[str], data_r: int, data_w: int, life_r: int) -> None:
    """The guard process: run the command, hold its stdin open until released; never returns."""
    me = os.getpid()
    child = subprocess.Popen(  # the guard has no threads
        command,
        stdin=data_r,
        preexec_fn=lambda: die_with(me),  # noqa: PLW1509
    )
    os.close(data_r)

    def stop(*_args: object) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            # it may have ended first (why the feeder gave up): its pipe closes a moment
            # before it can be reaped; meanwhile this guard's write end keeps EOF from it
            child.wait(timeout=0.5)
            say_how_it_ended(command[0], child.returncode)
        child.kill()
        child.wait()
        os._exit(ABORTED)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)
    while child.poll() is None:
        ready, _, _ = select.select([life_r], [], [], 0.5)
        if not ready:
            continue
        message = os.read(life_r, 64)
        if not message:
            stop()  # the feeder is gone without a release: the command must not finish
        if message.startswith(b"release"):
            os.close(data_w)  # the command sees EOF once the feeder has closed its end too
            os.close(life_r)
            for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)  # the bytes are right: let it finish
            child.wait()
            break
    else:
        say_how_it_ended(command[0], child.returncode)  # before it had all the bytes
    code = child.returncode
    os._exit(code if code >= 0 else 128 - code)


def say_how_it_ended(program: str, returncode: int) -> None:
    """Tell the migrating side that the upload command ended before it was released."""
    how = "killed by signal %d" % -returncode if returncode < 0 else "exit %d" % returncode
    with contextlib.suppress(OSError):
        sys.stderr.write(
            "follow_upload: %s ended before the upload was complete (%s)\n"
            % (os.path.basename(program), how)
        )
        sys.stderr.flush()


def interrupted(signum: int, _frame: object) -> None:
    raise Abort("stopped by signal %d" % signum)


def running(pid: int) -> bool:
    """Whether the child ``pid`` has not exited yet (without reaping it)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def main(argv: List[str]) -> int:
    if argv[1:] == ["--check"]:
        print("follow_upload ready on Python %d.%d.%d" % sys.version_info[:3])
        return 0
    segment = 0
    if argv[1].startswith("--segment-size="):
        segment = int(argv[1].split("=", 1)[1])
        argv = argv[:1] + argv[2:]
    path, size, algo, digest, idle = argv[1], int(argv[2]), argv[3], argv[4], float(argv[5])
    if argv[6] != "--":
        sys.exit("follow_upload: expected -- before the command")
    paths = ["%s.%d" % (path, k) for k in range(-(-size // segment))] if segment else [path]
    segment = segment or max(size, 1)
    data_r, data_w = os.pipe()
    with contextlib.suppress(OSError):  # not Linux, or a lower pipe-max-size: as it is
        fcntl.fcntl(data_w, F_SETPIPE_SZ, PIPE_SIZE)
    life_r, life_w = os.pipe()
    guard_pid = os.fork()
    if guard_pid == 0:
        try:
            os.close(life_w)
            guard(argv[7:], data_r, data_w, life_r)
        finally:
            os._exit(ABORTED)
    os.close(data_r)
    os.close(life_r)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    try:
        hasher = Hasher(algo)  # after the fork: the guard has no threads
        if not feed(paths, segment, size, idle, hasher, data_w, guard_pid):
            wait_for_done(idle, guard_pid)
        got = hasher.hexdigest()
        if got != digest:
            raise Abort("%s of the transferred file is %s, expected %s" % (algo, got, digest))
        if gone():
            raise Abort("the migrating side went away")
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # released below: the image may complete
        os.write(life_w, b"release")
    except BaseException as exc:
        os.close(life_w)  # the guard kills the command before its stdin can close
        os.waitpid(guard_pid, 0)
        reason = str(exc) if isinstance(exc, Abort) else "%s: %s" % (type(exc).__name__, exc)
        with contextlib.suppress(OSError):  # the connection may be gone
            sys.stderr.write("follow_upload: aborted: %s\n" % reason)
            sys.stderr.flush()
        return ABORTED
    os.close(data_w)
    code = exit_code(os.waitpid(guard_pid, 0)[1])
    if code == 0:
        for done in paths:
            with contextlib.suppress(FileNotFoundError):  # removed already: it is in Glance
                os.remove(done)
    return code


def feed(
    paths: List[str],
    segment: int,
    size: int,
    idle: float,
    hasher: Hasher,
    out: int,
    guard: int,
) -> bool:
    """Write the file's SIZE bytes (``paths[k]`` holding piece ``k`` of ``segment`` bytes) to
    ``out`` as rsync writes them; :class:`Abort` otherwise. Whether the migrating side has
    said ``done`` on the way."""
    fed = 0
    source: Optional[int] = None
    opened = -1
    rsync_done = False
    last_growth = time.monotonic()
    while fed < size:
        piece = fed // segment
        if piece != opened:
            if source is not None:
                os.close(source)
                source = None
            try:
                source = os.open(paths[piece], os.O_RDONLY)
                opened = piece
            except FileNotFoundError:
                source = None
        end = min(size, (piece + 1) * segment)
        chunk = os.read(source, min(READ, end - fed)) if source is not None else b""
        if chunk:
            hasher.update(chunk)
            try:
                write_all(out, chunk)
            except BrokenPipeError:
                raise Abort("the upload command stopped reading") from None
            fed += len(chunk)
            last_growth = time.monotonic()
            continue
        if not running(guard):
            raise Abort("the upload command exited early")
        if rsync_done:
            raise Abort("the transferred file is %d bytes, expected %d" % (fed, size))
        if time.monotonic() - last_growth > idle:
            raise Abort("the file stopped growing for %.0f s" % idle)
        if heard_done(0.1):
            rsync_done = True
    return rsync_done


def heard_done(seconds: float) -> bool:
    """Whether the migrating side said ``done`` within ``seconds``; :class:`Abort` if it went
    away (EOF on our stdin)."""
    ready, _, _ = select.select([0], [], [], seconds)
    if not ready:
        return False
    message = os.read(0, 64)
    if not message:
        raise Abort("the migrating side went away")
    return b"done" in message


def wait_for_done(idle: float, guard: int) -> None:
    """Wait for the migrating side's ``done``; :class:`Abort` if it went away.

    The whole file may be there before the migrating side says so (a re-run finds it, or
    the upload lags behind the transfer). If that side was killed meanwhile, its next
    attempt may already be looking for a copy, or uploading its own: a helper left
    behind must not complete a second image.
    """
    deadline = time.monotonic() + idle
    while time.monotonic() < deadline:
        if not running(guard):
            raise Abort("the upload command exited early")
        if heard_done(0.1):
            return
    raise Abort("the migrating side did not confirm the transfer for %.0f s" % idle)


def gone() -> bool:
    """Whether our stdin -- the SSH channel from the migrating side -- has reached its end.

    Asked last, just before the command may complete the image: by then the command has
    made the image's record, so an attempt that starts after the migrating side died
    finds that record (and deletes it, or takes the finished copy) -- never no copy.
    """
    while True:
        ready, _, _ = select.select([0], [], [], 0)
        if not ready:
            return False
        if not os.read(0, 64):
            return True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
