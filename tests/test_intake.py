"""The intake against a real Redis: hostile payloads, faults at each step, partial hand-overs.

Needs only Redis (and RQ's code): no Glance, no sshd.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import random
import socket
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Connection, Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from rq.job import Job
from rq.serializers import JSONSerializer
from tests.hostile import CLASSES, KINDS, KNOWN_SITES, hostile_payload, valid_job
from tests.sandbox import sidekiq
from tests.sandbox.redis_server import RedisServer
from tests.support import redis_only_settings

from migratio.atmosphere.intake import DEAD_LETTERS_KEPT, Intake
from migratio.atmosphere.keys import FEEDBACK_QUEUE, OPENSTACK_MIGRATOR, Keys, migration_queue
from migratio.atmosphere.sidekiq import MAX_NESTING, MAX_PAYLOAD_BYTES, BadPayload, parse_job
from migratio.config import Settings
from migratio.overview import overview
from migratio.service import Service, rq_queue

IMAGE = "6f3c9a0e-1111-2222-3333-444455556666"
MiB = 1024 * 1024
#: 5 MB payloads are generated once, not for every example
BIG = [
    b'{"class":"' + OPENSTACK_MIGRATOR.encode() + b'","args":["' + b"a" * (5 * MiB) + b'","x"]}',
    b"[" * (5 * MiB),
    json.dumps({"class": "x" * (MAX_PAYLOAD_BYTES + 1)}).encode(),
]


@pytest.fixture
def site(tmp_path: Path, redis_server: RedisServer) -> Settings:
    return redis_only_settings(tmp_path, redis_server.url)


# --- payload strategies --------------------------------------------------------------

text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates too
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4)


json_values = st.recursive(scalars, containers, max_leaves=12)
nasty = st.sampled_from(["../etc", "$(id)", "`id`", "a;b", "x\x00", "\ud800", "site-b/..", ""])


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def encode(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def job_shaped(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A Sidekiq-like job whose every field is right or wrong at random; (bytes, runnable)."""
    good = True
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["class"] = draw(st.sampled_from(CLASSES))
    else:
        good = False
        body["class"] = draw(json_values | nasty)
    if draw(st.booleans()):
        image = str(draw(st.uuids()))
    else:
        good, image = False, draw(text | nasty)
    if draw(st.booleans()):
        site = draw(st.sampled_from(KNOWN_SITES))
    else:
        good, site = False, draw(st.just("nowhere") | nasty | text)
    shape = draw(st.sampled_from(["ok", "short", "long", "wrong-type"]))
    if shape == "ok":
        body["args"] = [image, site]
    else:
        good = False
        body["args"] = {
            "short": [image],
            "long": [image, site, "x"],
            "wrong-type": draw(json_values),
        }[shape]
    if draw(st.booleans()):
        body["jid"] = draw(st.sampled_from(["0123456789abcdef01234567", "abc"]) | json_values)
    if draw(st.booleans()):
        body["enqueued_at"] = draw(
            st.floats() | st.integers() | st.sampled_from([10**400, -(10**400)]) | text
        )
    for key, value in draw(st.dictionaries(text, json_values, max_size=3)).items():
        body.setdefault(key, value)
    raw = encode(body, draw(st.booleans()))
    good = (
        good
        and depth(body) <= MAX_NESTING
        and len(raw) <= MAX_PAYLOAD_BYTES
        and all(len(str(v)) <= 4300 for v in body.values() if isinstance(v, int))
    )
    return raw, good


def tagged(strategy: st.SearchStrategy[bytes], good: bool = False) -> st.SearchStrategy[Any]:
    return strategy.map(lambda raw: (raw, good))


hostile = st.builds(
    lambda seed, kind: hostile_payload(random.Random(seed), kind),
    st.integers(0, 2**32),
    st.sampled_from(KINDS),
)
valid = st.builds(
    lambda seed, jid: valid_job(random.Random(seed), jid=jid), st.integers(0, 2**32), st.booleans()
)
payloads = st.one_of(
    tagged(st.binary(max_size=200)),
    st.tuples(json_values, st.booleans()).map(lambda vb: (encode(vb[0], vb[1]), False)),
    job_shaped(),
    tagged(st.integers(MAX_NESTING + 1, 3000).map(lambda n: b"[" * n + b"]" * n)),
    tagged(hostile),
    tagged(st.sampled_from(BIG)),
    tagged(valid, good=True),
)


# --- parse_job -----------------------------------------------------------------------


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(payloads)
def test_parse_job_raises_only_bad_payload(item: tuple[bytes, bool]) -> None:
    raw, good = item
    refused: BadPayload | None = None
    try:
        job = parse_job(raw)
    except BadPayload as exc:
        refused = exc
    if refused is not None:
        assert not good, f"a runnable job was refused: {refused.message}"
        assert refused.message
        refused.message.encode("utf-8")  # always encodable, whatever the payload held
        assert len(refused.message) < 400
    else:
        assert good or job.destination not in KNOWN_SITES or job.image_id not in raw.decode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text().map(str.encode))
def test_parse_job_never_raises_anything_else_on_any_bytes(raw: bytes) -> None:
    with contextlib.suppress(BadPayload):
        parse_job(raw)


def test_limits_are_checked_before_parsing_and_named() -> None:
    with pytest.raises(BadPayload, match=r"5,242,88\d bytes, over the limit of 65,536 bytes"):
        parse_job(b'"' + b"a" * (5 * MiB) + b'"')
    for deep in (b"[" * 2048, b'{"a":' * 17 + b"1" + b"}" * 17, b"[" * 1_000_000):
        with pytest.raises(BadPayload, match="deeper than the limit of 16 levels"):
            parse_job(deep[:MAX_PAYLOAD_BYTES])
    # brackets inside strings are not nesting
    inside = json.dumps({"class": OPENSTACK_MIGRATOR, "args": [IMAGE, "site-b"], "x": "[[" * 100})
    assert parse_job(inside.encode()).image_id == IMAGE
    escaped = json.dumps({"class": OPENSTACK_MIGRATOR, "args": [IMAGE, "b"], "x": '\\"[[[' * 9})
    assert parse_job(escaped.encode()).destination == "b"


def test_what_used_to_crash_the_intake_is_refused() -> None:
    body = {"class": OPENSTACK_MIGRATOR, "args": [IMAGE, "site-b"]}
    huge = json.dumps({**body, "enqueued_at": 1}).replace(
        '"enqueued_at": 1', '"enqueued_at": 1e400'
    )
    assert parse_job(huge.encode()).enqueued_at is None  # float overflow: ignored, still runs
    exact = json.dumps({**body, "enqueued_at": 10**400})
    assert parse_job(exact.encode()).enqueued_at is None  # OverflowError in float(): ignored
    with pytest.raises(BadPayload, match="not usable JSON: Exceeds the limit"):
        parse_job(json.dumps(body).replace("}", ', "jid": ' + "9" * 5000 + "}").encode())
    for wrong in ([OPENSTACK_MIGRATOR], {"a": 1}):
        with pytest.raises(BadPayload, match="unknown job class"):
            parse_job(json.dumps({**body, "class": wrong}).encode())
    with pytest.raises(BadPayload, match=r"'\\ud800' is not an image id") as caught:
        parse_job(json.dumps({**body, "args": ["\ud800", "site-b"]}).encode())
    assert caught.value.image_id == "\ud800"
    with pytest.raises(BadPayload, match="not UTF-8"):
        parse_job(json.dumps(body, ensure_ascii=False).encode()[:-3] + b"\xed\xa0\x80]}")


# --- the intake with generated payloads ------------------------------------------------


def drain(intake: Intake, redis: Redis) -> None:
    """Run the intake until Atmosphere's queue and the in-flight list are empty."""
    for _ in range(1000):
        if not (redis.llen(intake.source) or redis.llen(intake.inflight) or intake.must_recover):
            return
        intake.run_once(timeout=1)
    raise AssertionError("the intake never drained the queue")


def expected_jobs(batch: list[tuple[bytes, bool]]) -> Counter[tuple[str, str]]:
    """(image, destination) of every job that must reach RQ: a repeated jid counts once."""
    jids: set[str] = set()
    expected: Counter[tuple[str, str]] = Counter()
    for raw, good in batch:
        if not good:
            continue
        job = parse_job(raw)
        if job.jid and job.jid in jids:
            continue
        jids.add(job.jid)
        expected[job.image_id, job.destination] += 1
    return expected


def rq_jobs(redis: Redis, intake: Intake) -> list[Job]:
    ids = intake.queue.get_job_ids()
    assert len(ids) == len(set(ids)), "a job id is in the queue twice"
    return [Job.fetch(i, connection=redis, serializer=JSONSerializer) for i in ids]


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)  # fmt: skip
@given(batch=st.lists(payloads, min_size=1, max_size=12))
def test_the_intake_survives_any_payload(
    batch: list[tuple[bytes, bool]], redis: Redis, site: Settings
) -> None:
    redis.flushall()
    keys = Keys(site.namespace)
    source = keys.queue(migration_queue(site.name))
    for raw, _ in batch:
        redis.lpush(source, raw)
    intake = Intake(site, redis, rq_queue(site, redis))
    drain(intake, redis)  # never raises
    refused = [raw for raw, good in batch if not good]
    dead = [json.loads(entry) for entry in reversed(redis.lrange(keys.dead(site.name), 0, -1))]
    assert len(dead) == len(refused)
    for entry, raw in zip(dead, refused, strict=True):
        assert entry["reason"] and entry["size"] == len(raw)
        if len(raw) <= MAX_PAYLOAD_BYTES:  # kept exactly: as text, or in base64 if not UTF-8
            if "raw_base64" in entry:
                assert base64.b64decode(entry["raw_base64"]) == raw
            else:
                assert entry["raw"].encode() == raw
        else:
            assert entry["truncated"] and entry["sha256"]
    got = Counter((j.kwargs["image_id"], j.kwargs["destination"]) for j in rq_jobs(redis, intake))
    assert got == expected_jobs(batch)
    for line in redis.lrange(keys.queue(FEEDBACK_QUEUE), 0, -1):
        status = json.loads(line.decode("utf-8"))  # Atmosphere can read every line
        assert status["args"][3].startswith("Error: job refused: ")
        assert status["args"][3].isprintable()
    assert redis.llen(intake.inflight) == 0 and redis.llen(source) == 0


def test_refusal_lines_with_lone_surrogates_reach_sidekiq(
    tmp_path: Path, redis_server: RedisServer, redis: Redis, site: Settings
) -> None:
    keys = Keys(site.namespace)
    bodies = [
        {"class": OPENSTACK_MIGRATOR, "args": ["\ud800", "site-b"]},
        {"class": OPENSTACK_MIGRATOR, "args": [IMAGE, "\udfff\x00"]},
    ]
    for body in bodies:
        for ascii_only in (True, False):
            redis.lpush(keys.queue(migration_queue(site.name)), encode(body, ascii_only))
    with sidekiq.FeedbackServer(tmp_path / "sidekiq", redis_server.url, site.namespace) as atm:
        drain(Intake(site, redis, rq_queue(site, redis)), redis)
        received = atm.wait_for(2)  # only the ASCII-escaped ones are UTF-8 payloads at all
    assert [line[0] for line in received] == ["\\ud800", IMAGE]
    assert received[1][2] == "\\udfff\\x00"
    assert all(line[3].startswith("Error: job refused: ") for line in received)
    dead = [json.loads(e) for e in redis.lrange(keys.dead(site.name), 0, -1)]
    assert len(dead) == 4
    assert sum("raw_base64" in e for e in dead) == 2  # the non-UTF-8 ones are kept exactly


def test_hostile_payloads_in_flight_do_not_crash_loop_recovery(
    redis: Redis, site: Settings
) -> None:
    """What a crash left in flight is recovered even when it is hostile: no crash loop."""
    keys = Keys(site.namespace)
    rng = random.Random(7)
    hostile = [hostile_payload(rng, kind) for kind in KINDS for _ in range(3)]
    good = valid_job(rng, site="site-b")
    for raw in [*hostile, good]:
        redis.lpush(keys.inflight(site.name), raw)
    service = Service(site, redis)
    service.run_once(timeout=1)
    assert redis.llen(keys.inflight(site.name)) == 0
    assert redis.llen(keys.dead(site.name)) == len(hostile)
    [job_id] = service.queue.get_job_ids()
    assert job_id == f"migratio-{json.loads(good)['jid']}"


def test_a_request_without_jid_is_never_a_duplicate(redis: Redis, site: Settings) -> None:
    keys = Keys(site.namespace)
    body = json.dumps({"class": OPENSTACK_MIGRATOR, "args": [IMAGE, "site-b"]})
    intake = Intake(site, redis, rq_queue(site, redis))
    redis.lpush(keys.queue(migration_queue(site.name)), body)
    drain(intake, redis)
    [first] = rq_jobs(redis, intake)
    first.set_status("finished")  # as if it had run (RQ keeps the record for a week)
    redis.lpop(intake.queue.key)
    for _ in range(2):  # the same bytes pushed again, twice
        redis.lpush(keys.queue(migration_queue(site.name)), body)
    drain(intake, redis)
    again = rq_jobs(redis, intake)
    assert len(again) == 2 and first.id not in {j.id for j in again}


# --- Redis errors at each step of the hand-over -------------------------------------------


class FaultyConnection(Connection):
    """A real connection that loses itself once, at a chosen command.

    ``before``: the connection drops before the command is sent (nothing applied).
    ``after``: the command is sent and the server has applied it, then the reply is lost.
    """

    plan: ClassVar[list[tuple[bytes, str]]] = []
    fired: ClassVar[list[tuple[bytes, str]]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        data = command if isinstance(command, bytes | str) else b"".join(command)
        data = data.encode() if isinstance(data, str) else data
        for index, (marker, mode) in enumerate(self.plan):
            if marker in data:
                del self.plan[index]
                self.fired.append((marker, mode))
                if mode == "before":
                    self.disconnect()
                    raise RedisConnectionError(f"injected: lost before {marker!r} was sent")
                super().send_packed_command(command, check_health)
                sock = self._sock
                assert sock is not None
                sock.shutdown(socket.SHUT_WR)  # Redis runs all it got, then sees the end
                sock.settimeout(10)
                while sock.recv(65536):
                    pass
                self.disconnect()
                raise RedisConnectionError(f"injected: reply to {marker!r} lost")
        super().send_packed_command(command, check_health)


def faulty_client(redis_server: RedisServer) -> Redis:
    """A client that re-sends a command whose connection failed, as ``Redis(host, port)`` does
    with redis-py's defaults (up to 10 times in redis-py 8)."""
    client = Redis(host="127.0.0.1", port=redis_server.port, retry=Retry(NoBackoff(), 3))
    client.connection_pool.connection_class = FaultyConnection
    return client


def command(name: str) -> bytes:
    return f"${len(name)}\r\n{name}\r\n".encode()


STEPS = {
    "take the first (BLMOVE)": lambda intake: command("BLMOVE"),
    "take the rest (script)": lambda intake: intake._take.sha.encode(),
    "look for the jids in RQ": lambda intake: command("HGET"),
    "enqueue + dead letter + LREM (EXEC)": lambda intake: command("EXEC"),
    "recover what is in flight (script)": lambda intake: intake._oldest.sha.encode(),
}


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("step", list(STEPS))
def test_a_connection_error_at_each_step_hands_each_job_over_once(
    step: str, mode: str, redis_server: RedisServer, redis: Redis, site: Settings
) -> None:
    keys = Keys(site.namespace)
    rng = random.Random(1)
    good = [valid_job(rng, site="site-b"), valid_job(rng, jid=False), valid_job(rng)]
    bad = b'{"class": "' + OPENSTACK_MIGRATOR.encode() + b'", "args": ["' + IMAGE.encode()
    bad += b'", "nowhere"]}'
    for raw in [good[0], bad, *good[1:]]:
        redis.lpush(keys.queue(migration_queue(site.name)), raw)
    client = faulty_client(redis_server)
    intake = Intake(site, client, rq_queue(site, client))
    intake.recover()  # the service starts with a recovery
    if step.startswith("recover"):  # a crash left two jobs in flight
        for _ in range(2):
            redis.lmove(keys.queue(migration_queue(site.name)), intake.inflight, "RIGHT", "LEFT")
        intake.must_recover = True
    FaultyConnection.plan[:] = [(STEPS[step](intake), mode)]
    FaultyConnection.fired.clear()
    errors = 0
    for _ in range(20):
        try:
            drain(intake, redis)
            break
        except RedisConnectionError:
            errors += 1
    assert FaultyConnection.fired == [(STEPS[step](intake), mode)] and errors == 1
    jobs = rq_jobs(redis, intake)
    assert sorted(j.kwargs["image_id"] for j in jobs) == sorted(
        json.loads(raw)["args"][0] for raw in good
    )
    assert len(redis.keys("rq:job:*")) == 3
    assert redis.llen(keys.dead(site.name)) == 1
    assert redis.llen(keys.queue(FEEDBACK_QUEUE)) == 1  # the refusal line, once
    assert redis.llen(intake.inflight) == 0
    assert redis.llen(keys.queue(migration_queue(site.name))) == 0


def test_after_an_error_mid_hand_over_the_service_hands_over_again(
    redis_server: RedisServer, redis: Redis, site: Settings
) -> None:
    """Finding 4: one error in the hand-over, then healthy iterations: nothing stays in flight."""
    keys = Keys(site.namespace)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    service = Service(site, faulty_client(redis_server), clock=lambda: now[0], sleep=sleep)
    service.run_once(timeout=1)
    FaultyConnection.plan[:] = [(command("EXEC"), "before")]
    jid = sidekiq.push(site.redis_url, site.namespace, migration_queue(site.name),
                       OPENSTACK_MIGRATOR, [IMAGE, "site-b"])[0]  # fmt: skip
    service.run_once(timeout=1)
    assert FaultyConnection.plan == [] and service.outage_since is not None
    assert redis.llen(keys.inflight(site.name)) == 1  # the error left it in flight
    for _ in range(3):
        service.run_once(timeout=1)
    assert redis.llen(keys.inflight(site.name)) == 0
    assert service.queue.get_job_ids() == [f"migratio-{jid}"]
    assert service.outage_since is None


def test_the_default_redis_client_would_hand_over_twice(
    redis_server: RedisServer, redis: Redis, site: Settings
) -> None:
    """Why the intake's client never re-sends: redis-py's default re-sends a lost EXEC."""
    client = faulty_client(redis_server)
    intake = Intake(site, client, rq_queue(site, client))
    intake.redis = client  # the retrying client, as before
    redis.lpush(intake.source, valid_job(random.Random(3)))
    FaultyConnection.plan[:] = [(command("EXEC"), "after")]
    intake.run_once(timeout=1)  # no error: redis-py re-sent the whole transaction
    assert FaultyConnection.plan == []
    ids = intake.queue.get_job_ids()
    assert len(ids) == 2 and len(set(ids)) == 1  # one job, queued twice: it would run twice


# --- a partly applied hand-over -------------------------------------------------------------


@pytest.mark.parametrize("state", ["recorded, never queued", "recorded and queued", "finished"])
def test_a_partly_applied_hand_over_is_recovered(state: str, redis: Redis, site: Settings) -> None:
    keys = Keys(site.namespace)
    raw = valid_job(random.Random(5), site="site-b")
    job = parse_job(raw)
    job_id = f"migratio-{job.jid}"
    queue = rq_queue(site, redis)
    intake = Intake(site, redis, queue)
    # what a hand-over without a transaction could leave: the record, maybe the queue entry,
    # and the payload still in flight
    with redis.pipeline() as pipe:
        queue.enqueue_many([intake.enqueue_data(job, job_id)], pipeline=pipe)
        pipe.execute()
    if state == "recorded, never queued":
        redis.lrem(queue.key, 0, job_id)
    elif state == "finished":
        redis.lrem(queue.key, 0, job_id)
        Job.fetch(job_id, connection=redis, serializer=JSONSerializer).set_status("finished")
    redis.lpush(keys.inflight(site.name), raw)
    Service(site, redis).run_once(timeout=1)
    assert redis.llen(keys.inflight(site.name)) == 0
    if state == "finished":
        assert queue.get_job_ids() == []  # ran already: not again
    else:
        assert queue.get_job_ids() == [job_id]  # queued exactly once


def test_batches_are_bounded_in_bytes(redis: Redis, site: Settings) -> None:
    keys = Keys(site.namespace)
    source = keys.queue(migration_queue(site.name))
    for _ in range(3):
        redis.lpush(source, b"x" * (3 * MiB))
    for seed in range(50):
        redis.lpush(source, valid_job(random.Random(seed), jid=False))
    intake = Intake(site, redis, rq_queue(site, redis))
    taken = [intake.run_once(timeout=1) for _ in range(5)]
    assert taken[:3] == [1, 1, 1] and taken[3] == 50
    assert redis.llen(keys.dead(site.name)) == 3
    started = time.monotonic()
    assert intake.run_once(timeout=1) == 0
    assert time.monotonic() - started < 3


def test_refused_payloads_are_not_kept_in_memory(redis: Redis, site: Settings) -> None:
    """A refused payload is let go at once (no exception cycle keeps it until a gc run)."""
    keys = Keys(site.namespace)
    intake = Intake(site, redis, rq_queue(site, redis))
    for i in range(20):
        redis.lpush(intake.source, rf'{{"a": "\ud800{i}"}}'.encode() + b"\xff" * (2 * MiB))
        redis.lpush(intake.source, b"[" * (MAX_PAYLOAD_BYTES - 10) + b"\xff" * MiB)
    gc.disable()
    tracemalloc.start()
    try:
        while redis.llen(intake.source):
            intake.run_once(timeout=1)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert redis.llen(keys.dead(site.name)) == 40
    assert held < 4 * MiB, f"{held / MiB:.0f} MiB still held after refusing 60 MiB of payloads"


def test_status_never_prints_a_payload_raw(redis: Redis, site: Settings) -> None:
    """A refused payload's terminal escapes reach `status` as inert text, in both forms."""
    keys = Keys(site.namespace)
    hostile = b'\x1b[2J\x1b]0;owned\x07{"class":"x","args":[]}'
    redis.lpush(keys.queue(migration_queue(site.name)), hostile)
    Service(site, redis).run_once(timeout=1)
    assert redis.llen(keys.dead(site.name)) == 1
    snapshot = overview(site, redis)
    text = "\n".join(snapshot.lines())
    assert "\\x1b[2J" in text
    assert all(line.isprintable() for line in text.splitlines())
    encoded = snapshot.to_json()
    assert encoded.isascii() and "\x1b" not in encoded
    assert json.loads(encoded)["dead_letters"][0]["raw"].startswith("\x1b[2J")


def test_the_dead_letters_keep_the_newest_and_count_them_all(redis: Redis, site: Settings) -> None:
    """Years of a producer's bug cannot fill Redis: the oldest dead letters go."""
    keys = Keys(site.namespace)
    intake = Intake(site, redis, rq_queue(site, redis))
    total = DEAD_LETTERS_KEPT + 30
    for i in range(total):
        redis.lpush(intake.source, f'{{"bad": {i}}}'.encode())
    redis.lpush(intake.source, valid_job(random.Random(1), jid=False))
    while redis.llen(intake.source):
        intake.run_once(timeout=1)
    kept = [json.loads(entry)["raw"] for entry in redis.lrange(keys.dead(site.name), 0, -1)]
    assert kept == [f'{{"bad": {i}}}' for i in reversed(range(30, total))]
    assert redis.hget(keys.metrics(site.name), "jobs_refused") == str(total).encode()
    assert len(rq_jobs(redis, intake)) == 1  # the good job among them went on


@pytest.mark.parametrize(
    "payload",
    [b"\xff" * MAX_PAYLOAD_BYTES, b"\x01" * MAX_PAYLOAD_BYTES, "ж".encode() * (32 * 1024)],
    ids=["not-utf8", "control-characters", "two-byte-utf8"],
)
def test_a_dead_letter_takes_at_most_130_kb_and_keeps_the_bytes(
    payload: bytes, redis: Redis, site: Settings
) -> None:
    """Whatever JSON would escape (6 bytes for one) goes in base64: 1,000 of them fit ~130 MB."""
    keys = Keys(site.namespace)
    intake = Intake(site, redis, rq_queue(site, redis))
    redis.lpush(intake.source, payload)
    intake.run_once(timeout=1)
    stored = redis.lindex(keys.dead(site.name), 0)
    assert stored is not None and len(stored) <= 130_000
    entry = json.loads(stored)
    assert base64.b64decode(entry["raw_base64"]) == payload
    assert entry["size"] == len(payload) and len(entry["raw"]) <= 1024
