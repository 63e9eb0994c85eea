"""The sandbox's second host: a destination in its own network namespace, and its shaped link."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.sandbox.network import RANGE, TwoHostNetwork, leftovers, network_missing
from tests.sandbox.ports import port_open
from tests.sandbox.site import Sandbox

ROOT = Path(__file__).resolve().parents[1]

needs_network = pytest.mark.skipif(
    network_missing() is not None and os.environ.get("CI") != "true",
    reason=f"no second host here: {network_missing()}",
)


@needs_network
def test_destination_runs_on_another_host(sandbox: Sandbox) -> None:
    assert sandbox.network is not None
    address = ipaddress.ip_address(sandbox.ssh.address)
    assert address in RANGE and sandbox.destination.address == str(address)
    assert sandbox.ssh.destination.endswith(f"@{address}")
    # its sshd and Glance listen only inside the destination's namespace
    assert port_open(sandbox.ssh.port, str(address))
    assert not port_open(sandbox.ssh.port, "127.0.0.1")
    assert not port_open(sandbox.destination.port, "127.0.0.1")
    interfaces = sandbox.ssh.run_as_user("cat /proc/net/dev", check=True).stdout
    assert "eth0" in interfaces and sandbox.network.host_if not in interfaces


_KILLED_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.sandbox.network import TwoHostNetwork
net = TwoHostNetwork(Path(sys.argv[2])).start()
net.shape(100, 10)
print(net.pid, flush=True)
time.sleep(600)
"""


@needs_network
def test_a_killed_run_is_cleaned_up_at_the_next_start(tmp_path: Path) -> None:
    run = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(ROOT), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    pid = int(run.stdout.readline())
    left = leftovers(pid)
    assert len(left) == 3  # two namespaces and the host's veth
    qdiscs = subprocess.run(
        ["tc", "-n", f"migratio-sb-{pid}n0-mid", "qdisc", "show"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert "tbf" in qdiscs
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert leftovers(pid) == left  # a SIGKILL leaves everything behind...

    with TwoHostNetwork(tmp_path / "next") as following:  # ...the next start removes it
        assert leftovers(pid) == []
        assert following.host_if in leftovers(os.getpid())
    assert following.host_if not in leftovers(os.getpid())


@needs_network
def test_a_network_removes_all_it_made(tmp_path: Path) -> None:
    before = set(leftovers(os.getpid()))
    with TwoHostNetwork(tmp_path) as net:
        net.shape(50, 20)
        made = set(leftovers(os.getpid())) - before
        assert made == {net.mid, net.dst, net.host_if}
    assert set(leftovers(os.getpid())) == before


@needs_network
@pytest.mark.slow
def test_the_shaped_link_delivers_its_rate_and_round_trip(tmp_path: Path) -> None:
    with TwoHostNetwork(tmp_path) as net:
        net.shape(200, 40)
        rate, rtt = net.measure(seconds=4)
        assert 0.039 <= rtt <= 0.060, rtt
        assert 0.80 * 25e6 <= rate <= 1.02 * 25e6, rate
        net.shape(None, 0)
        _, rtt = net.measure(seconds=0.5)
        assert rtt < 0.01
