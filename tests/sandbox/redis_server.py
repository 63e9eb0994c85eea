"""A throw-away redis-server on a free loopback port (nothing kept on disk unless asked).

With ``tls=True`` it speaks only TLS, with certificates made by ``openssl`` for the occasion
(a CA, a server certificate for 127.0.0.1, a client certificate it requires), and with
``users`` it has ACL users instead of the default user, as a production Redis shared with
Atmosphere would. With ``persistent=True`` it keeps its data across restarts as production
runs it (an append-only file, fsync on every write). With ``also_on`` it listens on that
address too (the sandbox's end of its veth, reached from the second host; see ``network.py``).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

from redis import Redis

from ._process import Service, spawn, stop_process
from .ports import free_port, wait_port


@dataclass(frozen=True)
class TlsFiles:
    """A CA, and a certificate + key signed by it for each side."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh CA with a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        *(directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key"))
    )
    ca_key = directory / "ca.key"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(files.ca), "-days", "2",
             "-subj", "/CN=migratio test CA")  # fmt: skip
    for name, cert, key, ext in (
        (
            "127.0.0.1",
            files.server_cert,
            files.server_key,
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ),
        ("migratio", files.client_cert, files.client_key, "extendedKeyUsage=clientAuth"),
    ):
        csr = directory / f"{name}.csr"
        extfile = directory / f"{name}.ext"
        extfile.write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        sign = ["-CA", str(files.ca), "-CAkey", str(ca_key), "-CAcreateserial"]
        _openssl("x509", "-req", "-in", str(csr), *sign, "-out", str(cert), "-days", "2",
                 "-extfile", str(extfile))  # fmt: skip
    return files


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class RedisServer(Service):
    """``redis-server`` for one test session; can be restarted on the same port.

    ``users`` maps ACL user names to ``(password, rules)``, e.g.
    ``{"migratio": ("pw", "~* &* +@all")}``; the default user is then switched off and
    :attr:`url` logs in as the first one. ``also_on`` is a second address to listen on, besides
    127.0.0.1: one that exists only on the sandbox's veth (198.18.0.0/15), so protected mode
    (loopback clients only) is switched off for it.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        tls: bool = False,
        users: dict[str, tuple[str, str]] | None = None,
        persistent: bool = False,
        also_on: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = make_tls_files(workdir / "tls") if tls else None
        self.users = users or {}
        self.persistent = persistent
        self.also_on = also_on
        self._proc: subprocess.Popen[bytes] | None = None

    def url_for(
        self, user: str | None = None, password: str | None = None, *, host: str = "127.0.0.1"
    ) -> str:
        """The URL as ``user`` (default: the first ACL user, if any), password %-encoded."""
        scheme = "rediss" if self.tls else "redis"
        if user is None and self.users:
            user = next(iter(self.users))
        if user is not None and password is None:
            password = self.users[user][0]
        login = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
        return f"{scheme}://{login}{host}:{self.port}/0"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``rediss://USER:PASSWORD@…`` with TLS and users)."""
        return self.url_for()

    def start(self) -> Self:
        """Start it and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        appendonly = "appendonly yes\nappendfsync always" if self.persistent else "appendonly no"
        bind = f"bind 127.0.0.1 {self.also_on}" if self.also_on else "bind 127.0.0.1"
        lines = [bind, 'save ""', appendonly, f"dir {self.workdir}"]
        if self.also_on:  # reached from the second host, which protected mode would refuse
            lines.append("protected-mode no")
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls.server_cert}",
                f"tls-key-file {self.tls.server_key}",
                f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients yes",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.users:
            lines.append("user default off")
            for name, (password, rules) in self.users.items():
                lines.append(f"user {name} on >{password} {rules}")
        conf = self.workdir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self._proc = spawn(
            ["redis-server", str(conf)],
            stdout=(self.workdir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        if not wait_port(self.port, timeout=10):
            self.stop()
            log = (self.workdir / "redis.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"redis-server did not start on port {self.port}: {log}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server does not answer PING")

    @property
    def pid(self) -> int:
        """redis-server's pid, which is also its process group's (valid while it runs)."""
        assert self._proc is not None, "not running"
        return self._proc.pid

    def stop(self) -> None:
        """Stop it (its data is gone)."""
        stop_process(self._proc)
        self._proc = None

    def crash(self) -> None:
        """SIGKILL it, as the OOM killer would (a persistent one keeps what it acknowledged)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self.stop()

    def client_options(self) -> dict[str, Any]:
        """redis-py's TLS options for this server (empty without TLS)."""
        if not self.tls:
            return {}
        return {
            "ssl_ca_certs": str(self.tls.ca),
            "ssl_certfile": str(self.tls.client_cert),
            "ssl_keyfile": str(self.tls.client_key),
        }

    def client(self) -> Redis:
        """A redis-py client (bytes replies), logged in as :attr:`url` says."""
        return Redis.from_url(self.url, **self.client_options())
