"""A real OpenSSH server on 127.0.0.1 with its own host key and one allowed user.

As root the remote user is the system user ``migratio-sandbox`` (created when
missing; ``$MIGRATIO_SANDBOX_USER`` names another, so that two checkouts can test side by
side); otherwise it is the current user.  sshd's own files (config, host key,
pid, log) live in ``workdir``; the authorized keys file lives in the user's home
so that sshd can read it with the user's rights.

Only one SshServer per user can run at a time: the user's home (``~/.creds``,
``~/.migratio-staging``) is shared, so ``start()`` takes an exclusive lock and
waits for another sandbox (say, a demo running next to pytest) to finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from ._process import PortDaemon, reaped, spawn, stop_process, tail
from .ports import port_open

SANDBOX_USER = os.environ.get("MIGRATIO_SANDBOX_USER", "migratio-sandbox")
SSHD = "/usr/sbin/sshd"


def lock_holder(lock_path: Path) -> str:
    """Who holds a sandbox lock: 'pid N (its command line)', as far as can be told."""
    try:
        pid = int(lock_path.read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return "another process"
    command = " ".join(a.decode(errors="replace") for a in argv if a)
    return f"pid {pid} ({command[:120]})"


class SshServerError(RuntimeError):
    """sshd did not come up, or the sandbox user could not be prepared."""


class SshServer(PortDaemon):
    """sshd on a free port of 127.0.0.1 that lets ``.user`` in with ``.client_key`` only."""

    LOCK_TIMEOUT = 900.0

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.dir = Path(workdir).resolve()
        self.is_root = os.geteuid() == 0
        self.user = SANDBOX_USER if self.is_root else pwd.getpwuid(os.geteuid()).pw_name
        self.home = Path()
        self.host_key = self.dir / "host_key"
        self.host_key_pub = self.dir / "host_key.pub"
        self.client_key = self.dir / "client_key"
        self.client_key_pub = self.dir / "client_key.pub"
        self.known_hosts = self.dir / "known_hosts"
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.pid_path = self.dir / "sshd.pid"
        self.authorized_keys = Path()
        self._lock: IO[str] | None = None
        #: lines added to sshd's config (:meth:`reconfigure`)
        self.extra_config: list[str] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> SshServer:
        """Prepare user and keys, start ``sshd -D``, wait until it accepts connections."""
        if self._proc is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._prepare_user()
            self._prepare_keys()
            error = self._serve_on_a_free_port()
            if error:
                raise SshServerError(error)
            self._write_known_hosts(self.known_hosts, self.host_key_pub)
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate sshd (and any session it still runs) and release the user lock."""
        super().stop()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _take_lock(self) -> None:
        lock_path = Path(f"/tmp/migratio-sandbox-{self.user}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, 0o666)  # shared by root and non-root sandboxes of this user
        except PermissionError:
            fd = os.open(lock_path, os.O_RDONLY)
        lock = os.fdopen(fd, "r+" if os.access(lock_path, os.W_OK) else "r")
        deadline = time.monotonic() + self.LOCK_TIMEOUT
        waiting = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    print(  # a wait of minutes must not look like a hang
                        f"[sandbox] waiting up to {self.LOCK_TIMEOUT:.0f} s for "
                        f"{lock_holder(lock_path)} to finish: it holds {lock_path}, and user "
                        f"{self.user}'s home is shared (MIGRATIO_SANDBOX_USER=another-user "
                        "runs side by side)",
                        file=sys.stderr,
                        flush=True,
                    )
                if time.monotonic() > deadline:
                    lock.close()
                    raise SshServerError(
                        f"{lock_holder(lock_path)} still holds {lock_path} after "
                        f"{self.LOCK_TIMEOUT:.0f} s (user {self.user} is shared)"
                    ) from None
                time.sleep(0.5)
        if lock.writable():  # who holds it, for the next one's waiting message
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
        self._lock = lock

    def _prepare_user(self) -> None:
        if self.is_root:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                _run(["useradd", "--create-home", "--shell", "/bin/sh", self.user])
            # a '!' password means "locked": sshd refuses even key logins then
            _run(["usermod", "-p", "*", self.user])
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        entry = pwd.getpwnam(self.user)
        self.home = Path(entry.pw_dir)
        if self.is_root:
            self.home.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chown(self.home, entry.pw_uid, entry.pw_gid)

    def _prepare_keys(self) -> None:
        for key in (self.host_key, self.client_key):
            if not key.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name,
                      "-f", str(key)])  # fmt: skip
            key.chmod(0o600)
        ssh_dir = self.home / ".ssh"
        self.authorized_keys = ssh_dir / "migratio-sandbox-authorized_keys"
        text = self.client_key_pub.read_text()
        self._write_as_user(self.authorized_keys, text, 0o600)

    def _write_config(self) -> None:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.address}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            "StrictModes no",
            "UsePAM no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "PrintMotd no",
            "Subsystem sftp internal-sftp",
            f"AllowUsers {self.user}",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def reconfigure(self, *lines: str) -> None:
        """Add ``lines`` to the running sshd's config (none: back to the sandbox's own).

        sshd re-reads it on SIGHUP (it executes itself again); this returns once it listens.
        """
        self.extra_config = list(lines)
        self._write_config()
        restarted = self.log_path.read_text(errors="replace").count("Server listening on") + 1
        os.kill(int(self.pid_path.read_text().split()[0]), signal.SIGHUP)
        deadline = time.monotonic() + 15
        while self.log_path.read_text(errors="replace").count("Server listening on") < restarted:
            if time.monotonic() > deadline:
                raise SshServerError(f"sshd did not restart:\n{tail(self.log_path)}")
            time.sleep(0.05)

    def _serve(self) -> str:
        """Start sshd on ``self.port``; '' when it listens, else an error text."""
        self._write_config()
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:  # sshd -E appends here too
            self._proc = spawn(
                [
                    *self._exec_prefix,
                    *reaped([SSHD, "-D", "-f", str(self.config_path), "-E", str(self.log_path)]),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if port_open(self.port, self.address):
                return ""
            time.sleep(0.05)
        code = self._proc.poll()
        stop_process(self._proc)
        self._proc = None
        why = "timed out" if code is None else f"sshd exited with {code}"
        return f"sshd on port {self.port} did not start ({why}):\n{tail(self.log_path)}"

    # -- known_hosts -------------------------------------------------------------

    def _write_known_hosts(self, path: Path, pub: Path) -> None:
        keytype, b64 = pub.read_text().split()[:2]
        Path(path).write_text(f"[{self.address}]:{self.port} {keytype} {b64}\n")

    def wrong_known_hosts(self, path: Path) -> Path:
        """Write a known_hosts that pins a DIFFERENT host key for address:port."""
        path = Path(path)
        other = path.with_name(path.name + ".other_key")
        other.unlink(missing_ok=True)
        other.with_name(other.name + ".pub").unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
        self._write_known_hosts(path, other.with_name(other.name + ".pub"))
        return path

    # -- acting as the remote user ------------------------------------------------

    @property
    def destination(self) -> str:
        """``user@ADDRESS`` for ssh/rsync (127.0.0.1 unless placed on another host)."""
        return f"{self.user}@{self.address}"

    def ssh_argv(self, known_hosts: Path | None = None) -> list[str]:
        """``ssh`` argv (without destination) that trusts only this server's host key."""
        return [
            "ssh", "-F", "/dev/null",
            "-i", str(self.client_key), "-p", str(self.port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def run_as_user(
        self,
        argv: list[str] | str,
        *,
        known_hosts: Path | None = None,
        timeout: float = 120.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as the remote user over ssh (a str is passed to the remote shell)."""
        remote = argv if isinstance(argv, str) else shlex.join(argv)
        return subprocess.run(
            [*self.ssh_argv(known_hosts), self.destination, remote],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def write_home_file(self, relpath: str | Path, text: str, mode: int = 0o600) -> Path:
        """Write ``~user/relpath`` (parents created), owned by the user."""
        path = self.home / relpath
        self._write_as_user(path, text, mode)
        return path

    def remove_home_path(self, relpath: str | Path) -> None:
        """Remove ``~user/relpath`` (file or tree) if it exists."""
        path = self.home / relpath
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def _write_as_user(self, path: Path, text: str, mode: int) -> None:
        entry = pwd.getpwnam(self.user)
        parent = path.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir(mode=0o700)
            if self.is_root:
                os.chown(directory, entry.pw_uid, entry.pw_gid)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        if self.is_root:
            os.chown(tmp, entry.pw_uid, entry.pw_gid)
        tmp.replace(path)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SshServerError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr}")
