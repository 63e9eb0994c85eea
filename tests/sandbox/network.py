"""A second host for the sandbox: the destination in its own network namespace.

Topology (every name carries this process's pid and a counter, so that two runs on one
machine, or two networks in one run, never collide)::

    this host (root namespace)        middle namespace "...-mid"        destination "...-dst"
    msb<pid>n<k> 198.18.x.1/30 <-veth-> wan0 =[bridge|delay line]= wan1 <-veth-> eth0 198.18.x.2

The addresses come from the benchmarking range 198.18.0.0/15 and exist only on this pair:
nothing is routed anywhere else.  Unshaped, ``wan0`` and ``wan1`` are bridged.  :meth:`shape` puts
``tc tbf`` (the rate) on both of the middle namespace's egresses and replaces the bridge by a
delay line (``delayline.c``, compiled here with gcc: this kernel has no netem) that holds every
frame for half the round trip in each direction.  The endpoints have an MTU of 65000 and no
segmentation or checksum offloads, so every frame the delay line sees is a whole, checksummed
frame (and a Gbit/s is only ~2,000 frames a second).

Deleting the two namespaces removes the veths, qdiscs and bridge with them; their processes
(sshd, uWSGI, the delay line) are ended first.  What a killed run left behind is found by name
(its pid no longer runs) and removed by :func:`remove_stale` at the next start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from ._process import Service, spawn, stop_process

PREFIX = "migratio-sb-"
RANGE = ipaddress.IPv4Network("198.18.0.0/15")
MTU = 65000
_NS = re.compile(rf"^{re.escape(PREFIX)}(\d+)n(\d+)-(mid|dst)$")
_HOST_IF = re.compile(r"^msb(\d+)n(\d+)$")
_count = itertools.count()
_SOURCE = Path(__file__).with_name("delayline.c")


class NetworkError(RuntimeError):
    """The namespaces or the link could not be set up."""


def network_missing() -> str | None:
    """Why this machine cannot build the two-host network, or None when it can."""
    if os.geteuid() != 0:
        return "the two-host network needs root (network namespaces)"
    for tool in ("ip", "tc", "ethtool", "gcc"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: run scripts/bootstrap"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _our_namespaces() -> list[tuple[str, int]]:
    out = _ip("netns", "list", check=False).stdout
    found = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS.match(name)
        if match:
            found.append((name, int(match.group(1))))
    return found


def _delete_namespace(name: str) -> None:
    """End every process inside ``name`` (by pid), then delete it with its veths and qdiscs."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)
        if not pids:
            break
    _ip("netns", "delete", name, check=False)


def remove_stale() -> list[str]:
    """Remove namespaces and host veths of sandbox runs whose process is gone; name them."""
    removed = []
    for name, pid in _our_namespaces():
        if not _alive(pid):
            _delete_namespace(name)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        match = _HOST_IF.match(ifname)
        if match and not _alive(int(match.group(1))):
            _ip("link", "delete", ifname, check=False)
            removed.append(ifname)
    return removed


def leftovers(pid: int | None = None) -> list[str]:
    """Our namespaces and host veths still present (of run ``pid``, or of any run)."""
    names = [n for n, p in _our_namespaces() if pid is None or p == pid]
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        match = _HOST_IF.match(ifname)
        if match and (pid is None or int(match.group(1)) == pid):
            names.append(ifname)
    return names


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    used = set()
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        for word in line.split():
            if "/" in word:
                try:
                    net = ipaddress.ip_interface(word).network
                except ValueError:
                    continue
                if net.overlaps(RANGE):
                    used.add(net.network_address)
    subnets = list(RANGE.subnets(new_prefix=30))
    for i in range(len(subnets)):
        net = subnets[(seed + i) % len(subnets)]
        if not any(u in net for u in used):
            return net
    raise NetworkError("no free /30 left in 198.18.0.0/15")


class TwoHostNetwork(Service):
    """The destination host's namespace and the link to it (see the module's docstring)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.pid = os.getpid()
        number = next(_count)
        self.mid = f"{PREFIX}{self.pid}n{number}-mid"
        self.dst = f"{PREFIX}{self.pid}n{number}-dst"
        self.host_if = f"msb{self.pid}n{number}"
        self.host_address = ""
        self.address = ""  # the destination host's address
        self.rate_bit: int | None = None
        self.rtt_ms = 0.0
        self._delayline: subprocess.Popen[bytes] | None = None
        self._started = False

    def start(self) -> TwoHostNetwork:
        missing = network_missing()
        if missing:
            raise NetworkError(missing)
        remove_stale()
        self._started = True
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> None:
        net = _free_subnet(self.pid)
        hosts = list(net.hosts())
        self.host_address, self.address = str(hosts[0]), str(hosts[1])
        _ip("netns", "add", self.mid)
        _ip("netns", "add", self.dst)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", "wan0", "netns", self.mid)
        _ip("-n", self.dst, "link", "add", "eth0", "type", "veth", "peer", "name", "wan1",
            "netns", self.mid)  # fmt: skip
        _ip("-n", self.mid, "link", "add", "name", "bridge0", "type", "bridge")
        for ns, ifname in ((None, self.host_if), (self.mid, "wan0"), (self.mid, "wan1"),
                           (self.dst, "eth0")):  # fmt: skip
            prefix = ["-n", ns] if ns else []
            _ip(*prefix, "link", "set", ifname, "mtu", str(MTU))
            # whole, checksummed frames only: the delay line copies them as they are
            exec_prefix = ["ip", "netns", "exec", ns] if ns else []
            _run([*exec_prefix, "ethtool", "-K", ifname, "tx", "off", "tso", "off",
                  "gso", "off", "gro", "off"], check=False)  # fmt: skip
        _ip("-n", self.mid, "link", "set", "bridge0", "mtu", str(MTU))
        for ns in (self.mid, self.dst):
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                 check=False)  # fmt: skip
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
        _ip("-n", self.dst, "addr", "add", f"{self.address}/30", "dev", "eth0")
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.dst, "link", "set", "eth0", "up")
        for ifname in ("wan0", "wan1", "bridge0"):
            _ip("-n", self.mid, "link", "set", ifname, "up")
        for ifname in ("wan0", "wan1"):
            _ip("-n", self.mid, "link", "set", ifname, "promisc", "on")
        self._bridge(True)

    def _bridge(self, on: bool) -> None:
        for ifname in ("wan0", "wan1"):
            if on:
                _ip("-n", self.mid, "link", "set", ifname, "master", "bridge0")
            else:
                _ip("-n", self.mid, "link", "set", ifname, "nomaster")

    def stop(self) -> None:
        """Remove both namespaces (and with them the veths, bridge and qdiscs)."""
        stop_process(self._delayline)
        self._delayline = None
        if not self._started:
            return
        for ns in (self.dst, self.mid):
            _delete_namespace(ns)
        _ip("link", "delete", self.host_if, check=False)
        self._started = False

    # -- running things on the destination host -----------------------------------------

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the destination host's namespace."""
        return ["ip", "netns", "exec", self.dst, *argv]

    # -- the link ----------------------------------------------------------------------------

    def shape(self, rate_mbit: float | None = None, rtt_ms: float = 0.0) -> None:
        """Limit the link to ``rate_mbit`` (both ways) with a round trip of ``rtt_ms``.

        ``shape()`` with no arguments makes it an unshaped veth again.
        """
        stop_process(self._delayline)
        self._delayline = None
        for ifname in ("wan0", "wan1"):
            _run(["tc", "-n", self.mid, "qdisc", "del", "dev", ifname, "root"], check=False)
        self.rate_bit = int(rate_mbit * 1e6) if rate_mbit else None
        self.rtt_ms = rtt_ms
        rate_bytes = (self.rate_bit or 0) / 8
        if self.rate_bit:
            burst = max(int(rate_bytes / 1000), 2 * MTU + 1000)  # 1 ms of the rate
            for ifname in ("wan0", "wan1"):
                _run(["tc", "-n", self.mid, "qdisc", "add", "dev", ifname, "root", "tbf",
                      "rate", f"{self.rate_bit}bit", "burst", str(burst),
                      "limit", str(max(int(rate_bytes * 0.005), 4 << 20))])  # fmt: skip
        if rtt_ms <= 0:
            self._bridge(True)
            return
        self._bridge(False)
        binary = self._compile()
        one_way_us = int(rtt_ms * 500)
        if self.rate_bit:  # the frames in flight on the line plus one round trip of buffer
            queue = int(rate_bytes * rtt_ms / 2000 + max(rate_bytes * rtt_ms / 1000, 1 << 20))
        else:
            queue = 256 << 20
        argv = [str(binary), "wan0", "wan1", str(one_way_us), str(queue)]
        self._delayline = spawn(
            ["ip", "netns", "exec", self.mid, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=(self.workdir / "delayline.log").open("ab"),
        )
        assert self._delayline.stdout is not None
        if self._delayline.stdout.readline().strip() != b"ready":
            raise NetworkError(f"the delay line did not start: see {self.workdir}/delayline.log")

    def _compile(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = self.workdir / "delayline"
        if not binary.exists() or binary.stat().st_mtime < _SOURCE.stat().st_mtime:
            _run(["gcc", "-O2", "-pthread", "-Wall", "-o", str(binary), str(_SOURCE)])
        return binary

    @contextlib.contextmanager
    def dropped(self) -> Iterator[None]:
        """Every packet between the two hosts silently dropped, until the block ends.

        The worst way a host can be unreachable: no RST, no ICMP, no failed ARP (both ends
        keep each other's address as a permanent neighbour). The middle namespace's bridge
        lets go of its two ports, so frames reach it and go nowhere; the link stays up.
        Only an unshaped link (no delay line) can be cut this way.
        """
        if self._delayline is not None:
            raise NetworkError("dropped() needs an unshaped link")
        host_mac = Path(f"/sys/class/net/{self.host_if}/address").read_text().strip()
        dst_mac = _run(["ip", "netns", "exec", self.dst, "cat", "/sys/class/net/eth0/address"])
        _ip("neigh", "replace", self.address, "lladdr", dst_mac.stdout.strip(), "dev",
            self.host_if, "nud", "permanent")  # fmt: skip
        _ip("-n", self.dst, "neigh", "replace", self.host_address, "lladdr", host_mac, "dev",
            "eth0", "nud", "permanent")  # fmt: skip
        self._bridge(False)
        try:
            yield
        finally:
            self._bridge(True)
            _ip("neigh", "del", self.address, "dev", self.host_if, check=False)
            _ip("-n", self.dst, "neigh", "del", self.host_address, "dev", "eth0", check=False)

    def tx_bytes(self) -> int:
        """Bytes this host has sent to the destination host so far."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/tx_bytes").read_text())

    def describe(self) -> str:
        """e.g. ``1000 Mbit/s, 20 ms RTT`` or ``unshaped veth``."""
        if not self.rate_bit and not self.rtt_ms:
            return "unshaped veth"
        rate = f"{self.rate_bit / 1e6:g} Mbit/s" if self.rate_bit else "unlimited rate"
        return f"{rate}, {self.rtt_ms:g} ms RTT"

    # -- measuring the link --------------------------------------------------------------

    def measure(self, seconds: float = 3.0) -> tuple[float, float]:
        """(bytes/s of one TCP stream to the destination host, median connect round trip s)."""
        import socket  # noqa: PLC0415
        import statistics  # noqa: PLC0415
        import sys  # noqa: PLC0415

        sink = subprocess.Popen(
            self.exec_argv([sys.executable, "-c", _SINK, self.address]),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert sink.stdout is not None
            port = int(sink.stdout.readline())
            rtts = []
            for _ in range(5):
                begin = time.monotonic()
                with socket.create_connection((self.address, port), timeout=10) as probe:
                    rtts.append(time.monotonic() - begin)
                    probe.shutdown(socket.SHUT_WR)
                    probe.recv(64)
            block = bytes(1 << 20)
            with socket.create_connection((self.address, port), timeout=30) as stream:
                begin = time.monotonic()
                while time.monotonic() - begin < seconds:
                    stream.sendall(block)
                stream.shutdown(socket.SHUT_WR)
                received = int(stream.recv(64))
                elapsed = time.monotonic() - begin
            return received / elapsed, statistics.median(rtts)
        finally:
            sink.kill()
            sink.wait()


# counts what arrives on each connection and answers with the count
_SINK = r"""
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen(8)
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    total = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        total += len(data)
    conn.sendall(str(total).encode())
    conn.close()
"""
