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

from migratio.config import check_site_id
from migratio.errors import MigratioError, PayloadError
from migratio.keys import FEEDBACK_CLASS, FEEDBACK_QUEUE, MIGRATION_CLASSES, Keys

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


def parse_job(raw: bytes | str) -> MigrationJob:
    """Understand a migration payload, or raise :class:`BadPayload` saying exactly why not."""
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadPayload(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadPayload(f"payload is JSON {type(data).__name__}, not an object")
    args = data.get("args")
    image_id = destination = None
    if isinstance(args, list) and len(args) == 2 and all(isinstance(a, str) for a in args):
        image_id, destination = args
    job_class = data.get("class")
    if job_class not in MIGRATION_CLASSES:
        raise BadPayload(
            f"unknown job class {job_class!r} (expected one of {', '.join(MIGRATION_CLASSES)})",
            image_id=image_id,
            destination=destination,
        )
    if image_id is None or destination is None:
        raise BadPayload(f"args must be [image_uuid, destination_site_id], not {args!r}")
    if not _UUID.fullmatch(image_id):
        raise BadPayload(
            f"{image_id!r} is not an image id (a UUID)", image_id=image_id, destination=destination
        )
    try:
        check_site_id(destination, what="destination site")
    except MigratioError as exc:
        raise BadPayload(exc.message, image_id=image_id, destination=destination) from None
    jid = data.get("jid")
    enqueued = data.get("enqueued_at")
    return MigrationJob(
        kind="amazon" if MIGRATION_CLASSES[job_class] == "amazon" else "openstack",
        image_id=image_id,
        destination=destination,
        jid=jid if isinstance(jid, str) and _JID.fullmatch(jid) else "",
        job_class=job_class,
        enqueued_at=float(enqueued) if isinstance(enqueued, int | float) else None,
    )


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
        pipe.sadd(keys.queues, queue)
        pipe.lpush(keys.queue(queue), body)
        pipe.execute()


def push_status(
    redis: Redis, keys: Keys, image_id: str, own_site: str, destination: str, text: str
) -> None:
    """One status line to Atmosphere, as the original's ``Sidekiq::Client.push`` did."""
    args = [image_id, own_site, destination, text]
    push(redis, keys, FEEDBACK_QUEUE, payload(FEEDBACK_QUEUE, FEEDBACK_CLASS, args))
