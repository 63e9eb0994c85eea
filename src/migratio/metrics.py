"""Prometheus metrics: counters kept in Redis, served by the site's service.

RQ forks a work-horse per job, and more workers may run on other hosts: a counter in a
process's memory would die with the horse that counted it. So every process that counts adds
to one Redis hash per site (``<namespace>:migratio:metrics:<site>``, ``HINCRBY``: atomic, and
it survives restarts of any process), and the service's endpoint reads that hash, plus the
queue depths, at each scrape (a custom collector). prometheus_client's multiprocess mode was
the alternative; it needs one shared directory on one host, per-process files cleaned up after
dead horses, and it loses everything a worker on another host counts.

A hash field is the metric's short name, then ``|label=value`` pairs in a fixed order; label
values are site ids, migration kinds and exception class names, none of which holds ``|``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal, Protocol, cast

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from migratio import __version__, redis_client
from migratio.atmosphere.keys import Keys, migration_queue
from migratio.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from migratio.config import Settings

log = logging.getLogger(__name__)

PREFIX = "migratio_"
#: upper bounds (seconds) of the migration duration histogram: 10 s … 12 h
DURATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                    14400.0, 28800.0, 43200.0)  # fmt: skip
#: seconds a scrape waits for Redis before reporting ``migratio_redis_up 0``
SCRAPE_TIMEOUT = 5.0

Outcome = Literal["succeeded", "failed", "retried"]


def _field(name: str, labels: Mapping[str, str] | None = None) -> str:
    return name + "".join(f"|{key}={value}" for key, value in (labels or {}).items())


def _parse_field(field: str) -> tuple[str, dict[str, str]]:
    name, *pairs = field.split("|")
    return name, dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def count_taken(pipe: Redis | Pipeline, keys: Keys, site: str, jobs: int = 1) -> None:
    """Jobs taken from Atmosphere's queue and handed to the workers (the intake calls this)."""
    if jobs:
        pipe.hincrby(keys.metrics(site), "jobs_taken", jobs)


def count_refused(pipe: Redis | Pipeline, keys: Keys, site: str) -> None:
    """A payload refused into the dead letters (the intake calls this)."""
    pipe.hincrby(keys.metrics(site), "jobs_refused", 1)


def count_attempt(
    redis: Redis,
    keys: Keys,
    site: str,
    *,
    outcome: Outcome,
    kind: str,
    destination: str,
    seconds: float,
    bytes_moved: int = 0,
    reason: str | None = None,
) -> None:
    """One run of a migration job ended: ``outcome``, how long it took, what it moved.

    ``failed`` is a job that failed for good; ``retried`` one that failed and is scheduled to run
    again; ``reason`` is the error's class name (``InternalError`` for a bug). Metrics never
    fail a job: a Redis error here is logged and forgotten.
    """
    key = keys.metrics(site)
    labels = {"destination": destination}
    if outcome != "succeeded":
        labels["reason"] = reason or "InternalError"
    bucket = next((str(b) for b in DURATION_BUCKETS if seconds <= b), "+Inf")
    timing = {"kind": kind, "outcome": outcome}
    try:
        with redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, _field(f"jobs_{outcome}", labels), 1)
            if bytes_moved:
                pipe.hincrby(key, _field("bytes_moved", {"destination": destination}), bytes_moved)
            pipe.hincrby(key, _field("duration_bucket", {**timing, "le": bucket}), 1)
            pipe.hincrbyfloat(key, _field("duration_sum", timing), seconds)
            pipe.execute()
    except RedisError as exc:
        log.warning("cannot record the job's metrics in Redis: %s", exc)


class _HasOutages(Protocol):
    outages: int


#: each state a job can be in, as ``migratio_jobs{state=…}`` shows it (see overview.py)
STATES = ("waiting", "in_flight", "queued", "running", "scheduled", "deferred", "failed",
          "dead_letters")  # fmt: skip


def queue_depths(settings: Settings, redis: Redis) -> dict[str, int]:
    """How many jobs are in each state right now (one Redis round trip)."""
    from migratio.service import rq_queue  # noqa: PLC0415  (service imports this module)

    keys = Keys(settings.namespace)
    queue = rq_queue(settings, redis)
    with redis.pipeline(transaction=False) as pipe:
        pipe.llen(keys.queue(migration_queue(settings.name)))
        pipe.llen(keys.inflight(settings.name))
        pipe.llen(queue.key)
        for registry in (
            queue.started_job_registry,
            queue.scheduled_job_registry,
            queue.deferred_job_registry,
            queue.failed_job_registry,
        ):
            pipe.zcard(registry.key)
        pipe.llen(keys.dead(settings.name))
        counts = pipe.execute()
    return dict(zip(STATES, (int(n) for n in counts), strict=True))


class MetricsCollector:
    """The prometheus_client collector that reads migratio's counters from Redis per scrape."""

    def __init__(self, settings: Settings, redis: Redis, service: _HasOutages | None) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.service = service
        self.redis_down = False  # to log an outage once, not at every scrape

    def collect(self) -> Iterator[object]:
        """The metric families of one scrape."""
        from prometheus_client.core import (  # noqa: PLC0415  (only the service needs it)
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        info = GaugeMetricFamily(
            f"{PREFIX}info", "This migratio: its site and version", labels=["site", "version"]
        )
        info.add_metric([self.settings.name, __version__], 1)
        yield info
        outages = CounterMetricFamily(
            f"{PREFIX}redis_outages",
            "Times the service found Redis unreachable (since the service started)",
        )
        outages.add_metric([], self.service.outages if self.service is not None else 0)
        yield outages
        up = GaugeMetricFamily(f"{PREFIX}redis_up", "1 if this scrape could read Redis")
        try:
            raw = self.redis.hgetall(self.keys.metrics(self.settings.name))
            depths = queue_depths(self.settings, self.redis)
        except RedisError as exc:
            if not self.redis_down:
                log.warning("metrics: cannot read Redis (reporting migratio_redis_up 0): %s", exc)
            self.redis_down = True
            up.add_metric([], 0)
            yield up
            return
        if self.redis_down:
            log.info("metrics: Redis can be read again")
        self.redis_down = False
        up.add_metric([], 1)
        yield up
        yield from self._counters(_decode(raw.items()))
        jobs = GaugeMetricFamily(
            f"{PREFIX}jobs", "Jobs in each state right now (as 'migratio status')", labels=["state"]
        )
        for state, value in depths.items():
            jobs.add_metric([state], value)
        yield jobs

    def _counters(self, values: dict[str, float]) -> Iterator[object]:
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        families: dict[str, tuple[str, list[str]]] = {
            "jobs_taken": ("Jobs taken from Atmosphere's queue and handed to the workers", []),
            "jobs_refused": ("Payloads refused into the dead letters", []),
            "jobs_succeeded": ("Migration jobs that succeeded", ["destination"]),
            "jobs_failed": ("Migration jobs that failed for good", ["destination", "reason"]),
            "jobs_retried": ("Failed runs scheduled to run again", ["destination", "reason"]),
            "bytes_moved": ("Bytes sent to each destination by jobs that succeeded",
                            ["destination"]),
        }  # fmt: skip
        made = {
            name: CounterMetricFamily(f"{PREFIX}{name}", text, labels=labels)
            for name, (text, labels) in families.items()
        }
        buckets: dict[tuple[str, str], dict[float, float]] = {}
        sums: dict[tuple[str, str], float] = {}
        for field, value in values.items():
            name, labels = _parse_field(field)
            if name in made:
                wanted = families[name][1]
                made[name].add_metric([labels.get(label, "") for label in wanted], value)
            elif name == "duration_bucket":
                series = (labels.get("kind", ""), labels.get("outcome", ""))
                bound = float(labels.get("le", "inf"))
                buckets.setdefault(series, {})[bound] = value
            elif name == "duration_sum":
                sums[(labels.get("kind", ""), labels.get("outcome", ""))] = value
        for name in ("jobs_taken", "jobs_refused"):
            if not made[name].samples:
                made[name].add_metric([], 0)
        yield from made.values()
        duration = HistogramMetricFamily(
            f"{PREFIX}migration_duration_seconds",
            "How long each run of a migration job took",
            labels=["kind", "outcome"],
        )
        for series in sorted(set(buckets) | set(sums)):
            counts = buckets.get(series, {})
            running, cumulative = 0.0, []
            for bound in (*DURATION_BUCKETS, float("inf")):
                running += counts.get(bound, 0)
                cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
            duration.add_metric(list(series), cumulative, sums.get(series, 0.0))
        yield duration


def _decode(items: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, float]:
    out = {}
    for field, value in items:
        name = field.decode() if isinstance(field, bytes) else field
        out[name] = float(value)
    return out


def serve(settings: Settings, service: _HasOutages | None = None) -> None:
    """Start the endpoint (a daemon thread) on ``metrics_address:metrics_port``, if configured."""
    if not settings.metrics_port:
        return
    from prometheus_client import start_http_server  # noqa: PLC0415
    from prometheus_client.registry import CollectorRegistry  # noqa: PLC0415

    redis = redis_client.connect(
        settings.redis_url,
        settings.redis_tls,
        socket_timeout=SCRAPE_TIMEOUT,
        socket_connect_timeout=SCRAPE_TIMEOUT,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(cast("Collector", MetricsCollector(settings, redis, service)))
    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"{settings.config_path}: metrics_port: cannot listen on "
            f"{settings.metrics_address}:{settings.metrics_port}: {exc.strerror or exc}"
        ) from None
    log.info(
        "metrics for Prometheus on http://%s:%d/metrics",
        settings.metrics_address,
        settings.metrics_port,
    )
