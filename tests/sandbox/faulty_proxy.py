"""A misbehaving load balancer in front of a sandbox Glance: it passes every request on,
except those that match a rule, which it answers with an error status or leaves unanswered.

A rule is ``(method, path regex, action)``; the action is ``"503"`` (any status: answered at
once, the request never reaches Glance), ``"after:502"`` (passed on, Glance does the work, then
the status is what comes back), ``"cut"`` (passed on, and half of the answer's body sent
before the connection is closed), ``"close"`` (the connection closed, no answer), or
``"hang"`` (read, never answered; the connection stays
open until the proxy stops). Error bodies are JSON ``{"message": ...}`` (as API gateways
answer) or, with ``html``, nginx's page. Request bodies (with a length or chunked) are read
whole: for test images of a few MiB.
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
import urllib.parse
from typing import Any

from ._process import Service


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _any(self) -> None:
        body = self._body()
        action = self.server.action(self.command, self.path)
        self.server.seen.append((self.command, self.path, action))
        if action == "close":
            self.close_connection = True
            return
        if action == "hang":
            self.server.released.wait()
            self.close_connection = True
            return
        status = None
        if action is not None and action.startswith("after:"):
            status = int(action.split(":", 1)[1])
        elif action not in (None, "cut"):
            self._answer(int(action), *self.server.error_body(int(action)))
            return
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("transfer-encoding", "content-length", "host",
                                            "connection")}  # fmt: skip
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            skip = ("transfer-encoding", "content-length", "connection")
            passed = {k: v for k, v in response.getheaders() if k.lower() not in skip}
            if status is not None:
                data, passed = self.server.error_body(status)
            if action == "cut":  # the whole length announced, half of it sent, then closed
                self.send_response(response.status)
                for key, value in passed.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._answer(status or response.status, data, passed)
        finally:
            conn.close()

    def _answer(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Type" not in headers and "content-type" not in headers:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

    def log_message(self, *_args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: str, upstream: str, html: bool) -> None:
        super().__init__((listen, 0), _Handler)
        self.html = html
        parts = urllib.parse.urlsplit(upstream)
        self.host, self.port = parts.hostname or "", parts.port or 80
        self.rules: list[tuple[str, re.Pattern[str], str]] = []
        self.seen: list[tuple[str, str, str | None]] = []
        self.released = threading.Event()

    def error_body(self, status: int) -> tuple[bytes, dict[str, str]]:
        """An error answer as a gateway words it: JSON ``{"message": ...}`` or nginx's HTML."""
        if self.html:
            page = f"<html><body><center><h1>{status} Error</h1></center><hr><center>nginx"
            return f"{page}</center></body></html>".encode(), {"Content-Type": "text/html"}
        body = f'{{"message": "{status}: injected by the sandbox proxy"}}'.encode()
        return body, {"Content-Type": "application/json"}

    def action(self, method: str, path: str) -> str | None:
        for want, pattern, action in self.rules:
            if want == method and pattern.search(path):
                return action
        return None


class FaultyProxy(Service):
    """The proxy, listening on ``listen`` (an address of this host) in front of ``upstream``."""

    def __init__(self, upstream: str, listen: str = "127.0.0.1", *, html: bool = False) -> None:
        self._server = _Server(listen, upstream, html)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        address = self._server.server_address
        self.endpoint = f"http://{address[0]}:{address[1]}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.released.set()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, path: str, action: str) -> None:
        """Answer ``method`` requests whose path matches ``path`` with ``action``."""
        self._server.rules.append((method, re.compile(path), action))

    def heal(self) -> None:
        """Pass every request on from now on."""
        self._server.rules.clear()

    @property
    def seen(self) -> list[tuple[str, str, Any]]:
        """(method, path, action or None) of every request so far."""
        return list(self._server.seen)
