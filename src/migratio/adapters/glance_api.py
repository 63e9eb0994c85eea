"""Adapter for a Glance v2 API, through keystoneauth1 and python-glanceclient.

Used for the source site always, and for a destination whose site file says ``REGISTER=api``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import requests
from glanceclient import Client
from glanceclient import exc as gexc
from keystoneauth1 import exceptions as kexc
from keystoneauth1 import session, token_endpoint
from keystoneauth1.identity import generic

from migratio.config import OpenStackCredentials
from migratio.errors import GlanceError, VerificationError, quietly
from migratio.hashing import BLOCK, Digests, Readable, VerifyingReader
from migratio.images import ImageRecord
from migratio.openstack.copies import PROBE_FIELDS

log = logging.getLogger(__name__)

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
        kwargs: dict[str, Any] = {"session": self.session}
        if not creds.uses_token:
            kwargs["interface"] = creds.interface
            if creds.region_name:
                kwargs["region_name"] = creds.region_name
            if creds.image_url:
                kwargs["endpoint_override"] = creds.image_url
        self.client = Client("2", **kwargs)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn any client or HTTP failure into a :class:`GlanceError` that says what failed."""

        _last_response.status = None
        try:
            yield
        except (gexc.HTTPException, kexc.HttpError) as exc:
            status = http_status(exc)
            described = _describe(exc)
            if status is not None and str(status) not in described:
                described = f"HTTP {status}: {described.removeprefix('HTTP ')}"
            raise GlanceError(
                f"Glance at {self.where}: {doing} failed: {described}",
                retryable=retryable_status(status),
            ) from exc
        except (gexc.CommunicationError, gexc.InvalidEndpoint, kexc.ConnectionError) as exc:
            raise GlanceError(
                f"Glance: {doing} failed: {_unreachable(exc, self.creds)}", retryable=True
            ) from exc
        except kexc.ClientException as exc:  # no such endpoint or region, bad auth options
            raise GlanceError(
                f"Glance at {self.where}: {doing} failed: {_describe(exc)}", retryable=False
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
                return ImageRecord.from_glance(dict(self.client.images.get(image_id)))
        except GlanceError as exc:
            if isinstance(exc.__cause__, gexc.HTTPNotFound):
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
            if not isinstance(exc.__cause__, gexc.HTTPNotFound):
                raise

    def ping(self) -> int:
        """List one image, to prove the credentials and endpoint work; returns how many."""
        with self._errors("listing images"):
            return len(list(self.client.images.list(limit=1, page_size=1)))


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


def _unreachable(exc: Exception, creds: OpenStackCredentials) -> str:
    """'cannot connect to URL (reason); check KEY in FILE': the URL once, and what to fix."""
    text = " ".join(str(exc).split())
    tried = re.search(
        r"(?:connection to|address for|contacting) (https?://[^\s:]+(?::\d+)?\S*?)[:.]?(?:\s|$)",
        text,
    )
    url = tried.group(1) if tried else (creds.image_url or creds.auth_url or "")
    reason = re.search(
        r"\[Errno -?\d+\] ([^\"')]+)|(certificate verify failed[^\"')]*)|(timed out)|"
        r"(Name or service not known)|(Connection refused)",
        text,
    )
    why = next((g for g in reason.groups() if g), "") if reason else text[:200]
    if creds.uses_token or (creds.image_url and url.startswith(creds.image_url)):
        key = "OS_IMAGE_URL"
    elif creds.auth_url and url.startswith(creds.auth_url.rstrip("/")):
        key = "OS_AUTH_URL"
    else:  # the endpoint Keystone's catalog gave
        key = "OS_REGION_NAME and OS_INTERFACE (the catalog's Glance endpoint)"
    return f"cannot connect to {url} ({why.strip()}); check {key} in {creds.source}"


def _describe(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    details = getattr(exc, "details", None)
    if details and str(details) not in text:
        text = f"{text}: {details}"
    return " ".join(text.split())[:500]
