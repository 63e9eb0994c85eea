"""Hostile payloads for the intake: everything a broken or malicious producer could push.

Used by the tests (tests/test_intake.py, tests/test_hostile_payloads.py) and by
bench/hostile_payloads.py. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from tests.sandbox import sidekiq

from migratio.atmosphere.keys import AMAZON_MIGRATOR, OPENSTACK_MIGRATOR, Keys, migration_queue
from migratio.config import Settings

MiB = 1024 * 1024
CLASSES = (OPENSTACK_MIGRATOR, AMAZON_MIGRATOR)
#: destinations the test settings know (tests/support.py, the sandbox)
KNOWN_SITES = ("site-b", "site-b-api")
#: strings that must never be interpreted by anything
NASTY_STRINGS = (
    "../etc",
    "site-b/../../x",
    "..",
    "$(touch /tmp/pwned)",
    "`id`",
    "a; rm -rf /",
    "x|y",
    "a && b",
    "site-b\x00",
    "\x00",
    "\ud800",
    "\udfff-site",
    "\x1b[31mred",
    "line\nbreak",
    "",
    " ",
    "é" * 300,
    "-rf",
    "--help",
    "%s%n",
    "{0}",
    "site-b ",
)
WRONG_TYPES: tuple[object, ...] = (None, True, 0, -1, 1.5, [], {}, ["a"], {"a": 1}, [[1, 2]])
HUGE_NUMBERS = ("1e400", "-1e400", "9" * 400, "9" * 5000, "1" + "0" * 4299, "NaN", "Infinity")


def valid_job(rng: random.Random, *, jid: bool = True, site: str | None = None) -> bytes:
    """A well-formed migration job as Sidekiq writes it (with or without a jid)."""
    body: dict[str, object] = {
        "retry": True,
        "queue": "migration_site-a",
        "class": rng.choice(CLASSES),
        "args": [str(uuid.UUID(int=rng.getrandbits(128))), site or rng.choice(KNOWN_SITES)],
        "created_at": 1.7e9,
        "enqueued_at": 1.7e9,
    }
    if jid:
        body["jid"] = f"{rng.getrandbits(96):024x}"
    return json.dumps(body, separators=(",", ":")).encode()


def hostile_payload(rng: random.Random, kind: str | None = None) -> bytes:  # noqa: PLR0911, PLR0912
    """One payload that must be refused, of ``kind`` (random when None); see :data:`KINDS`."""
    kind = kind or rng.choice(KINDS)
    image = str(uuid.UUID(int=rng.getrandbits(128)))
    job_class = rng.choice(CLASSES)
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 300))
    if kind == "non-utf8":
        body = json.dumps({"class": job_class, "args": [image, "site-b"]}).encode()
        cut = rng.randint(1, len(body) - 2)
        return (
            body[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]) + body[cut:]
        )
    if kind == "deep":
        depth = rng.choice([17, 100, 1000, 3000, 100_000])
        opener = rng.choice([b"[", b'{"a":'])
        return opener * depth + (b"]" * depth if opener == b"[" else b"1" + b"}" * depth)
    if kind == "huge-number":
        number = rng.choice(HUGE_NUMBERS)
        return (
            f'{{"class":"{job_class}","args":["{image}",{number}],"enqueued_at":{number},'
            f'"jid":{number}}}'
        ).encode()
    if kind == "nul":
        body = json.dumps({"class": job_class, "args": [image, "site-b"]}).encode()
        cut = rng.randint(0, len(body))
        return body[:cut] + b"\x00" + body[cut:]
    if kind == "big":
        size = rng.choice([64 * 1024 + 1, MiB, 5 * MiB])
        return json.dumps({"class": job_class, "args": [image, "x" * size]}).encode()
    if kind == "wrong-type":
        field = rng.choice(["class", "args", "image", "destination", "body"])
        wrong = rng.choice(WRONG_TYPES)
        if field == "body":
            return json.dumps(wrong).encode()
        body = {"class": job_class, "args": [image, "site-b"]}
        if field in ("class", "args"):
            body[field] = wrong
        else:
            body["args"] = [wrong, "site-b"] if field == "image" else [image, wrong]
        return json.dumps(body).encode()
    if kind == "nasty-string":
        nasty = rng.choice(NASTY_STRINGS)
        args = [nasty, "site-b"] if rng.random() < 0.5 else [image, nasty]
        return json.dumps(
            {"class": job_class, "args": args}, ensure_ascii=rng.random() < 0.5
        ).encode("utf-8", "surrogatepass")
    if kind == "unknown-site":
        return json.dumps(
            {"class": job_class, "args": [image, f"nowhere-{rng.randint(0, 9)}"]}
        ).encode()
    if kind == "unknown-class":
        return json.dumps({"class": "Kernel::Exec", "args": [image, "site-b"]}).encode()
    raise ValueError(kind)


KINDS = (
    "bytes",
    "non-utf8",
    "deep",
    "huge-number",
    "nul",
    "big",
    "wrong-type",
    "nasty-string",
    "unknown-site",
    "unknown-class",
)


def hostile_payloads(seed: int, count: int) -> list[bytes]:
    """``count`` payloads that must all be refused: every kind in turn, details at random."""
    rng = random.Random(seed)
    return [hostile_payload(rng, KINDS[i % len(KINDS)]) for i in range(count)]


@dataclass
class Figures:
    """What :func:`through_the_service` measured."""

    pushed: int = 0
    pushed_bytes: int = 0
    dead_lettered: int = 0
    refusal_lines: int = 0
    seconds: float = 0.0
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    service_restarts: int = 0
    copies: list[dict[str, object]] = field(default_factory=list)

    def lines(self) -> list[str]:
        mib = 1024
        return [
            f"hostile payloads pushed: {self.pushed} ({self.pushed_bytes / MiB:.0f} MiB)",
            f"dead-lettered: {self.dead_lettered}; refusal lines to Atmosphere: "
            f"{self.refusal_lines}",
            f"all refused and the valid job migrated in {self.seconds:.1f} s; "
            f"service restarts: {self.service_restarts}",
            f"service RSS: {self.rss_start_kib / mib:.1f} MiB at start, peak (VmHWM) "
            f"{self.rss_peak_kib / mib:.1f} MiB, {self.rss_end_kib / mib:.1f} MiB at the end",
        ]


def _rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for {pid}")


def through_the_service(
    settings: Settings, redis: Redis, image_id: str, destination: str, *, seed: int, count: int
) -> Figures:
    """``count`` hostile payloads, then one valid job, through a running ``migratio run``.

    Returns when the valid job's copy is active at the destination (or raises after 300 s).
    The service must stay up the whole time: the same process, never restarted.
    """
    keys = Keys(settings.namespace)
    source = keys.queue(migration_queue(settings.name))
    figures = Figures()
    env = {**os.environ, "MIGRATIO_CONFIG": str(settings.config_path)}
    service = subprocess.Popen(
        [sys.executable, "-m", "migratio", "run"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not redis.keys("rq:worker:*") and time.monotonic() < deadline:
            time.sleep(0.1)
        figures.rss_start_kib = _rss_kib(service.pid)
        started = time.monotonic()
        rng = random.Random(seed)
        with redis.pipeline(transaction=False) as pipe:
            for i in range(count):
                raw = hostile_payload(rng, KINDS[i % len(KINDS)])
                figures.pushed += 1
                figures.pushed_bytes += len(raw)
                pipe.lpush(source, raw)
                if i % 20 == 19:
                    pipe.execute()
            pipe.execute()
        [jid] = sidekiq.push(
            settings.redis_url, settings.namespace, migration_queue(settings.name),
            OPENSTACK_MIGRATOR, [image_id, destination],
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert service.poll() is None, f"the service exited with {service.returncode}"
            done = rq_status(redis, f"migratio-{jid}") in {"finished", "failed"}
            if done and redis.llen(keys.dead(settings.name)) >= count:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the valid job did not finish within 300 s")
        figures.seconds = time.monotonic() - started
        figures.rss_end_kib = _rss_kib(service.pid)
        figures.rss_peak_kib = _rss_kib(service.pid, "VmHWM")
        figures.dead_lettered = int(redis.llen(keys.dead(settings.name)))
        figures.refusal_lines = sum(
            b"Error: job refused: " in line for line in redis.lrange(keys.queue("feedback"), 0, -1)
        )
        log_text = (settings.log_dir / "migratio.log").read_text(errors="replace")
        figures.service_restarts = log_text.count("migratio for site ") - 1
        assert redis.llen(source) == 0 and redis.llen(keys.inflight(settings.name)) == 0
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
    assert service.returncode == 0, f"the service stopped with {service.returncode}"
    return figures


def rq_status(redis: Redis, job_id: str) -> str | None:
    """An RQ job's status, or None when RQ has no such job."""
    status = redis.hget(f"rq:job:{job_id}", "status")
    return status.decode() if isinstance(status, bytes) else None
