"""Where the destination host's CPU goes during a REGISTER=ssh migration, per process kind.

Runs the two-host sandbox on the unshaped link (issue 11's case 5), uploads an image of
random data to the source, and samples ``/proc/<pid>/stat`` of every process in the
destination's network namespace every 20 ms while it runs:

- one ``migratio migrate`` with ``REGISTER=ssh`` (``--migrations`` of them),
- the ``glance`` CLI alone at the destination, given the same file three ways: ``--file F``,
  ``< F`` (a file as stdin, as the original could), and ``cat F |`` (a pipe, as the helper gives
  it);
- with ``--api``, one ``migratio migrate`` with ``REGISTER=api`` (the Glance API alone).

It prints CPU seconds per GiB of each kind of process (sshd, rsync, the upload helper,
the ``glance`` CLI, uWSGI (Glance), shells), and the wall time.

    MIGRATIO_SANDBOX_USER=migratio-sbNAME .venv/bin/python bench/destination_cpu.py [--api]
        [--both-uploads]

Run it under the heavy lock (``flock -x /tmp/migratio-heavy.lock``): figures taken while
anything else runs are meaningless on two shared cores.
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sandbox.images import make_qcow2  # noqa: E402
from tests.sandbox.network import TwoHostNetwork, network_missing  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402

GiB = 1024**3
TICK = os.sysconf("SC_CLK_TCK")


def kind(pid: str) -> str:  # noqa: PLR0911
    """What the process is, by its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    text = " ".join(words)
    if comm.startswith("sshd") or text.startswith("sshd"):
        return "sshd"
    if "follow_upload" in text:
        return "helper (follow_upload)"
    if "uwsgi" in text:
        return "uwsgi (Glance API)"
    if any(Path(w).name == "glance" for w in words[:3]):
        return "glance CLI"
    if comm == "rsync" or any(Path(w).name == "rsync" for w in words[:4]):
        return "rsync"
    if comm in {"cat", "nice"}:
        return comm
    if comm in {"sh", "bash", "dash"}:
        return "shell"
    return comm


class Sampler:
    """CPU ticks (utime + stime) of every process of the namespace, last seen, every 20 ms."""

    def __init__(self, net: TwoHostNetwork) -> None:
        self.net = net
        self.last: dict[tuple[str, str], tuple[str, int]] = {}
        self.base: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._kinds: dict[tuple[str, str], str] = {}
        #: per process: when it was first and last seen using CPU (perf_counter)
        self.busy: dict[tuple[str, str], list[float]] = {}

    def pids(self) -> list[str]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.net.dst], capture_output=True, text=True, check=False
        ).stdout
        return out.split()

    def sample(self) -> dict[tuple[str, str], int]:
        seen = {}
        for pid in self.pids():
            try:
                raw = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = raw.rsplit(")", 1)[1].split()
            key = (pid, fields[19])  # pid and start time: a pid reused is another process
            seen[key] = int(fields[11]) + int(fields[12])
            if key not in self._kinds:
                self._kinds[key] = kind(pid)
        return seen

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            for key, ticks in self.sample().items():
                before = self.last.get(key, (None, self.base.get(key, 0)))[1]
                if ticks > before:
                    self.busy.setdefault(key, [now, now])[1] = now
                self.last[key] = (self._kinds[key], ticks)
            time.sleep(0.02)

    def timeline(self, begin: float) -> None:
        """Each process that used 0.1 CPU-s or more: when it was busy, and how much."""
        rows = []
        for key, (first, last) in self.busy.items():
            what, ticks = self.last[key]
            used = (ticks - self.base.get(key, 0)) / TICK
            if used >= 0.1:
                rows.append((first - begin, last - begin, used, what))
        for first, last, used, what in sorted(rows):
            print(f"    {first:5.1f}-{last:5.1f} s  {used:5.2f} CPU-s  {what}")

    def __enter__(self) -> Sampler:
        self.base = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for key, ticks in self.sample().items():
            self.last[key] = (self._kinds[key], ticks)

    def by_kind(self) -> dict[str, float]:
        """CPU seconds used while sampling, per kind of process."""
        total: dict[str, float] = collections.defaultdict(float)
        for key, (what, ticks) in self.last.items():
            total[what] += (ticks - self.base.get(key, 0)) / TICK
        return dict(total)


class SourceSampler(threading.Thread):
    """CPU ticks of ``root`` and its descendants (the migrating side), last seen, every 20 ms."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.last: dict[tuple[str, str], tuple[str, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            stats = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        raw = Path(f"/proc/{entry}/stat").read_text()
                    except OSError:
                        continue
                    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
                    stats[entry] = (comm, raw.rsplit(")", 1)[1].split())
            for pid, (comm, fields) in stats.items():
                up, hops = pid, 0
                while up in stats and up != str(self.root) and hops < 12:
                    up, hops = stats[up][1][1], hops + 1
                if up == str(self.root):
                    what = comm
                    if comm == "ssh":
                        try:
                            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                        except OSError:  # it ended meanwhile
                            cmdline = b""
                        what = "ssh master" if b"ControlPersist" in cmdline else "ssh"
                    ticks = int(fields[11]) + int(fields[12])
                    self.last[(pid, fields[19])] = (what, ticks)
            time.sleep(0.02)

    def by_kind(self) -> dict[str, float]:
        total: dict[str, float] = collections.defaultdict(float)
        for what, ticks in self.last.values():
            total[what] += ticks / TICK
        return dict(total)


def show(title: str, seconds: float, cpu: dict[str, float], size: int) -> None:
    gib = size / GiB
    print(f"\n{title}: {seconds:.1f} s wall, destination CPU {sum(cpu.values()) / gib:.1f} s/GiB")
    for what, used in sorted(cpu.items(), key=lambda item: -item[1]):
        if used >= 0.05:
            print(f"  {what:24} {used / gib:5.2f} s/GiB")
    sys.stdout.flush()


def migrate(sb: Sandbox, image_id: str, site: str, size: int) -> None:
    assert sb.network is not None
    os.sync()
    with Sampler(sb.network) as sampler:
        begin = time.perf_counter()
        proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/migratio"), "migrate", "--config", str(sb.config_path),
             image_id, site],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        source = SourceSampler(proc.pid)
        source.start()
        _, stderr = proc.communicate()
        source.stop.set()
        source.join()
        took = time.perf_counter() - begin
        assert proc.returncode == 0, stderr
    print(f"\n  started at {time.strftime('%H:%M:%S')} minus {took:.1f} s; its log:")
    print("\n".join("    " + line[11:140] for line in stderr.splitlines()))
    sampler.timeline(begin)
    print("  the migrating side (descendants of migratio migrate, last seen):")
    for what, used in sorted(source.by_kind().items(), key=lambda item: -item[1]):
        print(f"    {what:24} {used / (size / GiB):5.2f} s/GiB")
    copies = sb.destination.find_by_property("source_uuid", image_id)
    assert [c["status"] for c in copies] == ["active"] and copies[0]["size"] == size, copies
    sb.destination.delete_all()
    show(f"migratio migrate, {site}", took, sampler.by_kind(), size)


def cli_alone(sb: Sandbox, image: Path, size: int) -> None:
    """The glance CLI at the destination, from a file there: --file, < file, cat |."""
    assert sb.network is not None
    ssh = sb.ssh.ssh_argv()
    remote = ".bench-cpu.qcow2"
    subprocess.run(
        ["rsync", "-e", shlex.join(ssh), str(image), f"{sb.ssh.destination}:{remote}"], check=True
    )
    create = "glance image-create --name bare --disk-format qcow2 --container-format bare"
    ways = {
        "glance image-create --file F": f"{create} --file {remote}",
        "glance image-create < F": f"{create} < {remote}",
        "cat F | glance image-create": f"cat {remote} | {create}",
    }
    for title, command in ways.items():
        subprocess.run([*ssh, sb.ssh.destination, f"cat {remote} > /dev/null"], check=True)
        with Sampler(sb.network) as sampler:
            begin = time.perf_counter()
            subprocess.run(
                [*ssh, sb.ssh.destination, f". ~/.creds && {command}"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            took = time.perf_counter() - begin
        sb.destination.delete_all()
        show(title, took, sampler.by_kind(), size)
    sb.ssh.remove_home_path(remote)
    with Sampler(sb.network) as sampler:
        subprocess.run(
            [*ssh, sb.ssh.destination, ". ~/.creds && glance image-list"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    used = sum(sampler.by_kind().values())
    print(f"\none glance image-list: {used:.2f} CPU-s at the destination", flush=True)


def rsync_alone(sb: Sandbox, image: Path, size: int) -> None:
    """rsync alone to the destination, as the original runs it and as migratio does."""
    assert sb.network is not None
    ssh = sb.ssh.ssh_argv()
    gcm = [*ssh, "-c", "aes128-gcm@openssh.com"]
    ours = ["--inplace", "--times", "--info=progress2", "--stats", "--no-human-readable",
            "--timeout=300", "--rsync-path=nice -n 10 rsync"]  # fmt: skip
    ways = {
        "rsync (bare, default cipher)": (ssh, []),
        "rsync (bare, aes128-gcm)": (gcm, []),
        "rsync (migratio's options)": (gcm, ours),
        "rsync (migratio's, xxh128)": (gcm, [*ours, "--checksum-choice=xxh128"]),
        "rsync (migratio's, no checksum)": (gcm, [*ours, "--checksum-choice=none"]),
    }
    remote = ".bench-rsync.qcow2"
    for title, (shell, options) in ways.items():
        os.sync()
        with Sampler(sb.network) as sampler:
            begin = time.perf_counter()
            subprocess.run(
                ["rsync", *options, "-e", shlex.join(shell), str(image),
                 f"{sb.ssh.destination}:{remote}"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            took = time.perf_counter() - begin
        sb.ssh.remove_home_path(remote)
        show(title, took, sampler.by_kind(), size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--migrations", type=int, default=1)
    parser.add_argument("--api", action="store_true", help="also one REGISTER=api migration")
    parser.add_argument("--no-cli", action="store_true", help="skip the glance CLI alone")
    parser.add_argument("--no-ssh", action="store_true", help="no REGISTER=ssh migration")
    parser.add_argument("--rsync", action="store_true", help="also rsync alone, several ways")
    parser.add_argument(
        "--both-uploads",
        action="store_true",
        help="each REGISTER=ssh migration once with REMOTE_UPLOAD=auto (the helper's own PUT) "
        "and once with REMOTE_UPLOAD=cli (the helper feeds glance image-create)",
    )
    args = parser.parse_args()
    missing = network_missing()
    if missing:
        raise SystemExit(f"bench/destination_cpu.py needs the two-host sandbox: {missing}")
    with tempfile.TemporaryDirectory(prefix="migratio-bench-cpu-") as tmp:
        work = Path(tmp)
        image = make_qcow2(
            work / "random.qcow2", virtual_size=4 * GiB, data_bytes=int(args.data_gib * GiB)
        )
        size = image.stat().st_size
        with Sandbox(work / "sandbox", two_hosts=True) as sb:
            image_id = sb.source.upload_image(image, name="bench-cpu", disk_format="qcow2")
            if args.rsync:
                rsync_alone(sb, image, size)
            cli_conf = sb.sites_dir / "site-b-cli.conf"
            cli_conf.write_text(sb.site_conf.read_text() + "export REMOTE_UPLOAD=cli\n")
            for _ in range(0 if args.no_ssh else args.migrations):
                print("REGISTER=ssh, REMOTE_UPLOAD=auto")
                migrate(sb, image_id, "site-b", size)
                if args.both_uploads:
                    print("REGISTER=ssh, REMOTE_UPLOAD=cli")
                    migrate(sb, image_id, "site-b-cli", size)
            if args.api:
                migrate(sb, image_id, "site-b-api", size)
            if not args.no_cli:
                cli_alone(sb, image, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
