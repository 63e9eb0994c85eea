"""A TCP forwarder: a loopback-only service made reachable on this host's veth address.

The sandbox's Redis and source Glance listen on 127.0.0.1; a worker on the second host (a
network namespace) reaches this host only at its veth address (198.18.x.1). A
:class:`Forwarder` listens on ``address:port`` (port 0: a free one) and relays each connection
to ``target`` — the same bytes, both ways, as a second ``bind`` address of the service would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class Forwarder:
    """Relay ``address:port`` → ``target`` in background threads until :meth:`stop`."""

    def __init__(self, address: str, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((address, 0))
        self.address, self.port = self.listener.getsockname()[:2]
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Forwarder:
        self._spawn(self._accept)
        return self

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()

    def stop(self) -> None:
        self._stopped.set()
        self.listener.close()

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
