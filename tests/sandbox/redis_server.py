"""A throw-away redis-server on a free loopback port (nothing kept on disk unless asked)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Self

from redis import Redis

from ._process import Service, spawn, stop_process
from .ports import free_port, wait_port


class RedisServer(Service):
    """``redis-server`` for one test session; can be restarted on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, *, persistent: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        #: keep the data across restarts as production does (append-only file, fsync always)
        self.persistent = persistent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        """Start it and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self._proc = spawn(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             *persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not wait_port(self.port, timeout=10):
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server does not answer PING")

    def stop(self) -> None:
        """Stop it (its data is gone unless it is persistent)."""
        stop_process(self._proc)
        self._proc = None

    def crash(self) -> None:
        """SIGKILL it, as the OOM killer would (a persistent one keeps what it acknowledged)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self.stop()

    def client(self) -> Redis:
        """A redis-py client (bytes replies)."""
        return Redis.from_url(self.url)
