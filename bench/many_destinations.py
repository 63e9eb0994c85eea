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

Where the time goes (part 1): for each run, each job's phases from worker.log (until its image's
bytes are there — downloaded, or waited for —, until converted, the transfer, the registration
and verification) and the CPU seconds of each party: migratio's workers with their children
(qemu-img, rsync, ssh, lz4), the source Glance (serving the download, and site-c's upload), the
destination Glance (site-b), the sshd side (rsync receiver, remote glance CLI), moto, and the
rest of the machine (other sessions), against the cores' capacity over the run's wall time.

    MIGRATIO_SANDBOX_USER=... .venv/bin/python bench/many_destinations.py \\
        [--data-mib 1024] [--virtual-mib 4096] [--small-mib 8] [--skip-part-one | --skip-part-two]

Targets (issue 12): downloaded 1.0 x the image; one conversion per target format; wall time at
once <= 0.5 x one after another; peak staging <= image + one copy per target format; never
more than 2 running to site-b-api, site-c's jobs start before site-b-api's queue drains.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import resource
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

from migratio.atmosphere.keys import AMAZON_MIGRATOR, OPENSTACK_MIGRATOR, Keys, migration_queue  # noqa: E402
from migratio.config import Settings  # noqa: E402
from migratio.fair_share import DestinationShare  # noqa: E402
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


TICK = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float]]:
    """pid → (parent pid, CPU seconds of it and of its reaped children)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / TICK)
    return table


def _tree_cpu(table: dict[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of ``root`` and every live descendant, each with its reaped children."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


def _machine_busy() -> float:
    """CPU seconds all cores have been busy since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


class CpuUse:
    """CPU seconds used by each party between :meth:`start` and :meth:`stop` (see the module).

    The sandbox's daemons are counted with their descendants (sshd's sessions, uWSGI's workers)
    and what those reaped; migratio's workers (children of this process) once reaped.
    """

    PARTIES = ("migratio workers", "source Glance", "destination Glance", "sshd side", "moto")

    def __init__(self, sb: Sandbox, moto: MotoServer) -> None:
        self.roots = {"source Glance": sb.source.pid, "destination Glance": sb.destination.pid,
                      "sshd side": sb.ssh.pid, "moto": moto.pid}  # fmt: skip
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self._begin: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        table = _process_table()
        sample = {party: _tree_cpu(table, pid) for party, pid in self.roots.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample["migratio workers"] = children.ru_utime + children.ru_stime
        sample["machine"] = _machine_busy()
        sample["wall"] = time.perf_counter()
        return sample

    def start(self) -> None:
        self._begin = self._sample()

    def stop(self) -> None:
        end = self._sample()
        for party, value in end.items():
            self.used[party] = self.used.get(party, 0.0) + value - self._begin[party]
        self.wall += self.used.pop("wall")

    def lines(self) -> list[str]:
        cores = os.cpu_count() or 1
        capacity = cores * self.wall
        ours = sum(self.used[p] for p in self.PARTIES)
        rows = [f"{p} {self.used[p]:.0f}" for p in self.PARTIES]
        rows.append(f"other sessions {max(self.used['machine'] - ours, 0):.0f}")
        return [
            f"CPU s: {'; '.join(rows)}",
            f"busy {self.used['machine']:.0f} of {capacity:.0f} core-s ({cores} cores x "
            f"{self.wall:.1f} s): {100 * self.used['machine'] / capacity:.0f} %",
        ]


#: status lines (and staging lines) that end each phase of a job, in order
PHASES = (
    ("bytes there", r"staging: (?:made|using) \S+\.(?!raw\b|vmdk\b)\w+\b|reading \S+ from the "
     r"file store"),
    ("converted", r"status: (?:Converted|Image converted)"),
    ("transferred", r"status: (?:Transfered|Image transfered)"),
    ("registered", r"status: Registered"),
)  # fmt: skip


def phases(log: str, jobs: dict[str, str]) -> dict[str, list[float]]:
    """Per destination (``jobs``: job id → destination): seconds of each phase, then total."""
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\[job (\S+) image \S+\] (.*)$"
    marks: dict[str, dict[str, float]] = {job: {} for job in jobs}
    for when, job, text in re.findall(stamp, log, re.MULTILINE):
        if job not in marks:
            continue
        h, m, sec = when.split(" ")[1].replace(",", ".").split(":")
        at = int(h) * 3600 + int(m) * 60 + float(sec)
        if text.startswith("status: Migration started"):
            marks[job] = {"started": at}
        for name, pattern in PHASES:
            if name not in marks[job] and re.match(pattern, text):
                marks[job][name] = at
    found = {}
    for job, destination in jobs.items():
        times = [marks[job].get("started", 0.0)]
        for name, _ in PHASES:
            times.append(marks[job].get(name, times[-1]))
        found[destination] = [b - a for a, b in itertools.pairwise(times)]
        found[destination].append(times[-1] - times[0])
    return found


def phase_table(title: str, by_destination: dict[str, list[float]]) -> list[str]:
    names = ["until its bytes are there", "until converted", "transfer", "register + verify",
             "total"]  # fmt: skip
    sites = list(by_destination)
    lines = [f"{title:<28}" + "".join(f"{site:>10}" for site in sites)]
    for n, name in enumerate(names):
        lines.append(f"  {name:<26}" + "".join(f"{by_destination[s][n]:9.1f}s" for s in sites))
    return lines


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

    def push(site: str, job_class: str) -> str:
        [jid] = sidekiq.push(
            settings.redis_url, settings.namespace, queue, job_class, [image_id, site]
        )
        return f"migratio-{jid}"

    # three at once
    at_once_jobs = {push(site, job_class): site for site, job_class in DESTINATIONS}
    Service(settings, redis).run_once()
    at_once_cpu = CpuUse(sb, moto)
    with Peak(settings.staging_dir) as peak:
        started = time.perf_counter()
        at_once_cpu.start()
        workers(settings, 3)
        at_once_cpu.stop()
        at_once = time.perf_counter() - started
    at_once_bytes, at_once_conversions = downloaded(sb, image_id), conversions(settings)

    # one after another, each with an empty cache (each job exports on its own)
    clear_destinations(sb, moto, image_id)
    shutil.rmtree(cache, ignore_errors=True)
    sequential = 0.0
    sequential_jobs = {}
    sequential_cpu = CpuUse(sb, moto)
    for site, job_class in DESTINATIONS:
        shutil.rmtree(cache, ignore_errors=True)
        sequential_jobs[push(site, job_class)] = site
        Service(settings, redis).run_once()
        started = time.perf_counter()
        sequential_cpu.start()
        workers(settings, 1)
        sequential_cpu.stop()
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
    log = (settings.log_dir / "worker.log").read_text()
    print("where the time goes:")
    for line in [
        *phase_table("3 at once (s)", phases(log, at_once_jobs)),
        *(f"  {text}" for text in at_once_cpu.lines()),
        *phase_table("one after another (s)", phases(log, sequential_jobs)),
        *(f"  {text}" for text in sequential_cpu.lines()),
    ]:
        print(f"  {line}")


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
    parser.add_argument("--skip-part-two", action="store_true")
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
            if not args.skip_part_two:
                part_two(args, work, sb, server.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
