"""The Sidekiq wire format: Atmosphere's migration jobs in, status jobs out.

Incoming payloads from every Sidekiq client Atmosphere has run are accepted (3.1 sends no
``created_at``; key order varies); only ``class`` and ``args`` matter, ``jid`` is logged.
Outgoing payloads are byte-for-byte what Sidekiq's own client writes.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from redis import Redis
from redis.client import Pipeline

from migratio.atmosphere.keys import FEEDBACK_CLASS, FEEDBACK_QUEUE, MIGRATION_CLASSES, Keys
from migratio.config import check_site_id
from migratio.errors import MigratioError, PayloadError
from migratio.files import finite_number

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_JID = re.compile(r"[0-9a-f]{24}")


class BadPayload(PayloadError):
    """A migration job that cannot be run, with what could be read of it (for a status line)."""

    def __init__(
        self, message: str, *, image_id: str | None = None, destination: str | None = None
    ) -> None:
        super().__init__(message)
        self.image_id = image_id
        self.destination = destination


@dataclass(frozen=True)
class MigrationJob:
    """One of Atmosphere's migration jobs, understood."""

    kind: Literal["openstack", "amazon"]
    image_id: str
    destination: str
    jid: str
    job_class: str
    enqueued_at: float | None = None


#: the largest payload read at all: Sidekiq writes ~250 bytes for a migration job
MAX_PAYLOAD_BYTES = 64 * 1024
#: the deepest nesting of JSON arrays/objects read at all (a migration job has 2 levels)
MAX_NESTING = 16
#: longest rendering of a payload's value inside an error message
_SHOWN = 80
_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def parse_job(raw: bytes | str) -> MigrationJob:
    """Understand a migration payload, or raise :class:`BadPayload` saying exactly why not.

    Raises nothing else, whatever ``raw`` holds: size and nesting are bounded before the JSON
    parser sees it, so no payload can exhaust memory or the stack.
    """
    data = _json_object(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    args = data.get("args")
    image_id = destination = None
    if isinstance(args, list) and len(args) == 2 and all(isinstance(a, str) for a in args):
        image_id, destination = args
    job_class = data.get("class")
    if not isinstance(job_class, str) or job_class not in MIGRATION_CLASSES:
        raise BadPayload(
            f"unknown job class {shown(job_class)} "
            f"(expected one of {', '.join(MIGRATION_CLASSES)})",
            image_id=image_id,
            destination=destination,
        )
    if image_id is None or destination is None:
        raise BadPayload(f"args must be [image_uuid, destination_site_id], not {shown(args)}")
    if not _UUID.fullmatch(image_id):
        raise BadPayload(
            f"{shown(image_id)} is not an image id (a UUID)",
            image_id=image_id,
            destination=destination,
        )
    try:
        check_site_id(destination, what="destination site")
    except MigratioError:
        raise BadPayload(
            f"destination site {shown(destination)} is not a plain site name "
            "(letters, digits, '.', '_', '-'; no '/', no '..')",
            image_id=image_id,
            destination=destination,
        ) from None
    jid = data.get("jid")
    return MigrationJob(
        kind="amazon" if MIGRATION_CLASSES[job_class] == "amazon" else "openstack",
        image_id=image_id,
        destination=destination,
        jid=jid if isinstance(jid, str) and _JID.fullmatch(jid) else "",
        job_class=job_class,
        enqueued_at=finite_number(data.get("enqueued_at")),  # seconds since the epoch
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, within the limits, or :class:`BadPayload`."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise BadPayload(
            f"payload is {len(raw):,} bytes, over the limit of {MAX_PAYLOAD_BYTES:,} bytes "
            "(MAX_PAYLOAD_BYTES)"
        )
    if too_deep(raw):
        raise BadPayload(
            f"payload nests arrays/objects deeper than the limit of {MAX_NESTING} levels "
            "(MAX_NESTING)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadPayload(f"payload is not UTF-8: {exc}") from None
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadPayload(f"payload is not JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4,300 digits
        reason = str(exc).split("; use sys.")[0]
        raise BadPayload(f"payload is not usable JSON: {reason}") from None
    if not isinstance(data, dict):
        raise BadPayload(f"payload is JSON {type(data).__name__}, not an object")
    return data


def too_deep(raw: bytes) -> bool:
    """True when JSON arrays/objects nest more than :data:`MAX_NESTING` levels deep in ``raw``.

    Brackets inside strings do not count. One pass over the structural bytes, no parsing.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_NESTING:
        return False
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _STRUCTURE.finditer(raw):
        at = match.start()
        if at == escaped_at:
            continue
        char = raw[at : at + 1]
        if in_string:
            if char == b"\\":
                escaped_at = at + 1
            elif char == b'"':
                in_string = False
        elif char == b'"':
            in_string = True
        elif char in b"[{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif char in b"]}":
            depth -= 1
    return False


def shown(value: object) -> str:
    """``repr(value)``, at most 80 characters: safe to put in a message, a log or a status line."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 4]}...{text[-1]}"


def printable(text: str) -> str:
    """``text`` with every unprintable character (control, NUL, lone surrogate) escaped.

    What comes out encodes as UTF-8 and is one line, whatever went in.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def new_jid() -> str:
    """A Sidekiq job id: 24 lowercase hex characters."""
    return os.urandom(12).hex()


def payload(queue: str, job_class: str, args: list[str], *, now: float | None = None) -> str:
    """A job exactly as Sidekiq 6.4's client writes it (compact JSON, raw UTF-8)."""
    stamp = time.time() if now is None else now
    job = {
        "retry": True,
        "queue": queue,
        "class": job_class,
        "args": args,
        "jid": new_jid(),
        "created_at": stamp,
        "enqueued_at": stamp,
    }
    return json.dumps(job, separators=(",", ":"), ensure_ascii=False)


def push(redis: Redis, keys: Keys, queue: str, body: str) -> None:
    """``SADD queues`` + ``LPUSH queue:<queue>``, as Sidekiq's client does."""
    with redis.pipeline(transaction=True) as pipe:
        queue_push(pipe, keys, queue, body)
        pipe.execute()


def queue_push(pipe: Pipeline, keys: Keys, queue: str, body: str) -> None:
    """The commands of :func:`push`, added to ``pipe`` (to go with others in one transaction)."""
    pipe.sadd(keys.queues, queue)
    pipe.lpush(keys.queue(queue), body)


def status_payload(image_id: str, own_site: str, destination: str, text: str) -> str:
    """One status line to Atmosphere, as the original's ``Sidekiq::Client.push`` wrote it."""
    args = [image_id, own_site, destination, text]
    return payload(FEEDBACK_QUEUE, FEEDBACK_CLASS, args)


def push_status(
    redis: Redis, keys: Keys, image_id: str, own_site: str, destination: str, text: str
) -> None:
    """One status line to Atmosphere, as the original's ``Sidekiq::Client.push`` did."""
    push(redis, keys, FEEDBACK_QUEUE, status_payload(image_id, own_site, destination, text))
