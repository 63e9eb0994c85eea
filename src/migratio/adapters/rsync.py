"""Adapter for rsync over SSH: resumable, progress-reporting copies to a destination host."""

from __future__ import annotations

import logging
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from migratio.adapters import processes
from migratio.adapters.ssh import (
    LOGIN_RETRIES,
    NICE,
    cancelled,
    login_refused,
    lost_connection,
    rsync_shell,
)
from migratio.config import SshTarget
from migratio.errors import TransferError

log = logging.getLogger(__name__)

RSYNC = "rsync"
#: zstd's level: rsync's default (3) costs the sender about three times lz4's CPU, level 1
#: about half again as much, for ~0.34 of an OS-like image against lz4's ~0.49 (bench/RESULTS.md)
ZSTD_LEVEL = 1
_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%")
_SENT = re.compile(r"Total bytes sent:\s*([\d,]+)")


@dataclass(frozen=True)
class RsyncResult:
    """What a finished rsync moved."""

    bytes_sent: int
    #: how long it took, and the compression it really used (after a peer's refusal: none)
    seconds: float = 0.0
    compress: str = "none"


def push(
    source: Path,
    target: SshTarget,
    remote_path: str,
    *,
    sparse: bool,
    timeout: float,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    io_timeout: int = 300,
    compress: str = "none",
    bwlimit: int | None = None,
    make_dir: str | None = None,
    renice_sshd: bool = True,
) -> RsyncResult:
    """Copy ``source`` to ``remote_path`` on ``target`` (first creating ``make_dir`` there).

    ``--inplace`` writes straight into ``remote_path``, so an interrupted copy leaves the part
    that arrived and a re-run only sends what is missing or different (rsync's own block
    checksums check the part already there). ``--sparse`` only for raw files with holes:
    on a file without holes it costs a quarter of the speed and saves nothing.

    ``compress`` is ``zstd``, ``lz4`` or ``none``; a peer whose rsync cannot do it fails at
    the start, and the copy is then run once more without compression. ``bwlimit`` caps the
    bytes per second on the wire (rsync's ``--bwlimit``, in KiB/s). ``make_dir`` is
    created by the same remote command that starts rsync there (``--rsync-path``), which
    saves a login of its own.

    rsync runs at nice 10 at both ends, and so does the sshd that decrypts its bytes there,
    unless ``renice_sshd`` is false: an sshd whose connection also carries the upload helper
    must keep its priority, since every process it starts later inherits it -- the helper
    feeds the upload into Glance, which the bulk copy is niced to make way for.
    """
    begin = time.monotonic()
    argv = _argv(
        source, target, remote_path, sparse, io_timeout, compress, bwlimit, make_dir, renice_sshd
    )

    def on_line(line: str) -> None:
        match = _PROGRESS.match(line)
        if match and on_progress is not None:
            on_progress(int(match.group(1).replace(",", "")))

    def run(argv: list[str]) -> processes.Completed:
        """One run of rsync, within what is left of ``timeout``."""
        remaining = max(timeout - (time.monotonic() - begin), 1.0)
        return processes.run(
            argv,
            what="rsync",
            timeout=remaining,
            cancel=cancel,
            check=False,
            on_line=on_line,
            nice=NICE,
        )

    done = run(argv)
    for pause in LOGIN_RETRIES:
        # rsync exits 255 or 12 (its stream closed before ssh was reaped), as it happens
        if done.returncode == 0 or not login_refused(done.stderr) or cancelled(cancel):
            break
        log.info("the ssh login to %s was refused (%s); again in %.0f s",
                 target.destination, done.tail(1), pause)  # fmt: skip
        time.sleep(pause)
        done = run(argv)
    if done.returncode != 0 and compress != "none" and _refused_compression(done.stderr):
        log.warning(
            "rsync at %s cannot do %s compression (%s); sending uncompressed",
            target.destination, compress, done.tail(),
        )  # fmt: skip
        compress = "none"
        done = run(
            _argv(
                source, target, remote_path, sparse, io_timeout, compress, bwlimit, make_dir,
                renice_sshd,
            )
        )  # fmt: skip
    if done.returncode != 0:
        host_key = "Host key verification failed" in done.stderr
        why = why_it_failed(done, target)
        raise TransferError(
            f"rsync to {target.destination} failed (exit {done.returncode}): {why}",
            retryable=not host_key,
        )
    sent = _SENT.search(done.stdout)
    return RsyncResult(
        bytes_sent=int(sent.group(1).replace(",", "")) if sent else 0,
        seconds=time.monotonic() - begin,
        compress=compress,
    )


#: what rsync says, and only says, when its ssh connection ends under it
_CONNECTION_ENDED = re.compile(
    r"rsync(?: error)?: (?:\[\w+\] )?(?:connection unexpectedly closed"
    r"|(?:write|read) error: (?:Broken pipe|Connection reset by peer)"
    r"|safe_(?:read|write) failed to (?:read|write) \d+ bytes[^:]*: "
    r"(?:Broken pipe|Connection reset by peer)"
    r"|error in rsync protocol data stream \(code 12\)|unexplained error \(code 255\))"
)


def why_it_failed(done: processes.Completed, target: SshTarget) -> str:
    """rsync's last words; when they only say that its connection ended (exit 12 or 255, and
    every line one of :data:`_CONNECTION_ENDED`'s: "connection unexpectedly closed", "Broken
    pipe"), what that means first. A line of ssh's (a refused login, a host key) or of the
    rsync there (an option it does not know) is shown as it is."""
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    if done.returncode in (12, 255) and all(map(_CONNECTION_ENDED.match, lines)):
        said = f" ({' | '.join(lines[-5:])})" if lines else ""
        return f"{lost_connection(target)}, or rsync there was stopped{said}"
    return done.tail()


def _refused_compression(stderr: str) -> bool:
    text = stderr.lower()
    return "compress" in text and ("unknown option" in text or "negotiat" in text or
                                   "not supported" in text or "invalid" in text or
                                   "unknown compress" in text)  # fmt: skip


def _argv(
    source: Path,
    target: SshTarget,
    remote_path: str,
    sparse: bool,
    io_timeout: int,
    compress: str,
    bwlimit: int | None,
    make_dir: str | None = None,
    renice_sshd: bool = True,
) -> list[str]:
    argv = [
        RSYNC,
        "--inplace",
        "--times",
        "--info=progress2",
        "--stats",
        "--no-human-readable",
        f"--timeout={io_timeout}",
        "-e",
        rsync_shell(target),
    ]
    remote = f"nice -n {NICE} rsync"
    if make_dir is not None:
        remote = f"mkdir -p -- {shlex.quote(make_dir)} && {remote}"
    # with the kernel's autogroups the CPU is shared between sessions first, and sshd runs
    # this command in a session of its own: that session's nice value too. The kernel takes
    # one such change per 100 ms from the whole machine (EAGAIN otherwise), so it is tried
    # a few times, beside rsync, which need not wait for it
    autogroup = f"echo {NICE} >/proc/self/autogroup && exit; sleep 0.05"
    remote = (
        f"( for _ in 1 2 3 4 5 6 7 8; do {autogroup}; done ) </dev/null >/dev/null 2>&1 & {remote}"
    )
    if renice_sshd:
        # that sshd is the user's process too: at the same priority (its later children would
        # inherit it, hence not when the connection also carries the helper)
        remote = f'renice -n {NICE} -p "$PPID" >/dev/null 2>&1; {remote}'
    # the remote shell runs "<rsync-path> --server ...": every word of ours is quoted
    argv.append(f"--rsync-path={remote}")
    if sparse:
        argv.append("--sparse")
    if compress != "none":
        argv += ["--compress", f"--compress-choice={compress}"]
        if compress == "zstd":
            argv.append(f"--compress-level={ZSTD_LEVEL}")
    if bwlimit is not None:
        argv.append(f"--bwlimit={max(1, round(bwlimit / 1024))}")
    argv += ["--", str(source), f"{target.destination}:{remote_path}"]
    return argv
