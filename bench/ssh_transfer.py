"""Why the data path is OpenSSH + rsync, not paramiko: the same file over the same sshd.

Sends one file of incompressible data to the sandbox's sshd (loopback) three ways, in one run
so the ratios compare (this machine's absolute figures move by up to ~35 % between runs):

* ``rsync`` over OpenSSH with migratio's cipher preference (what ``migratio`` runs);
* paramiko's SFTP ``put`` with its defaults (the original design's library);
* paramiko's SFTP ``put`` tuned: a 64 MiB window and 252 KiB writes.

Then it interrupts an rsync half-way and runs it again, to show the resume: the second run
sends only what had not arrived. Usage: ``.venv/bin/python bench/ssh_transfer.py [MiB]``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paramiko  # noqa: E402
from tests.sandbox.ssh_server import SshServer  # noqa: E402

from migratio.config import DEFAULT_CIPHERS  # noqa: E402

MiB = 1024 * 1024
MB = 1e6


def rsync(server: SshServer, source: Path, remote: str, *extra: str) -> subprocess.Popen[str]:
    ssh = " ".join([*server.ssh_argv(), "-o", f"Ciphers={DEFAULT_CIPHERS}"])
    return subprocess.Popen(
        ["rsync", "--partial", "--inplace", "--stats", "-e", ssh, *extra, str(source),
         f"{server.destination}:{remote}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def timed_rsync(server: SshServer, source: Path, remote: str) -> tuple[float, int]:
    started = time.perf_counter()
    proc = rsync(server, source, remote)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"rsync failed: {out}")
    sent = re.search(r"Total bytes sent: ([\d,]+)", out)
    return time.perf_counter() - started, int(sent.group(1).replace(",", "")) if sent else -1


def timed_paramiko(server: SshServer, source: Path, remote: str, *, tuned: bool) -> float:
    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())  # as strict as OpenSSH here
    client.connect(
        "127.0.0.1", port=server.port, username=server.user, key_filename=str(server.client_key),
        allow_agent=False, look_for_keys=False,
    )  # fmt: skip
    try:
        transport = client.get_transport()
        assert transport is not None
        if tuned:
            transport.default_window_size = 64 * MiB
            transport.packetizer.REKEY_BYTES = pow(2, 40)
            transport.packetizer.REKEY_PACKETS = pow(2, 40)
        sftp = paramiko.SFTPClient.from_transport(
            transport, window_size=64 * MiB if tuned else None, max_packet_size=None
        )
        assert sftp is not None
        started = time.perf_counter()
        if tuned:
            with source.open("rb") as local, sftp.open(remote, "wb") as out:
                out.set_pipelined(True)
                while block := local.read(252 * 1024):
                    out.write(block)
        else:
            sftp.put(str(source), remote)
        elapsed = time.perf_counter() - started
        sftp.close()
        return elapsed
    finally:
        client.close()


def main() -> int:
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    with tempfile.TemporaryDirectory(prefix="migratio-bench-ssh-") as tmp:
        work = Path(tmp)
        source = work / "payload"
        with source.open("wb") as out:
            for _ in range(size_mib):
                out.write(os.urandom(MiB))
        size = source.stat().st_size
        with SshServer(work / "ssh") as server:
            remote_dir = server.home / "bench-ssh"
            server.run_as_user(["mkdir", "-p", str(remote_dir)])
            results: list[tuple[str, float]] = []
            for run in range(2):  # the second round shows how much the figures move
                seconds, sent = timed_rsync(server, source, f"{remote_dir}/rsync-{run}")
                results.append(("rsync over OpenSSH (migratio)", seconds))
                results.append(
                    (
                        "paramiko SFTP put, defaults",
                        timed_paramiko(server, source, f"{remote_dir}/pm-{run}", tuned=False),
                    )
                )
                results.append(
                    (
                        "paramiko SFTP, 64 MiB window",
                        timed_paramiko(server, source, f"{remote_dir}/pt-{run}", tuned=True),
                    )
                )
                server.run_as_user(["sh", "-c", f"rm -f {remote_dir}/*"])
            print(f"{size / MiB:.0f} MiB of random data to {server.destination} (loopback)")
            for name, seconds in results:
                print(f"  {name:32} {seconds:6.2f} s  {size / seconds / MB:6.0f} MB/s")
            best = {n: min(s for m, s in results if m == n) for n, _ in results}
            rsync_best = best["rsync over OpenSSH (migratio)"]
            for name, seconds in best.items():
                print(f"  best of 2, {name:32} {seconds / rsync_best:4.2f} x rsync's time")

            # resume: stop an rsync half-way, run it again
            remote = f"{remote_dir}/resume"
            proc = rsync(server, source, remote)
            deadline = time.monotonic() + 120
            part = remote_dir / "resume"
            while time.monotonic() < deadline:
                if part.exists() and part.stat().st_size > size // 2:
                    break
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            proc.wait()
            had = part.stat().st_size if part.exists() else 0
            seconds, sent = timed_rsync(server, source, remote)
            print(
                f"  resume: {had / MiB:.0f} MiB had arrived when rsync was interrupted; "
                f"the next run sent {sent / MiB:.0f} MiB of {size / MiB:.0f} ({seconds:.2f} s)"
            )
            server.run_as_user(["rm", "-rf", str(remote_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
