"""Benchmark: migrations across a shaped link between two hosts, against the original's way.

The sandbox's destination host (sshd, ``glance`` CLI, Glance API) runs in its own network
namespace; the link to it is shaped with ``tc tbf`` (rate) and the sandbox's delay line (round
trip). For each case, in one run, it times the original's way — a bare default ``rsync`` of
the image over the same link, then a bare ``glance image-create --file`` on the destination
host — and ``migratio migrate`` with ``REGISTER=ssh`` and ``REGISTER=api``; medians of
``--runs`` runs, with the spread.

    sudo .venv/bin/python bench/network.py [--runs 3] [--data-gib 1] [--cases 1 2 3 4 5]

Cases (issue 11) and targets for migratio (REGISTER=ssh) / original's way:

    1  1 Gbit/s, 20 ms RTT   OS-like image   <= 0.60
    2  1 Gbit/s, 20 ms RTT   random data     <= 0.70
    3  200 Mbit/s, 40 ms RTT OS-like image   <= 0.40
    4  1 Gbit/s, 40 ms RTT   OS-like image   <= 0.40
    5  unshaped veth         random data     <= 0.90

plus: time from the start of ``migratio migrate`` to the first 256 KiB on the link <= 1.5 s,
and on the unshaped link (case 5, random data) ``COMPRESS=auto`` within 5 % of ``COMPRESS=none``.
With ``--bwlimit RATE`` (e.g. ``40M``) both register ways are timed again with ``BWLIMIT=RATE``,
and their average rate on the wire (between 5 % and 95 % of its bytes) is printed against the
cap (target: within 5 %).
"OS-like": a 4 GiB-virtual qcow2 of an ext4 filesystem (``mkfs.ext4 -d``) holding ~1 GiB of
this machine's /usr; "random": the same size of random data. It also prints the bytes on the
wire / file size, the link utilisation of the transfer (between 5 % and 95 % of its bytes),
the compression ``auto`` chose, the peak RSS of migratio and CPU seconds per GiB on each side
(source: migratio and its rsync/ssh children; destination: every process of its namespace),
and the way to the first byte: when migratio had started (Python, its imports, the
configuration, the lease), when its SSH master was up (or first needed, if it was up before),
when the source image was found and when the transfer started, from the log's time stamps.
migratio's modules are compiled beforehand (``__pycache__``, removed afterwards), as an
installed package has them (``--compile-each-run``: at every start, as a checkout does under
PYTHONDONTWRITEBYTECODE).
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._measure import PeakRss, verdict  # noqa: E402
from tests.sandbox.images import make_os_like_qcow2, make_qcow2  # noqa: E402
from tests.sandbox.network import TwoHostNetwork, network_missing  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402

from migratio.config import parse_rate  # noqa: E402

GiB = 1024**3
MB = 1e6
FIRST_BYTES = 256 << 10
TICK = os.sysconf("SC_CLK_TCK")
_DECISION = re.compile(r"compression ([\w, ]+)\)")
#: the log lines that mark the way to the first byte (REGISTER=ssh), in their order
_MILESTONES = (
    ("started", "status: Migration started"),
    ("login", "ssh master connection to"),
    ("source", "from the file store"),
    ("transfer", "migratio.openstack.migration: compression "),
    # and after it: the transfer's end, and the copy registered (the upload's end)
    ("transferred", "status: Transfered "),
    ("registered", "status: Registered "),
)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

CASES = {
    1: ("1 Gbit/s, 20 ms RTT", 1000.0, 20.0, "os", 0.60),
    2: ("1 Gbit/s, 20 ms RTT", 1000.0, 20.0, "random", 0.70),
    3: ("200 Mbit/s, 40 ms RTT", 200.0, 40.0, "os", 0.40),
    4: ("1 Gbit/s, 40 ms RTT", 1000.0, 40.0, "os", 0.40),
    5: ("unshaped veth", None, 0.0, "random", 0.90),
}


class LinkMeter:
    """Samples the bytes sent to the destination host every 20 ms while a leg runs."""

    def __init__(self, net: TwoHostNetwork) -> None:
        self.net = net
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.net.tx_bytes()))
            time.sleep(0.02)

    def __enter__(self) -> LinkMeter:
        self.begin = time.perf_counter()
        self.base = self.net.tx_bytes()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self.net.tx_bytes()))

    @property
    def wire(self) -> int:
        return self.samples[-1][1] - self.base

    def when(self, count: float) -> float:
        """Seconds from the start until ``count`` bytes had crossed."""
        return next(t for t, b in self.samples if b - self.base >= count) - self.begin

    def rate(self) -> float:
        """Bytes/s between 5 % and 95 % of the bytes on the wire."""
        t0, t1 = self.when(0.05 * self.wire), self.when(0.95 * self.wire)
        return 0.9 * self.wire / max(t1 - t0, 1e-6)


def namespace_cpu(net: TwoHostNetwork) -> float:
    """CPU seconds of every process in the destination namespace (and of its reaped children)."""
    out = subprocess.run(
        ["ip", "netns", "pids", net.dst], capture_output=True, text=True, check=False
    ).stdout
    total = 0
    for pid in out.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICK


@dataclass
class Run:
    seconds: float
    first_byte: float = 0.0
    wire: float = 0.0  # bytes on the wire / file size
    utilisation: float = 0.0
    #: bytes per second on the wire between 5 % and 95 % of them (LinkMeter.rate)
    wire_rate: float = 0.0
    decision: str = ""
    #: COMPRESS=auto's trial of lz4 against zstd, as logged
    trial: str = ""
    peak_rss: float = 0.0
    cpu_src: float = 0.0  # CPU seconds per GiB of file
    cpu_dst: float = 0.0
    legs: tuple[float, float] = (0.0, 0.0)
    #: seconds from the start of ``migratio migrate`` to each of _MILESTONES, as logged
    milestones: dict[str, float] = field(default_factory=dict)


@dataclass
class Case:
    number: int
    original: list[Run] = field(default_factory=list)
    ssh: list[Run] = field(default_factory=list)
    api: list[Run] = field(default_factory=list)
    #: REGISTER=ssh with COMPRESS=none (case 5: what ``auto`` must stay within 5 % of)
    uncompressed: list[Run] = field(default_factory=list)
    #: REGISTER=ssh with COMPRESS fixed (--compress): what auto's choice costs against them
    fixed: dict[str, list[Run]] = field(default_factory=dict)
    #: with --bwlimit: each register way with BWLIMIT set
    capped: dict[str, list[Run]] = field(default_factory=dict)
    link: tuple[float, float] = (0.0, 0.0)


@contextmanager
def installed_bytecode(enabled: bool) -> Iterator[None]:
    """migratio's modules compiled beforehand (``__pycache__`` beside them, removed
    afterwards), as an installed package has them. Under PYTHONDONTWRITEBYTECODE (as the
    development shells here set) every start would otherwise compile the ~30 modules a
    migration imports from source: 0.2-0.3 s before the first byte that a deployment
    does not spend. (Python reads bytecode that is there even when it may not write it.)"""
    source = ROOT / "src" / "migratio"
    before = set(source.rglob("__pycache__"))
    if enabled and os.environ.get("PYTHONDONTWRITEBYTECODE"):
        compileall.compile_dir(source, quiet=1)
    try:
        yield
    finally:
        for made in set(source.rglob("__pycache__")) - before:
            shutil.rmtree(made, ignore_errors=True)


def run_migratio(sb: Sandbox, image_id: str, site: str, size: int, rate: float | None) -> Run:
    assert sb.network is not None
    migratio = str(ROOT / ".venv" / "bin" / "migratio")
    os.sync()  # the previous leg's dirty pages are written back before, not during, this one
    cpu_before = namespace_cpu(sb.network)
    log_file = sb.log_dir / "migratio.log"
    logged = log_file.stat().st_size if log_file.exists() else 0
    with LinkMeter(sb.network) as meter:
        begin = time.perf_counter()
        wall = time.time()
        proc = subprocess.Popen(
            [migratio, "migrate", "--config", str(sb.config_path), image_id, site],
            stdout=subprocess.PIPE,
            text=True,
        )
        peak = PeakRss(proc, interval=0.05)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, code, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(code)
        seconds = time.perf_counter() - begin
        peak.join()
    if proc.returncode != 0:
        raise SystemExit(f"migratio migrate {site} failed:\n{out}")
    copies = sb.destination.find_by_property("source_uuid", image_id)
    assert [c["status"] for c in copies] == ["active"] and copies[0]["size"] == size, copies
    cpu_dst = namespace_cpu(sb.network) - cpu_before
    sb.destination.delete_all()
    decision = _DECISION.search(out)
    with log_file.open("rb") as log:
        log.seek(logged)
        lines = log.read().decode().splitlines()
    # the trial, and its fall back to lz4 if zstd's later pieces were slower
    trial = [
        x.split("compression: ")[-1]
        for x in lines
        if "compression: lz4 reached" in x or "compression: zstd's last" in x
    ]
    milestones = {}
    for name, marker in _MILESTONES:
        stamp = next((_STAMP.match(x) for x in lines if marker in x), None)
        if stamp is not None:
            when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            milestones[name] = when.timestamp() - wall
    link = (rate or 0) * 1e6 / 8
    return Run(
        seconds=seconds,
        first_byte=meter.when(FIRST_BYTES),
        wire=meter.wire / size,
        utilisation=meter.rate() / link if link else 0.0,
        wire_rate=meter.rate(),
        decision=decision.group(1) if decision else "-",
        trial="; then ".join(trial),
        peak_rss=peak.bytes / MB,
        cpu_src=(usage.ru_utime + usage.ru_stime) / (size / GiB),
        cpu_dst=cpu_dst / (size / GiB),
        milestones=milestones,
    )


def run_original(sb: Sandbox, image: Path, rate: float | None) -> Run:
    assert sb.network is not None
    ssh = sb.ssh.ssh_argv()
    remote_file = ".bench-bare.qcow2"
    size = image.stat().st_size
    sb.ssh.remove_home_path(remote_file)  # a killed run's copy would make this a delta transfer
    os.sync()
    cpu_before = namespace_cpu(sb.network)
    children = os.times()
    with LinkMeter(sb.network) as meter:
        begin = time.perf_counter()
        subprocess.run(
            ["rsync", "-e", shlex.join(ssh), str(image), f"{sb.ssh.destination}:{remote_file}"],
            check=True,
        )
        leg1 = time.perf_counter() - begin
    upload = (
        ". ~/.creds && glance image-create --name bare --disk-format qcow2 "
        f"--container-format bare --file {remote_file}"
    )
    begin = time.perf_counter()
    subprocess.run([*ssh, sb.ssh.destination, upload], check=True, stdout=subprocess.DEVNULL)
    leg2 = time.perf_counter() - begin
    after = os.times()
    cpu_src = after.children_user + after.children_system
    cpu_src -= children.children_user + children.children_system
    cpu_dst = namespace_cpu(sb.network) - cpu_before
    sb.destination.delete_all()
    sb.ssh.remove_home_path(remote_file)
    link = (rate or 0) * 1e6 / 8
    return Run(
        seconds=leg1 + leg2,
        legs=(leg1, leg2),
        first_byte=meter.when(FIRST_BYTES),
        wire=meter.wire / size,
        utilisation=meter.rate() / link if link else 0.0,
        cpu_src=cpu_src / (size / GiB),
        cpu_dst=cpu_dst / (size / GiB),
    )


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median (min-max)``, or the one value."""
    median = fmt.format(statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def breakdown(runs: list[Run]) -> str:
    """Medians (s after the start) of the logged milestones and of the first 256 KiB."""
    labels = {
        "started": "Python, imports, config, lease",
        "login": "SSH master up (or first needed)",
        "source": "source image found",
        "transfer": "transfer starts",
    }
    parts = []
    for name, label in labels.items():
        values = [r.milestones[name] for r in runs if name in r.milestones]
        if values:
            parts.append(f"{label} {statistics.median(values):.2f}")
    parts.append(f"first 256 KiB {statistics.median(r.first_byte for r in runs):.2f}")
    return "; ".join(parts)


def report(cases: list[Case], sizes: dict[str, int], cap: tuple[str, int] | None = None) -> None:
    print(flush=True)
    print(
        "| link | image | original (rsync + upload) | migratio ssh | ratio | migratio api | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        label, _, _, kind, target = CASES[case.number]
        original = [r.seconds for r in case.original]
        ssh = [r.seconds for r in case.ssh]
        api = [r.seconds for r in case.api]
        bare = statistics.median(original)
        ssh_ratio = [s / o for s, o in zip(ssh, original, strict=True)]
        api_ratio = [a / o for a, o in zip(api, original, strict=True)]
        legs = (
            f"{statistics.median(r.legs[0] for r in case.original):.1f} + "
            f"{statistics.median(r.legs[1] for r in case.original):.1f}"
        )
        name = "OS-like" if kind == "os" else "random"
        print(
            f"| {label} | {name} | {spread(original)} s (≈{legs}) | {spread(ssh)} s | "
            f"{spread(ssh_ratio, '{:.2f}')} | {spread(api)} s | {spread(api_ratio, '{:.2f}')} |"
        )
        del bare
    print()
    for case in cases:
        label, _, _, kind, target = CASES[case.number]
        size = sizes[kind]
        rate, rtt = case.link
        ssh_median = statistics.median(
            s.seconds / o.seconds for s, o in zip(case.ssh, case.original, strict=True)
        )
        print(f"case {case.number}: {label}, {kind} image of {size / MB:.0f} MB")
        print(f"  link measured (one TCP stream): {rate / MB:.1f} MB/s, {rtt * 1000:.1f} ms RTT")
        print(
            f"  migratio ssh / original: {ssh_median:.2f} (target <= {target:.2f}) "
            f"{verdict(ssh_median <= target)}"
        )
        if case.uncompressed:
            ratio = statistics.median(
                a.seconds / n.seconds for a, n in zip(case.ssh, case.uncompressed, strict=True)
            )
            print(
                f"  COMPRESS=auto / COMPRESS=none (ssh): {ratio:.3f} "
                f"(none: {spread([r.seconds for r in case.uncompressed])} s; target <= 1.05) "
                f"{verdict(ratio <= 1.05)}"
            )
        for algorithm, runs in case.fixed.items():
            ratio = statistics.median(
                a.seconds / f.seconds for a, f in zip(case.ssh, runs, strict=True)
            )
            print(
                f"  COMPRESS=auto / COMPRESS={algorithm} (ssh): {ratio:.2f} ({algorithm}: "
                f"{spread([r.seconds for r in runs])} s, wire/file "
                f"{spread([r.wire for r in runs], '{:.3f}')}, CPU s/GiB source "
                f"{spread([r.cpu_src for r in runs])})"
            )
        for way, runs in case.capped.items():
            assert cap is not None
            text, limit = cap
            share = statistics.median(r.wire_rate / limit for r in runs)
            print(
                f"  BWLIMIT={text} ({limit / MB:.1f} MB/s), {way}: "
                f"{spread([r.wire_rate / MB for r in runs])} MB/s on the wire, "
                f"{share:.3f} of the cap (target within 5 %) {verdict(abs(share - 1) <= 0.05)}; "
                f"{spread([r.seconds for r in runs])} s"
            )
        for run in case.ssh:
            if run.trial:
                print(f"  auto's trial: {run.trial}")
        for name, runs in (("ssh", case.ssh), ("api", case.api)):
            print(f"  {name:8} on the way to the first byte: {breakdown(runs)}")
        for name, runs in (("original", case.original), ("ssh", case.ssh), ("api", case.api)):
            first = [r.first_byte for r in runs]
            ok = "" if name == "original" else f" {verdict(statistics.median(first) <= 1.5)}"
            print(
                f"  {name:8} first 256 KiB on the link after {spread(first, '{:.2f}')} s{ok}; "
                f"wire/file {spread([r.wire for r in runs], '{:.3f}')}; "
                f"link use {spread([r.utilisation for r in runs], '{:.2f}')}; "
                f"CPU s/GiB source {spread([r.cpu_src for r in runs])}, "
                f"destination {spread([r.cpu_dst for r in runs])}"
                + (
                    f"; peak RSS {spread([r.peak_rss for r in runs], '{:.0f}')} MB"
                    if name != "original"
                    else ""
                )
                + (f"; compression {','.join(r.decision for r in runs)}" if name == "ssh" else ""),
                flush=True,
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--virtual-gib", type=float, default=4.0)
    parser.add_argument("--cases", type=int, nargs="+", default=sorted(CASES))
    parser.add_argument(
        "--compress",
        nargs="*",
        default=[],
        choices=["zstd", "lz4", "none"],
        help="also time REGISTER=ssh with COMPRESS fixed to each of these",
    )
    parser.add_argument(
        "--bwlimit",
        metavar="RATE",
        help="also time both register ways with BWLIMIT=RATE (e.g. 40M) and print the average "
        "rate on the wire against it (target: within 5 %%)",
    )
    parser.add_argument(
        "--remote-upload",
        choices=["auto", "cli"],
        default="auto",
        help="REMOTE_UPLOAD of the ssh site: auto (the helper PUTs to Glance's API) or cli "
        "(the helper feeds glance image-create, as before 2 December)",
    )
    parser.add_argument(
        "--compile-each-run",
        action="store_true",
        help="under PYTHONDONTWRITEBYTECODE, let migratio compile its modules at every start "
        "(default: once, beforehand, as an installed package has them)",
    )
    return parser.parse_args()


def write_sites(sb: Sandbox, args: argparse.Namespace) -> dict[str, str]:
    """The site files the runs use beside site-b and site-b-api; the ``--bwlimit`` ones' ids."""
    if args.remote_upload != "auto":
        conf = sb.site_conf.read_text()
        sb.site_conf.write_text(conf + f"export REMOTE_UPLOAD={args.remote_upload}\n")
    none_conf = sb.sites_dir / "site-b-none.conf"
    none_conf.write_text(sb.site_conf.read_text() + "export COMPRESS=none\n")
    for algorithm in args.compress:
        fixed_conf = sb.sites_dir / f"site-b-{algorithm}.conf"
        fixed_conf.write_text(sb.site_conf.read_text() + f"export COMPRESS={algorithm}\n")
    capped_sites = {}
    if args.bwlimit:
        for way, base in (("ssh", sb.site_conf), ("api", sb.site_api_conf)):
            capped_conf = sb.sites_dir / f"site-b-{way}-capped.conf"
            capped_conf.write_text(base.read_text() + f"export BWLIMIT={args.bwlimit}\n")
            capped_conf.chmod(0o600)
            capped_sites[way] = capped_conf.stem
    return capped_sites


def main() -> int:
    args = parse_args()
    cap = (args.bwlimit, parse_rate(args.bwlimit, "--bwlimit")) if args.bwlimit else None
    # SIGTERM unwinds like ^C: the sandbox's namespaces, servers and files go with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    missing = network_missing()
    if missing:
        raise SystemExit(f"bench/network.py needs the two-host sandbox: {missing}")

    each = args.compile_each_run and bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    print(f"migratio's bytecode: {'compiled at every start' if each else 'as installed'}")
    print(f"REMOTE_UPLOAD={args.remote_upload}")
    with (
        installed_bytecode(not args.compile_each_run),
        tempfile.TemporaryDirectory(prefix="migratio-bench-net-") as tmp,
    ):
        work = Path(tmp)
        data, virtual = int(args.data_gib * GiB), int(args.virtual_gib * GiB)
        kinds = {CASES[n][3] for n in args.cases}
        images: dict[str, Path] = {}
        if "os" in kinds:
            images["os"] = make_os_like_qcow2(
                work / "os.qcow2", virtual_size=virtual, data_bytes=data
            )
        if "random" in kinds:
            images["random"] = make_qcow2(
                work / "random.qcow2", virtual_size=virtual, data_bytes=data
            )
        sizes = {kind: path.stat().st_size for kind, path in images.items()}
        cases = []
        with Sandbox(work / "sandbox", two_hosts=True) as sb:
            assert sb.network is not None
            ids = {
                kind: sb.source.upload_image(path, name=f"bench-{kind}", disk_format="qcow2")
                for kind, path in images.items()
            }
            capped_sites = write_sites(sb, args)
            for number in args.cases:
                label, rate, rtt, kind, _ = CASES[number]
                sb.shape(rate, rtt)
                case = Case(number, link=sb.network.measure(seconds=3))
                for link_file in sb.staging_dir.glob(".link-*.json"):
                    link_file.unlink()  # each case starts as a first migration over that link
                for run in range(args.runs):
                    print(f"case {number} ({label}, {kind}) run {run + 1}", flush=True)
                    case.original.append(run_original(sb, images[kind], rate))
                    # on the unshaped link COMPRESS=none is timed too (does auto cost anything?),
                    # right before auto on every other run, so that neither always goes first
                    none_first = rate is None and run % 2 == 1
                    if none_first:
                        case.uncompressed.append(
                            run_migratio(sb, ids[kind], "site-b-none", sizes[kind], rate)
                        )
                    case.ssh.append(run_migratio(sb, ids[kind], "site-b", sizes[kind], rate))
                    case.api.append(run_migratio(sb, ids[kind], "site-b-api", sizes[kind], rate))
                    for algorithm in args.compress:
                        case.fixed.setdefault(algorithm, []).append(
                            run_migratio(sb, ids[kind], f"site-b-{algorithm}", sizes[kind], rate)
                        )
                    for way, capped_site in capped_sites.items():
                        case.capped.setdefault(way, []).append(
                            run_migratio(sb, ids[kind], capped_site, sizes[kind], rate)
                        )
                    if rate is None and not none_first:
                        case.uncompressed.append(
                            run_migratio(sb, ids[kind], "site-b-none", sizes[kind], rate)
                        )
                    original, ssh, api = case.original[-1], case.ssh[-1], case.api[-1]
                    print(
                        f"  original {original.seconds:.1f} s; ssh {ssh.seconds:.1f} s "
                        f"({ssh.seconds / original.seconds:.2f}, compression {ssh.decision}; "
                        f"transfer ended {ssh.milestones.get('transferred', 0):.1f} s, "
                        f"registered {ssh.milestones.get('registered', 0):.1f} s); "
                        f"api {api.seconds:.1f} s ({api.seconds / original.seconds:.2f})",
                        flush=True,
                    )
                cases.append(case)
                report([case], sizes, cap)  # as it goes: a long run shows what it has
            sb.shape()
    print("\n== all cases")
    report(cases, sizes, cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
