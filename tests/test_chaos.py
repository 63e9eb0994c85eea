"""A seeded chaos test: migrations through ``migratio run`` while processes die at random.

About ten migrations (and two requests pushed twice) go through a service with two workers
while the test SIGKILLs, at random, the service, a worker, a work-horse, rsync or ssh, and
restarts Redis once (persistent, as production runs it). It plays systemd: a dead service
takes the rest of its unit with it and is started again. Then: nothing lost, no duplicate
copy, every request ended, nothing left in any queue or staging area.

The seed is printed; ``MIGRATIO_CHAOS_SEED=<seed>`` replays the same choices.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from tests.sandbox import sidekiq
from tests.sandbox.images import make_qcow2
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.test_exactly_once import (
    Service,
    assert_never_two_at_once,
    assert_no_staging,
    children_of,
    push,
    site_settings,
    still_there,
    wait_final,
    wait_left,
)

from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, Keys, migration_queue
from migratio.atmosphere.status import ALREADY_UPLOADED
from migratio.config import Settings, load_settings
from migratio.sweep import sweep

MiB = 1024 * 1024
KINDS = ("service", "worker", "work-horse", "rsync", "ssh")
#: random kills before the test lets everything finish
KILLS = 12


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", persistent=True) as server:
        yield server


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def victims(service: Service) -> dict[str, list[int]]:
    """The processes of the running service, by kind."""
    found: dict[str, list[int]] = {kind: [] for kind in KINDS}
    if service.proc.poll() is not None:
        return found
    found["service"] = [service.proc.pid]
    kids = children_of()
    workers = kids.get(service.proc.pid, [])
    found["worker"] = list(workers)
    for worker in workers:
        found["work-horse"] += kids.get(worker, [])
    for pid in service.tree():
        program = Path(cmdline(pid)[0]).name if cmdline(pid) else ""
        if program in ("rsync", "ssh"):
            found[program].append(pid)
    return found


class Systemd:
    """Runs the service as its unit would: Restart=on-failure, the unit killed as a whole."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service(self.settings)
        self.restarts = 0
        self.every: dict[int, str | None] = {}

    def mind(self) -> None:
        """Note the unit's processes; restart the service if it died (after its unit is gone)."""
        self.service.tree()
        self.every.update(self.service.seen)
        if self.service.proc.poll() is None:
            return
        for pid in still_there(self.service.seen):  # KillMode=mixed: SIGKILL to the rest
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)  # RestartSec (10 s in the unit; shorter here)
        self.service = Service(self.settings)
        self.restarts += 1

    def stop(self) -> None:
        self.service.stop()
        self.every.update(self.service.seen)


@pytest.mark.slow
def test_chaos(
    clean_sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed = int(os.environ.get("MIGRATIO_CHAOS_SEED") or random.randrange(10**9))
    rng = random.Random(seed)  # a replayable test, not a secret
    with capsys.disabled():
        print(f"\nchaos seed {seed} (replay: MIGRATIO_CHAOS_SEED={seed})", flush=True)
    sb = clean_sandbox
    redis: Redis = redis_server.client()
    settings = site_settings(sb, tmp_path, redis_server.url, workers=2)
    settings_path = settings.config_path
    settings_path.write_text(settings_path.read_text().replace("[1, 1, 1]", "[1, 2, 3, 4, 5]"))
    settings = load_settings(settings_path)
    # one destination per image: site-b and site-b-api are two site ids of one Glance
    images: list[str] = []
    for i in range(10):
        data = rng.choice([16, 48, 96]) * MiB
        path = make_qcow2(tmp_path / f"i{i}.qcow2", virtual_size=256 * MiB, data_bytes=data)
        images.append(sb.source.upload_image(path, name=f"chaos-{i}", disk_format="qcow2"))
        path.unlink()
    requests = [(image_id, ("site-b", "site-b-api")[i % 2]) for i, image_id in enumerate(images)]
    requests += rng.sample(requests, 2)  # the same request twice
    rng.shuffle(requests)

    with sidekiq.FeedbackServer(tmp_path / "sidekiq", redis_server.url, "atmosphere") as atmo:
        unit = Systemd(settings)
        jids: list[tuple[str, str, str]] = []
        actions: Counter[str] = Counter()
        redis_restarted = False
        redis_at = rng.randrange(2, KILLS - 2)
        try:
            for image_id, dest in requests:
                jids.append((push(settings, [image_id, dest], OPENSTACK_MIGRATOR), image_id, dest))
                time.sleep(rng.uniform(0, 0.5))
            while sum(actions.values()) < KILLS:
                time.sleep(rng.uniform(1.0, 4.0))
                unit.mind()
                if not redis_restarted and sum(actions.values()) == redis_at:
                    redis_server.crash()
                    time.sleep(rng.uniform(0.5, 3.0))
                    redis_server.start()
                    redis_restarted = True
                    actions["redis restart"] += 1
                    continue
                found = victims(unit.service)
                kinds = [k for k in KINDS if found[k]]
                if not kinds:
                    continue
                kind = rng.choice(kinds)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(found[kind]), signal.SIGKILL)
                actions[kind] += 1
            # the chaos is over: systemd keeps it running until every request has ended
            finals = {}
            deadline = time.monotonic() + 900
            for jid, _, _ in jids:
                while jid not in finals:
                    unit.mind()
                    with contextlib.suppress(AssertionError):
                        finals[jid] = wait_final(redis, jid, timeout=5)
                    assert time.monotonic() < deadline, f"request {jid} never ended"
            unit.stop()
        finally:
            if unit.service.proc.poll() is None:
                unit.service.kill_group()
        received = atmo.received()
    # what the periodic sweep would find (a dying attempt's Glance copy can appear after the
    # next attempt looked): shown in the figures, then nothing may be left
    swept = sweep(settings, redis, min_age=0).removed

    lost = [jid for jid, _, _ in jids if finals[jid].get_status() != "finished"]
    duplicates = 0
    for image_id in images:
        copies = sb.destination.find_by_property("source_uuid", image_id)
        by_status = Counter(c["status"] for c in copies)
        duplicates += max(0, by_status["active"] - 1)
        assert by_status == {"active": 1}, (image_id, copies)
        # Glance's own checksum of the bytes it received: the source's bytes
        assert copies[0]["checksum"] == sb.source.image(image_id)["checksum"]
    ended = {
        (image_id, dest): [
            line[3]
            for line in received
            if line[0] == image_id
            and line[2] == dest
            and line[3].startswith(("Registered", ALREADY_UPLOADED, "Error"))
        ]
        for _, image_id, dest in jids
    }
    per_pair = Counter((image_id, dest) for _, image_id, dest in jids)
    keys = Keys(settings.namespace)
    with capsys.disabled():
        print(
            f"chaos seed {seed}: actions {dict(sorted(actions.items()))}, "
            f"service restarts {unit.restarts}, jobs {len(jids)}, lost {len(lost)}, "
            f"duplicate copies {duplicates}, swept afterwards {swept}",
            flush=True,
        )
    assert lost == []
    assert duplicates == 0
    assert redis_restarted
    for pair, count in per_pair.items():
        assert len(ended[pair]) >= count, (pair, ended[pair])
        assert not ended[pair][-1].startswith("Error"), (pair, ended[pair])
    assert redis.llen(keys.queue(migration_queue(settings.name))) == 0
    assert redis.llen(keys.inflight(settings.name)) == 0
    assert_no_staging(sb, settings)
    assert_never_two_at_once(redis, settings)
    assert wait_left(unit.every, timeout=10) == []
