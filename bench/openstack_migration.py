"""Benchmark: one OpenStack → OpenStack migration against what the original did.

Migrates a 4 GiB-virtual qcow2 holding 1 GiB of incompressible data between the sandbox's two
real Glance servers over a real sshd on loopback, and in the same run times the original's
way: a bare ``rsync`` of the same file over the same SSH link with default options, then a
bare ``glance image-create --file`` of it on the destination host.

    .venv/bin/python bench/openstack_migration.py [--data-gib 1] [--virtual-gib 4]

Targets (issue 2): migration <= 0.9 x (bare rsync + bare upload); bytes sent <= 1.02 x the
file size; peak RSS of the migrating process <= 150 MB.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._measure import peak_rss_of, verdict  # noqa: E402
from tests.sandbox.images import make_qcow2  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402

GiB = 1024**3
MB = 1e6
_SENT = re.compile(r"Transfered .*\((\d+\.\d) (MiB|GiB) sent[,)]")


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--virtual-gib", type=float, default=4.0)
    parser.add_argument(
        "--sites",
        nargs="+",
        default=["site-b", "site-b-api"],
        help="destinations to migrate to: site-b (REGISTER=ssh) and/or site-b-api (REGISTER=api)",
    )
    args = parser.parse_args()
    runs: dict[str, tuple[float, int, str]] = {}

    with tempfile.TemporaryDirectory(prefix="migratio-bench-") as tmp:
        work = Path(tmp)
        image = make_qcow2(
            work / "bench.qcow2",
            virtual_size=int(args.virtual_gib * GiB),
            data_bytes=int(args.data_gib * GiB),
        )
        size = image.stat().st_size
        with Sandbox(work / "sandbox") as sb:
            image_id = sb.source.upload_image(image, name="bench", disk_format="qcow2")
            ssh = sb.ssh.ssh_argv()  # OpenSSH defaults: chacha20-poly1305
            remote_file = ".bench-bare.qcow2"
            sb.ssh.remove_home_path(remote_file)  # a killed run's copy: a delta transfer

            # the original's way, leg 1: rsync with default options
            bare_rsync = timed(
                ["rsync", "-e", shlex.join(ssh), str(image), f"{sb.ssh.destination}:{remote_file}"]
            )
            # leg 2: the destination's glance CLI uploads the file that arrived
            upload = (
                f". ~/.creds && glance image-create --name bare --disk-format qcow2 "
                f"--container-format bare --file {remote_file}"
            )
            bare_upload = timed([*ssh, sb.ssh.destination, upload])
            sb.destination.delete_all()
            sb.ssh.remove_home_path(remote_file)

            migratio = str(ROOT / ".venv" / "bin" / "migratio")
            for site in args.sites:
                wall, peak, lines = peak_rss_of(
                    [migratio, "migrate", "--config", str(sb.config_path), image_id, site]
                )
                runs[site] = (wall, peak, "\n".join(text for _, text in lines))
                [copy] = sb.destination.find_by_property("source_uuid", image_id)
                assert copy["status"] == "active" and copy["size"] == size
                sb.destination.delete_all()

    bare = bare_rsync + bare_upload
    print(f"image: {size / MB:.0f} MB qcow2, {args.virtual_gib:g} GiB virtual, data incompressible")
    for label, seconds in (
        ("bare rsync (default options)", bare_rsync),
        ("bare upload (glance image-create)", bare_upload),
    ):
        print(f"{label + ':':35}{seconds:7.2f} s  ({size / seconds / MB:.0f} MB/s)")
    print(f"original's way (sum):              {bare:7.2f} s")
    for site, (wall, peak, out) in runs.items():
        ratio = wall / bare
        print(f"-- migratio migrate to {site}:")
        print(f"   wall time:                      {wall:7.2f} s  ({size / wall / MB:.0f} MB/s)")
        ok = verdict(ratio <= 0.9)
        print(f"   ratio migratio / original:      {ratio:7.2f}   (target <= 0.90) {ok}")
        sent_match = _SENT.search(out)
        if sent_match:
            unit = 1024**2 if sent_match.group(2) == "MiB" else GiB
            sent = float(sent_match.group(1)) * unit
            print(
                f"   bytes sent by rsync / file:     {sent / size:7.3f}   (target <= 1.02) "
                f"{verdict(sent / size <= 1.02)}"
            )
        else:
            print("   bytes sent:                     the file once, over HTTP (no rsync)")
        print(
            f"   peak RSS of migratio:           {peak / MB:7.1f} MB (target <= 150) "
            f"{verdict(peak <= 150 * MB)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
