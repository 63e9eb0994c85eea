"""Adapter for a Glance v2 API, through keystoneauth1 and python-glanceclient.

Used for the source site always, and for a destination whose site file says ``REGISTER=api``.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import requests
from keystoneauth1 import adapter, session, token_endpoint
from keystoneauth1 import exceptions as kexc

from migratio.config import OpenStackCredentials
from migratio.errors import GlanceError, VerificationError, quietly
from migratio.hashing import BLOCK, Digests, Readable, VerifyingReader
from migratio.images import ImageRecord
from migratio.openstack.bandwidth import Throttle, ThrottledReader
from migratio.openstack.copies import PROBE_FIELDS

if TYPE_CHECKING:
    from glanceclient import exc as glance_exc


def _gexc() -> Any:
    """glanceclient's exceptions, imported where one is raised. glanceclient takes ~0.05 s to
    import, which a migration that only reads records (:meth:`GlanceApi._get_json`) and
    meets no error need not pay."""
    from glanceclient import exc  # noqa: PLC0415 (see the docstring)

    return exc


def _glance_errors(
    *names: str, also: tuple[type[Exception], ...] = ()
) -> tuple[type[Exception], ...]:
    """glanceclient's exception classes ``names`` (and ``also``), for ``except`` and
    ``isinstance``; none of glanceclient's while it has not been imported: then none of its
    exceptions can be in flight, and an error on its way out is not held up by that import,
    nor replaced by its failure."""
    module = sys.modules.get("glanceclient.exc")
    found = tuple(getattr(module, name) for name in names) if module is not None else ()
    return found + also


log = logging.getLogger(__name__)

#: bytes handed to the kernel per ``sendfile`` call (or per ``sendall`` over TLS) when a local
#: file is uploaded: progress (with the lease's fence) and ``BWLIMIT`` act between two
SEND_PIECE = 8 << 20
#: HTTP statuses after which the same request may succeed later
RETRYABLE_STATUSES = frozenset({408, 429})
#: the status of the last HTTP response this thread received (glanceclient drops the
#: status of errors it has no class for: 410, 429, 504... all become ``code='N/A'``)
_last_response = threading.local()


def _remember_status(response: requests.Response, *_args: Any, **_kwargs: Any) -> None:
    _last_response.status = response.status_code


def http_status(exc: Exception) -> int | None:
    """The HTTP status behind a glanceclient or keystoneauth error, when one can be known."""
    for attribute in ("code", "http_status"):
        value = getattr(exc, attribute, None)
        if isinstance(value, int):
            return value
    status = getattr(_last_response, "status", None)
    return status if isinstance(status, int) and status >= 400 else None


def retryable_status(status: int | None) -> bool:
    """5xx, 408 and 429 may pass later; other 4xx never will. Unknown: assume it may."""
    return status is None or status >= 500 or status in RETRYABLE_STATUSES


def make_session(creds: OpenStackCredentials, *, timeout: float = 60) -> Any:
    """A keystoneauth1 session: a fixed token and endpoint, or Keystone password auth."""

    if creds.uses_token:
        auth: Any = token_endpoint.Token(creds.image_url, creds.token)
    else:
        # imported here: ~60 ms (its plugin loader) that a site with a fixed token need not pay
        from keystoneauth1.identity import generic  # noqa: PLC0415

        auth = generic.Password(
            auth_url=str(creds.auth_url),
            username=creds.username,
            password=creds.password,
            project_name=creds.project_name,
            project_id=creds.project_id,
            user_domain_name=creds.user_domain_name,
            project_domain_name=creds.project_domain_name,
            user_domain_id=creds.user_domain_id,
            project_domain_id=creds.project_domain_id,
            default_domain_name=None if creds.user_domain_id else "Default",
        )
    verify: bool | str = creds.cacert or not creds.insecure
    http = requests.Session()
    http.hooks["response"].append(_remember_status)
    return session.Session(auth=auth, session=http, verify=verify, timeout=timeout)


class GlanceApi:
    """One Glance, spoken to over its v2 API."""

    def __init__(self, creds: OpenStackCredentials, *, timeout: float = 60) -> None:

        self.creds = creds
        self.where = creds.image_url or creds.auth_url or creds.source
        self.session = make_session(creds, timeout=timeout)
        self._kwargs: dict[str, Any] = {"session": self.session}
        if not creds.uses_token:
            self._kwargs["interface"] = creds.interface
            if creds.region_name:
                self._kwargs["region_name"] = creds.region_name
            if creds.image_url:
                self._kwargs["endpoint_override"] = creds.image_url
        #: the image API's endpoint on the session, as glanceclient's v2 client finds it
        self.http = adapter.Adapter(
            service_type="image",
            user_agent="python-glanceclient",
            **self._kwargs,
        )
        self._client: Any = None
        self._making = threading.Lock()

    @property
    def client(self) -> Any:
        """The glanceclient, made on first use: its v2 module imports ~0.2 s of schema
        validators, and its first call of a kind fetches a schema; a migration that only
        reads the source image (:meth:`get`) needs neither."""
        with self._making:
            if self._client is None:
                from glanceclient import Client  # noqa: PLC0415 (see _gexc)

                self._client = Client("2", **self._kwargs)
            return self._client

    def _get_json(self, path: str) -> dict[str, Any]:
        """GET ``path`` of the image API: the request glanceclient's v2 client makes (e.g.
        ``images.get``), raising the errors it raises, but without importing it (~0.3 s of
        pyOpenSSL and schema validators) or fetching the schema it builds its models from."""
        try:
            response = self.http.get(path, raise_exc=False)
        except kexc.ConnectTimeout as exc:
            url = f"{str(self.http.get_endpoint()).rstrip('/')}/{path.lstrip('/')}"
            raise _gexc().InvalidEndpoint(message=f"Error communicating with {url} {exc}") from exc
        except kexc.ConnectFailure as exc:
            url = f"{str(self.http.get_endpoint()).rstrip('/')}/{path.lstrip('/')}"
            raise _gexc().CommunicationError(
                message=f"Error finding address for {url}: {exc}"
            ) from exc
        if not response.ok or response.status_code == 300:
            raise _gexc().from_response(response, response.content)
        body = response.json()
        if not isinstance(body, dict):
            raise GlanceError(f"Glance at {self.where} answered {path} with no JSON object")
        body.pop("self", None)  # as glanceclient does
        return body

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn any client or HTTP failure into a :class:`GlanceError` that says what failed."""

        _last_response.status = None
        try:
            yield
        except _glance_errors("HTTPException", also=(kexc.HttpError,)) as exc:
            status = http_status(exc)
            described = _describe(exc)
            if status is not None and str(status) not in described:
                described = f"HTTP {status}: {described.removeprefix('HTTP ')}"
            raise GlanceError(
                f"Glance at {self.where}: {doing} failed: {described}",
                retryable=retryable_status(status),
            ) from exc
        except _glance_errors(
            "CommunicationError", "InvalidEndpoint", also=(kexc.ConnectionError,)
        ) as exc:
            if _closed_unanswered(exc):  # connected: not the URL's fault
                raise GlanceError(
                    f"Glance: {doing} failed: {_unreachable(exc, self.creds, connected=True)}",
                    retryable=True,
                ) from exc
            if _read_timeout(exc):  # keystoneauth words both timeouts alike
                raise GlanceError(
                    f"Glance: {doing} failed: {_unreachable(exc, self.creds, connected=True)}; "
                    f"it took the connection but gave no answer within "
                    f"{self.session.timeout:.0f} s (overloaded or stuck?)",
                    retryable=True,
                ) from exc
            raise GlanceError(
                f"Glance: {doing} failed: {_unreachable(exc, self.creds)}", retryable=True
            ) from exc
        except kexc.ClientException as exc:  # no such endpoint or region, bad auth options
            raise GlanceError(
                f"Glance at {self.where}: {doing} failed: {_describe(exc)}", retryable=False
            ) from exc
        except (AttributeError, TypeError, KeyError) as exc:
            # glanceclient reading an error answer it does not expect (a proxy's JSON body
            # such as {"message": "..."}) fails with these: the status is what counts
            status = getattr(_last_response, "status", None)
            if not isinstance(status, int) or status < 400:
                raise
            raise GlanceError(
                f"Glance at {self.where}: {doing} failed: HTTP {status} "
                f"(an answer glanceclient cannot read: {type(exc).__name__})",
                retryable=retryable_status(status),
            ) from exc
        except (OSError, ValueError) as exc:
            if isinstance(exc, VerificationError):
                raise
            raise GlanceError(
                f"Glance at {self.where}: {doing} failed: {exc}", retryable=True
            ) from exc

    def get(self, image_id: str) -> ImageRecord | None:
        """The image, or None when Glance does not have it."""

        try:
            with self._errors(f"reading image {image_id}"):
                body = self._get_json(f"/v2/images/{urllib.parse.quote(image_id, safe='')}")
                return ImageRecord.from_glance(body)
        except GlanceError as exc:
            if isinstance(exc.__cause__, _glance_errors("HTTPNotFound")):
                return None
            raise

    def find(self, **filters: str) -> list[ImageRecord]:
        """Images whose properties equal ``filters`` (all visibilities the caller may see)."""
        with self._errors(f"listing images with {filters}"):
            images = self.client.images.list(filters={**filters, "visibility": "all"})
            return [ImageRecord.from_glance(dict(image)) for image in images]

    def download_to(
        self, image: ImageRecord, path: Path, on_progress: Callable[[int], None] | None = None
    ) -> None:
        """Stream the image's bytes into ``path`` (via ``path.part``), checked against Glance."""
        part = path.with_name(path.name + ".part")
        try:
            with self._errors(f"downloading image {image.id}"), part.open("wb") as out:
                body = self.client.images.data(image.id, do_checksum=False)
                if body is None:
                    raise GlanceError(f"Glance at {self.where} has no data for image {image.id}")
                reader = VerifyingReader(_IterReader(iter(body)), image.digests, on_progress)
                while block := reader.read(BLOCK):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        part.rename(path)

    def create(self, fields: Mapping[str, Any]) -> ImageRecord:
        """Create an image record (no data yet)."""
        with self._errors("creating the image record"):
            return ImageRecord.from_glance(dict(self.client.images.create(**fields)))

    def upload(
        self,
        image_id: str,
        stream: Readable | BinaryIO,
        expected: Digests,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload ``stream`` as the image's data, verified on the way.

        The bytes are hashed as they go; a mismatch raises before the last chunk is sent, so
        Glance never completes an image from wrong bytes. The size goes in a header, so Glance
        also refuses a short stream.
        """
        reader = VerifyingReader(stream, expected, on_progress)
        with self._errors(f"uploading the data of image {image_id}"):
            self.client.images.upload(image_id, reader, image_size=expected.size)

    def upload_file(
        self,
        image_id: str,
        path: Path,
        known: Digests,
        on_progress: Callable[[int], None] | None = None,
        *,
        bwlimit: int | None = None,
        unchanged: Callable[[], bool] | None = None,
    ) -> None:
        """Upload a local file whose digests ``known`` migratio computed from this very file.

        For a staging cache entry: its maker hashed the complete file — a conversion after
        qemu-img wrote it, a download as it was written (and found it equal to the source
        Glance's digest) — before it was renamed into place (atomically, with what it hashed
        to beside it), and the caller holds the entry's ``flock`` while this runs, so no job
        removes or rewrites it meanwhile. Hashing it again on the way would only prove that the
        disk returns what was written, at the cost of a core for the whole upload; so the
        bytes go unhashed, with ``Content-Length``, by ``sendfile`` (zero-copy; over TLS in
        large ``sendall`` pieces), with the session's token to the session's endpoint. Glance
        still computes its own ``checksum``/``os_hash_value`` and the caller compares them with
        ``known`` once the upload is done (and deletes the image on a mismatch); the size is
        checked before the first byte, so a file that is not the expected length never goes,
        and a connection cut before the last byte leaves Glance with an incomplete body, which
        it does not make active. ``on_progress`` gets the bytes sent so far; ``bwlimit`` (bytes
        per second) paces the sending as :mod:`migratio.openstack.bandwidth` does.

        The last byte is held back until ``on_progress`` has been told of all the others and
        ``unchanged()`` (:meth:`Entry.unchanged`) says the file is still the one that was
        hashed: a file rewritten while it was being sent, or a progress callback that raises
        (the lease's fence), cuts the connection before Glance has the whole body.

        Through an HTTP proxy (the environment's ``*_proxy``, which requests honours) this
        falls back to :meth:`upload`, hashed on the way.
        """
        from glanceclient.common.utils import strip_version  # noqa: PLC0415 (see _gexc)

        doing = f"uploading the data of image {image_id}"
        with self._errors(doing):
            endpoint, _ = strip_version(str(self.http.get_endpoint()))
        url = f"{endpoint}/v2/images/{urllib.parse.quote(image_id, safe='')}/file"
        if requests.utils.get_environ_proxies(url):
            with path.open("rb") as stream:
                reader = stream if bwlimit is None else ThrottledReader(stream, bwlimit)
                self.upload(image_id, reader, known, on_progress)
            return
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size != known.size:
                raise VerificationError(
                    f"{path} has {size} bytes, not the {known.size} its digests were made of"
                )

            def held_back() -> None:
                if unchanged is not None and not unchanged():
                    raise VerificationError(
                        f"{path} was changed while it was being sent, so it may not be the "
                        "bytes its digests were made of; the upload was cut before its last "
                        "byte (the next attempt makes it again)"
                    )

            for attempt in (1, 2):
                with self._errors(doing):
                    headers = self.session.get_auth_headers()
                    error = self._put_file(
                        url, headers, stream, size, on_progress, bwlimit, held_back
                    )
                    if error is None:
                        return
                    if http_status(error) == 401 and attempt == 1 and self.session.invalidate():
                        log.info("Glance at %s refused the token; authenticating again", self.where)
                        continue  # a token that expired meanwhile: once more with a new one
                    raise error  # a fixed token cannot be renewed; a new one refused too

    def _put_file(
        self,
        url: str,
        auth_headers: Mapping[str, str] | None,
        stream: BinaryIO,
        size: int,
        on_progress: Callable[[int], None] | None,
        bwlimit: int | None,
        before_last: Callable[[], None] | None = None,
    ) -> glance_exc.HTTPException | None:
        """PUT the file's ``size`` bytes to ``url``; None, or the error Glance answered with.

        An error status is returned as glanceclient would have raised it (so that
        :meth:`_errors` words it the same way), for the caller to raise, or, on a 401, to
        authenticate again first.
        """
        parts = urllib.parse.urlsplit(url)
        timeout = self.session.timeout
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=timeout, context=self._tls()
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:  # worded as glanceclient words it: the URL and the key
                raise _gexc().CommunicationError(
                    message=f"Error finding address for {url}: {exc}"
                ) from exc
            conn.putrequest("PUT", parts.path, skip_accept_encoding=True)
            for name, value in (auth_headers or {}).items():
                conn.putheader(name, value)  # the token: in a header, never in a log line
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            conn.putheader("x-openstack-image-size", str(size))
            conn.putheader("Accept", "*/*")  # as requests: Glance words its errors the same
            conn.putheader("User-Agent", "migratio")
            conn.endheaders()
            assert conn.sock is not None
            try:
                _send_file(conn.sock, stream, size, on_progress, bwlimit, before_last)
            except OSError:
                # Glance may have answered (and closed) before taking it all: say what it said
                response = _early_response(conn)
                if response is None:
                    raise
            else:
                response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        _last_response.status = response.status
        if response.status < 300:
            return None
        answer = requests.Response()
        answer.status_code = response.status
        answer.headers.update({k.lower(): v for k, v in response.getheaders()})
        answer.headers.setdefault("content-type", "text/plain")
        answer._content = body  # what glanceclient's from_response reads
        error: glance_exc.HTTPException = _gexc().from_response(answer, body)
        return error

    def _tls(self) -> ssl.SSLContext:
        """The TLS context the session verifies with (OS_CACERT, OS_INSECURE).

        Without OS_CACERT, the certificates requests (hence glanceclient, for every other
        call) trusts: the environment's ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` (a file
        or a directory), else certifi's bundle, not the system's.
        """
        verify = self.session.verify
        if verify is True:
            verify = (
                os.environ.get("REQUESTS_CA_BUNDLE")
                or os.environ.get("CURL_CA_BUNDLE")
                or requests.utils.DEFAULT_CA_BUNDLE_PATH
            )
        if isinstance(verify, str) and os.path.isdir(verify):
            context = ssl.create_default_context(capath=verify)
        else:
            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        if verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def own_project(self) -> str | None:
        """The project images made here belong to: the session's, else a probe image's."""
        if not self.creds.uses_token:
            with self._errors("asking Keystone for the project"):
                project = self.session.get_project_id()
            if project:
                return str(project)
        probe = self.create(PROBE_FIELDS)
        try:
            return probe.owner
        finally:
            quietly(self.delete, probe.id)

    def check_fields(self, image_id: str, fields: Mapping[str, Any]) -> None:
        """Nothing to refuse: the API carries any name and property exactly."""

    def readback(self, text: str) -> str:
        """The API shows every name and value exactly as sent."""
        return text

    def delete(self, image_id: str) -> None:
        """Delete an image; one that is already gone is fine."""

        try:
            with self._errors(f"deleting image {image_id}"):
                self.client.images.delete(image_id)
        except GlanceError as exc:
            if not isinstance(exc.__cause__, _glance_errors("HTTPNotFound")):
                raise

    def ping(self) -> int:
        """List one image, to prove the credentials and endpoint work; returns how many."""
        with self._errors("listing images"):
            return len(list(self.client.images.list(limit=1, page_size=1)))


def _send_file(
    sock: socket.socket,
    stream: BinaryIO,
    size: int,
    on_progress: Callable[[int], None] | None,
    bwlimit: int | None,
    before_last: Callable[[], None] | None = None,
) -> None:
    """Send the file's first ``size`` bytes: ``sendfile`` on a plain socket, else ``sendall``.

    The last byte goes alone, after ``on_progress`` was told of the others and
    ``before_last()`` ran: either may raise to cut the upload before Glance has it all.
    """
    throttle = Throttle(bwlimit) if bwlimit is not None else None
    # under a cap, pieces of a tenth of a second's worth, so that the pace is an even one
    piece = SEND_PIECE if bwlimit is None else max(64 << 10, min(SEND_PIECE, bwlimit // 10))
    plain = not isinstance(sock, ssl.SSLSocket)
    sent = 0
    held = 1 if size > 0 else 0
    while sent < size:
        if sent == size - held:
            if before_last is not None:
                before_last()
            held = 0
        count = min(piece, size - held - sent)
        if throttle is not None:
            throttle(count)
        if plain:
            went = sock.sendfile(stream, offset=sent, count=count)
        else:
            data = os.pread(stream.fileno(), count, sent)
            sock.sendall(data)
            went = len(data)
        if went == 0:
            raise VerificationError(f"the file ended after {sent} of its {size} bytes")
        sent += went
        if on_progress is not None:
            on_progress(sent)


def _early_response(conn: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    """The answer Glance sent before it stopped reading, if it sent one."""
    try:
        response = conn.getresponse()
    except (OSError, http.client.HTTPException):
        return None
    return response if response.status >= 400 else None


class _IterReader:
    """A minimal file-like view of an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def read(self, size: int = BLOCK) -> bytes:
        while len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or an exception in its chain of causes is a ``kind``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _read_timeout(exc: BaseException) -> bool:
    """Whether a connection was made and the answer did not come in time (not a connect)."""
    return _caused_by(exc, requests.exceptions.ReadTimeout)


def _closed_unanswered(exc: BaseException) -> bool:
    """Whether the server took the request and closed the connection without an answer."""
    return _caused_by(exc, http.client.RemoteDisconnected)


def _unreachable(exc: Exception, creds: OpenStackCredentials, *, connected: bool = False) -> str:
    """'cannot connect to URL (reason); check KEY in FILE': the URL once, and what to fix;
    ``connected``: 'no answer from URL (reason)', the URL once."""
    text = " ".join(str(exc).split())
    tried = re.search(
        r"(?:connection to|address for|contacting|Request to) (https?://[^\s:]+(?::\d+)?\S*?)[:.]?(?:\s|$)",
        text,
    )
    url = tried.group(1) if tried else (creds.image_url or creds.auth_url or "")
    reason = re.search(
        r"\[Errno -?\d+\] ([^\"')]+)|(certificate verify failed[^\"')]*)|(timed out)|"
        r"(Name or service not known)|(Connection refused)|"
        r"(Remote end closed connection without response)",
        text,
    )
    why = next((g for g in reason.groups() if g), "") if reason else text[:200]
    if creds.uses_token or (creds.image_url and url.startswith(creds.image_url)):
        key = "OS_IMAGE_URL"
    elif creds.auth_url and url.startswith(creds.auth_url.rstrip("/")):
        key = "OS_AUTH_URL"
    else:  # the endpoint Keystone's catalog gave
        key = "OS_REGION_NAME and OS_INTERFACE (the catalog's Glance endpoint)"
    if connected:
        return f"no answer from {url} ({why.strip()})"
    return f"cannot connect to {url} ({why.strip()}); check {key} in {creds.source}"


def _describe(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    details = getattr(exc, "details", None)
    if details and str(details) not in text:
        text = f"{text}: {details}"
    return " ".join(text.split())[:500]
