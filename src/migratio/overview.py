"""``migratio status``: every job of this site and the state it is in, as text or JSON.

A job is in exactly one of these states, in the order it passes through them:

* ``waiting``: pushed by Atmosphere, still in its Sidekiq queue;
* ``in_flight``: taken by the service, being handed to RQ (only a crash leaves one here long);
* ``queued``: in RQ's queue, for the next free worker;
* ``running``: a worker is migrating it (with its last status line and how old that is);
* ``scheduled``: it failed for a reason that may pass and runs again at ``retry_at``;
* ``deferred``: RQ holds it back for another job (migratio itself never asks for that);
* ``failed``: it failed for good (the reason is the operator's message); ``migratio retry``;
* ``finished``: done (RQ keeps the record for a week);
* ``canceled``: canceled with RQ's tools;

and ``dead_letters``: payloads refused because they cannot be understood, with the reason.
A job waiting for its destination's fair share (``MAX_PARALLEL``) is ``scheduled`` as
``<job>-wN``; ``destinations`` lists, for each busy destination, what runs and what waits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from redis import Redis
from rq.job import Job
from rq.registry import BaseRegistry
from rq.serializers import JSONSerializer

from migratio.atmosphere.keys import Keys, migration_queue
from migratio.atmosphere.sidekiq import BadPayload, parse_job, printable
from migratio.config import Settings
from migratio.fair_share import DestinationShare
from migratio.metrics import queue_depths
from migratio.redis_client import redacted
from migratio.service import rq_queue

#: jobs listed per state (the counts are always complete)
SHOWN = 20
#: the version of ``migratio status --json``'s layout; it changes only if a key changes meaning
JSON_VERSION = 1
#: the states of a job, in the order it passes through them (dead letters are apart)
STATES = ("waiting", "in_flight", "queued", "running", "scheduled", "deferred", "failed",
          "finished", "canceled")  # fmt: skip


@dataclass(frozen=True)
class JobView:
    """One job as ``migratio status`` shows it; times are Unix seconds (None: not known)."""

    id: str
    state: str
    kind: str | None = None
    image_id: str | None = None
    destination: str | None = None
    jid: str | None = None
    enqueued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    #: seconds since it started (running) or since Atmosphere pushed it (waiting, queued)
    age_seconds: float | None = None
    #: the last status line sent to Atmosphere, and when
    status: str | None = None
    status_at: float | None = None
    retry_at: float | None = None
    retries_left: int | None = None
    #: why it failed (the last failure of a scheduled job): the operator's message
    error: str | None = None


@dataclass(frozen=True)
class Overview:
    """A snapshot of one site's jobs."""

    site: str
    redis: str
    time: float
    queues: dict[str, str]
    counts: dict[str, int]
    jobs: list[JobView] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    #: the fair share of each busy destination: its MAX_PARALLEL, the first job ids of the
    #: migrations to it that run, and those that wait for a slot (first arrived first)
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        """``migratio status --json``."""
        data = {"version": JSON_VERSION, **asdict(self)}
        # ASCII escapes: a payload's lone surrogate or terminal escape stays inert text
        return json.dumps(data, indent=2)

    def lines(self) -> Iterator[str]:
        """``migratio status``, for people: every line printable, whatever a payload held."""
        return (printable(line) for line in self._lines())

    def _lines(self) -> Iterator[str]:
        yield f"site {self.site}, Redis {self.redis}, at {_when(self.time)}"
        titles = {
            "waiting": f"waiting in Atmosphere's queue ({self.queues['waiting']})",
            "in_flight": "in flight (taken, not yet handed over)",
            "queued": f"queued for the workers ({self.queues['queued']})",
            "running": "running",
            "scheduled": "scheduled for a retry",
            "deferred": "deferred",
            "failed": "failed",
            "finished": "finished (kept 7 days)",
            "canceled": "canceled",
        }
        for state, title in titles.items():
            yield f"{title}: {self.counts[state]}"
            for job in self.jobs:
                if job.state == state:
                    yield f"  {job.id}  {_what(job)}{self._detail(job)}"
        yield f"refused payloads (dead letters, {self.queues['dead_letters']}): " + str(
            self.counts["dead_letters"]
        )
        for entry in self.dead_letters:
            raw = str(entry.get("raw"))[:120]
            yield f"  {_when(entry.get('at'))}  {entry.get('reason')}: {raw}"
        yield f"destinations with migrations running or waiting: {len(self.destinations)}"
        for site_id, share in sorted(self.destinations.items()):
            yield (
                f"  {site_id}: {len(share['running'])} of MAX_PARALLEL={share['max_parallel']} "
                f"running, {len(share['waiting'])} waiting"
            )
            for job_id in share["waiting"]:
                yield f"    waits: {job_id}"

    def _detail(self, job: JobView) -> str:
        now = self.time
        if job.state == "running":
            text = f", running for {_age(job.age_seconds)}"
            if job.status is not None:
                text += f"; {_age(_since(now, job.status_at))} ago: {job.status}"
            return text
        if job.state == "scheduled":
            text = f", retry at {_when(job.retry_at)} (in {_age(_until(now, job.retry_at))})"
            if job.retries_left is not None:
                text += f", {job.retries_left} more after that" if job.retries_left else ", last"
            return text + (f"; failed: {job.error}" if job.error else "")
        if job.state in {"failed", "canceled"}:
            return f", {_when(job.ended_at)}: {job.error or 'no reason recorded'}"
        if job.state == "finished":
            return f", {_when(job.ended_at)}: {job.status or 'done'}"
        if job.age_seconds is not None:
            return f", pushed {_age(job.age_seconds)} ago"
        return ""


def overview(settings: Settings, redis: Redis, *, shown: int = SHOWN) -> Overview:
    """Read every state of this site's jobs from Redis."""
    keys = Keys(settings.namespace)
    queue = rq_queue(settings, redis)
    now = time.time()
    counts = queue_depths(settings, redis)
    registries = {
        "running": queue.started_job_registry,
        "scheduled": queue.scheduled_job_registry,
        "deferred": queue.deferred_job_registry,
        "failed": queue.failed_job_registry,
        "finished": queue.finished_job_registry,
        "canceled": queue.canceled_job_registry,
    }
    counts["finished"] = int(redis.zcard(queue.finished_job_registry.key))
    counts["canceled"] = int(redis.zcard(queue.canceled_job_registry.key))
    jobs: list[JobView] = []
    waiting = keys.queue(migration_queue(settings.name))
    jobs += _payloads(redis.lrange(waiting, -shown, -1)[::-1], "waiting", now)
    inflight = redis.lrange(keys.inflight(settings.name), -shown, -1)[::-1]
    jobs += _payloads(inflight, "in_flight", now)
    jobs += [_view(job, "queued", now) for job in _fetch(redis, queue.get_job_ids(0, shown - 1))]
    for state, registry in registries.items():
        ids = _registry_ids(registry, shown, newest_first=state in {"failed", "finished"})
        for job in _fetch(redis, ids):
            retry_at = redis.zscore(registry.key, job.id) if state == "scheduled" else None
            jobs.append(_view(job, state, now, retry_at=retry_at))
    dead = [_entry(raw) for raw in redis.lrange(keys.dead(settings.name), 0, shown - 1)]
    return Overview(
        site=settings.name,
        redis=redacted(settings.redis_url),
        time=now,
        queues={
            "waiting": waiting,
            "in_flight": keys.inflight(settings.name),
            "queued": queue.name,
            "dead_letters": keys.dead(settings.name),
        },
        counts={state: counts[state] for state in (*STATES, "dead_letters")},
        jobs=jobs,
        dead_letters=dead,
        destinations=_shares(settings, redis),
    )


def _shares(settings: Settings, redis: Redis) -> dict[str, dict[str, Any]]:
    """The fair share of each destination with migrations running or waiting."""
    keys = Keys(settings.namespace)
    busy: dict[str, dict[str, Any]] = {}
    for site_id, site in settings.sites.items():
        share = DestinationShare(redis, keys, settings.name, site_id, site.max_parallel)
        running, waiting = share.running(), share.waiting()
        if running or waiting:
            busy[site_id] = {
                "max_parallel": site.max_parallel,
                "running": running,
                "waiting": waiting,
            }
    return busy


def _registry_ids(registry: BaseRegistry, shown: int, *, newest_first: bool) -> list[str]:
    ids: list[str] = registry.get_job_ids(0, shown - 1, desc=newest_first, cleanup=False)
    return ids


def _fetch(redis: Redis, ids: Sequence[str]) -> list[Job]:
    if not ids:
        return []
    jobs = Job.fetch_many(list(ids), connection=redis, serializer=JSONSerializer)
    return [job for job in jobs if job is not None]


def _view(job: Job, state: str, now: float, *, retry_at: float | None = None) -> JobView:
    kwargs = _kwargs(job)
    meta = job.meta or {}
    started = _stamp(job.started_at)
    ended = _stamp(job.ended_at)
    if state == "running":
        age = _since(now, started)
    elif state in {"waiting", "queued"}:
        age = _since(now, _number(meta.get("enqueued_at")) or _stamp(job.enqueued_at))
    else:
        age = None
    error = meta.get("error")
    if state in {"failed", "canceled"} and not error:
        error = _exception_message(job)
        ended = ended or _number(meta.get("failed_at"))
    return JobView(
        id=job.id,
        state=state,
        kind=_text(kwargs.get("kind")),
        image_id=_text(kwargs.get("image_id")),
        destination=_text(kwargs.get("destination")),
        jid=_text(kwargs.get("jid")) or None,
        enqueued_at=_number(meta.get("enqueued_at")) or _stamp(job.enqueued_at),
        started_at=started,
        ended_at=ended,
        age_seconds=age,
        status=_text(meta.get("status")),
        status_at=_number(meta.get("status_at")),
        retry_at=retry_at,
        retries_left=job.retries_left,
        error=_text(error),
    )


def _payloads(raws: Sequence[bytes | str], state: str, now: float) -> list[JobView]:
    views = []
    for raw in raws:
        try:
            job = parse_job(raw)
        except BadPayload as exc:
            views.append(JobView(id="-", state=state, error=f"will be refused: {exc.message}"))
            continue
        views.append(
            JobView(
                id=f"migratio-{job.jid}" if job.jid else "-",
                state=state,
                kind=job.kind,
                image_id=job.image_id,
                destination=job.destination,
                jid=job.jid or None,
                enqueued_at=job.enqueued_at,
                age_seconds=_since(now, job.enqueued_at),
            )
        )
    return views


def _entry(raw: bytes | str) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if isinstance(entry, dict):
        return entry
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return {"reason": "(not written by migratio)", "raw": text}


def _exception_message(job: Job) -> str | None:
    """The reason RQ recorded (a work-horse that died, a stop): its last line, sans class path."""
    try:
        result = job.latest_result()
    except Exception:  # an old or foreign record: no reason beats a crash of 'status'
        return None
    text = (result.exc_string or "").strip() if result is not None else ""
    if not text:
        return None
    last = text.splitlines()[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "." in head and " " not in head else last


def _kwargs(job: Job) -> dict[str, Any]:
    try:
        kwargs = job.kwargs
    except Exception:  # undecodable: shown with its id only
        return {}
    return kwargs if isinstance(kwargs, dict) else {}


def _stamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _since(now: float, then: float | None) -> float | None:
    return None if then is None else max(now - then, 0.0)


def _until(now: float, then: float | None) -> float | None:
    return None if then is None else max(then - now, 0.0)


def _what(job: JobView) -> str:
    if job.image_id is None:
        return job.error or "(unreadable job)"
    return f"{job.kind or '?'} migration of {job.image_id} to {job.destination}"


def _when(stamp: object) -> str:
    if not isinstance(stamp, int | float):
        return "?"
    return datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
