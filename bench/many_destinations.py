"""Benchmark: one image to three destinations at once (the staging cache), and MAX_PARALLEL.

Part 1. One qcow2 (4 GiB virtual, 1 GiB of incompressible data by default), the source's file
store not readable (so it comes from the Glance API), pushed by the real Sidekiq client to three
destinations: site-b (ssh, DISK_FORMAT=raw), site-c (a Glance API, DISK_FORMAT=raw: the
source's own Glance, the sandbox's third Glance) and aws-eu (moto, EBS: a raw disk), run by 3
real RQ workers at once. Then the same three jobs one after another, the cache emptied before
each (what every job did on its own before the cache). Printed: bytes the source Glance sent
(its uWSGI log) x the image size, qemu-img conversions run, wall times, peak staging use.

Part 2. 8 jobs to site-b-api (MAX_PARALLEL=2) and 2 to site-c with workers: 4 under
``migratio run``: the running set to site-b-api is sampled every 0.1 s (the slots in Redis and,
independently, the "Migration started" .. end intervals in worker.log).

    MIGRATIO_SANDBOX_USER=... .venv/bin/python bench/many_destinations.py \\
        [--data-mib 1024] [--virtual-mib 4096] [--small-mib 8]

Targets (issue 12): downloaded 1.0 x the image; one conversion per target format; wall time at
once <= 0.5 x one after another; peak staging <= image + one copy per target format; never
more than 2 running to site-b-api, site-c's jobs start before site-b-api's queue drains.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._measure import verdict  # noqa: E402
from redis import Redis  # noqa: E402
from tests.sandbox import sidekiq  # noqa: E402
from tests.sandbox.images import make_qcow2, make_raw  # noqa: E402
from tests.sandbox.moto_server import MotoServer  # noqa: E402
from tests.sandbox.redis_server import RedisServer  # noqa: E402
from tests.sandbox.site import Sandbox, api_site_conf  # noqa: E402
from tests.support import max_parallel_settings, settings_for, worker_argv  # noqa: E402

from migratio.config import Settings  # noqa: E402
from migratio.fair_share import DestinationShare  # noqa: E402
from migratio.keys import AMAZON_MIGRATOR, OPENSTACK_MIGRATOR, Keys, migration_queue  # noqa: E402
from migratio.service import Service  # noqa: E402
from migratio.staging import disk_usage  # noqa: E402

MiB = 1024**2
DESTINATIONS = (("site-b", OPENSTACK_MIGRATOR), ("site-c", OPENSTACK_MIGRATOR),
                ("aws-eu", AMAZON_MIGRATOR))  # fmt: skip


def downloaded(sb: Sandbox, image_id: str) -> int:
    pattern = re.compile(rf"GET /v2/images/{image_id}/file => generated (\d+) bytes")
    return sum(int(n) for n in pattern.findall(sb.source.uwsgi_log_path.read_text()))


def conversions(settings: Settings) -> int:
    log = (settings.log_dir / "worker.log").read_text()
    return len(re.findall(r"staging: made \S+\.(?:raw|vmdk) ", log))


class Peak:
    """Samples the disk use of a directory tree every 0.1 s."""

    def __init__(self, path: Path) -> None:
        self.path, self.peak, self._stop = path, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, disk_usage(self.path))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def workers(settings: Settings, count: int) -> None:
    procs = [subprocess.Popen(worker_argv(settings)) for _ in range(count)]
    for proc in procs:
        if proc.wait(7200) != 0:
            raise SystemExit("a worker failed; see worker.log")


def clear_destinations(sb: Sandbox, moto: MotoServer, image_id: str) -> None:
    sb.destination.delete_all()
    glance = sb.source.client()
    for copy in list(glance.images.list()):
        if copy["id"] != image_id:
            glance.images.delete(copy["id"])
    moto.reset()


def part_one(args: argparse.Namespace, work: Path, sb: Sandbox, moto: MotoServer,
             redis_url: str) -> None:  # fmt: skip
    creds = work / "creds"
    creds.write_text(sb.creds_path.read_text().replace(str(sb.source.images_dir), "/nonexistent"))
    creds.chmod(0o600)
    settings = settings_for(
        sb,
        work,
        yaml=f"redis_url: {redis_url}\ncredentials_file: {creds}\nworkers: 3\n",
        **{
            "site-b": sb.site_conf.read_text() + "export DISK_FORMAT=raw\n",
            "site-c": api_site_conf(sb.source.endpoint, "DISK_FORMAT=raw"),
            "aws-eu": moto.site_conf(),
        },
    )
    image = make_qcow2(work / "bench.qcow2", virtual_size=args.virtual_mib * MiB,
                       data_bytes=args.data_mib * MiB)  # fmt: skip
    size = image.stat().st_size
    image_id = sb.source.upload_image(image, name="bench", disk_format="qcow2")
    queue = migration_queue(settings.name)
    redis = Redis.from_url(redis_url)
    cache = settings.staging_dir / "cache"

    def push(site: str, job_class: str) -> None:
        sidekiq.push(settings.redis_url, settings.namespace, queue, job_class, [image_id, site])

    # three at once
    for site, job_class in DESTINATIONS:
        push(site, job_class)
    Service(settings, redis).run_once()
    with Peak(settings.staging_dir) as peak:
        started = time.perf_counter()
        workers(settings, 3)
        at_once = time.perf_counter() - started
    at_once_bytes, at_once_conversions = downloaded(sb, image_id), conversions(settings)

    # one after another, each with an empty cache (each job exports on its own)
    clear_destinations(sb, moto, image_id)
    shutil.rmtree(cache, ignore_errors=True)
    sequential = 0.0
    for site, job_class in DESTINATIONS:
        shutil.rmtree(cache, ignore_errors=True)
        push(site, job_class)
        Service(settings, redis).run_once()
        started = time.perf_counter()
        workers(settings, 1)
        sequential += time.perf_counter() - started
    seq_bytes = downloaded(sb, image_id) - at_once_bytes
    seq_conversions = conversions(settings) - at_once_conversions

    raw_data = args.data_mib * MiB  # the raw file is sparse: it stores the image's data
    bound = size + raw_data
    print(f"image: {args.virtual_mib} MiB virtual qcow2, {args.data_mib} MiB of data, "
          f"{size / MiB:.0f} MiB file; source file store not readable")  # fmt: skip
    print(f"downloaded from the source Glance, 3 at once:      {at_once_bytes / size:5.2f} x "
          f"the image (target 1.0) {verdict(at_once_bytes == size)}")  # fmt: skip
    print(f"downloaded, one after another with no cache:       {seq_bytes / size:5.2f} x")
    print(f"qemu-img conversions, 3 at once (one format, raw): {at_once_conversions:5d} "
          f"(target 1) {verdict(at_once_conversions == 1)}")  # fmt: skip
    print(f"qemu-img conversions, one after another, no cache: {seq_conversions:5d}")
    ratio = at_once / sequential
    print(f"wall time 3 at once: {at_once:7.1f} s; one after another: {sequential:7.1f} s; "
          f"ratio {ratio:.2f} (target <= 0.5) {verdict(ratio <= 0.5)}")  # fmt: skip
    print(f"peak staging use (3 at once): {peak.peak / MiB:7.0f} MiB; image + one raw copy = "
          f"{bound / MiB:.0f} MiB {verdict(peak.peak <= bound * 1.05)}")  # fmt: skip


def from_log(log: str, crowded: list[str]) -> tuple[int, dict[str, float]]:
    """The most migrations to the crowded site at once, and each image's first start (s)."""
    stamp = r"(\d\d:\d\d:\d\d,\d{3}) "
    spans: dict[str, list[float]] = {}
    ends: list[tuple[float, int]] = []
    first: dict[str, float] = {}
    for when, image, what in re.findall(
        stamp + r".*\[job \S+ image (\S+)\] status: "
        r"(Migration started|Registered|Requested image was uploaded|Error)",
        log,
    ):
        h, m, s = when.replace(",", ".").split(":")
        at = int(h) * 3600 + int(m) * 60 + float(s)
        if what == "Migration started":
            spans.setdefault(image, []).append(at)
            first.setdefault(image, at)
            if image in crowded:
                ends.append((at, 1))
        elif image in crowded and spans.get(image):
            ends.append((at, -1))
    running = peak_log = 0
    for _, change in sorted(ends):
        running += change
        peak_log = max(peak_log, running)
    return peak_log, first


def part_two(args: argparse.Namespace, work: Path, sb: Sandbox, redis_url: str) -> None:
    work = work / "fair"
    work.mkdir()
    settings = max_parallel_settings(sb, work, redis_url)
    redis = Redis.from_url(redis_url)
    images = []
    for i in range(10):
        raw = make_raw(work / f"i{i}.raw", virtual_size=2 * args.small_mib * MiB,
                       data_bytes=args.small_mib * MiB, seed=100 + i)  # fmt: skip
        images.append(sb.source.upload_image(raw, name=f"fair{i}", disk_format="raw"))
    queue = migration_queue(settings.name)
    for n, image_id in enumerate(images):
        site = "site-b-api" if n < 8 else "site-c"
        sidekiq.push(settings.redis_url, settings.namespace, queue, OPENSTACK_MIGRATOR,
                     [image_id, site])  # fmt: skip
    env = {**os.environ, "MIGRATIO_CONFIG": str(settings.config_path)}
    share = DestinationShare(redis, Keys(settings.namespace), settings.name, "site-b-api", 2)
    samples: list[int] = []
    started = time.perf_counter()
    service = subprocess.Popen([sys.executable, "-m", "migratio", "run"], env=env)
    try:
        while True:
            samples.append(len(share.running()))
            done = [
                i
                for i in sb.destination.client().images.list()
                if i["status"] == "active" and i.get("source_uuid") in images[:8]
            ]
            if len(done) == 8:
                break
            if time.perf_counter() - started > 1800:
                raise SystemExit("part 2 did not finish in 30 minutes")
            time.sleep(0.1)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(120)
    wall = time.perf_counter() - started
    peak_log, first = from_log((settings.log_dir / "worker.log").read_text(), images[:8])
    last_b = max(first[i] for i in images[:8])
    c_starts = [first[i] - min(first.values()) for i in images[8:]]
    print(f"MAX_PARALLEL=2, workers 4, 8 jobs to site-b-api + 2 to site-c ({args.small_mib} MiB "
          f"images): {wall:.0f} s")  # fmt: skip
    print(f"  running to site-b-api, sampled {len(samples)} times: max {max(samples)} "
          f"(slots in Redis), max {peak_log} (worker.log intervals) "
          f"{verdict(max(samples) <= 2 and peak_log <= 2)}")  # fmt: skip
    print(f"  site-c's jobs started {', '.join(f'{s:.1f}' for s in c_starts)} s after the first; "
          f"site-b-api's last started {last_b - min(first.values()):.1f} s after it "
          f"{verdict(max(c_starts) < last_b - min(first.values()))}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--virtual-mib", type=int, default=4096)
    parser.add_argument("--small-mib", type=int, default=8)
    parser.add_argument("--skip-part-one", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="migratio-bench-") as tmp:
        work = Path(tmp)
        with (
            RedisServer(work / "redis") as server,
            Sandbox(work / "sandbox") as sb,
            MotoServer(work / "moto") as moto,
        ):
            if not args.skip_part_one:
                part_one(args, work, sb, moto, server.url)
            part_two(args, work, sb, server.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
