"""A throw-away redis-server on a free loopback port (nothing kept on disk)."""

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

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        """Start it and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = spawn(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
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
        """Stop it (its data is gone)."""
        stop_process(self._proc)
        self._proc = None

    def client(self) -> Redis:
        """A redis-py client (bytes replies)."""
        return Redis.from_url(self.url)
