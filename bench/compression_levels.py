"""What rsync's compression costs and saves on an OS-like image, per algorithm and level.

What zstd's level (rsync's default for it is 3; migratio uses 1) costs against lz4: one
file, rsync's sender and receiver both on this machine and joined by a pipe instead of
SSH (``-e`` runs a shell that drops the host name), so that what is measured is rsync and its
compressor alone -- no cipher, no network. For each setting it prints the wall time, the CPU
seconds of both rsync processes (user + system, per GiB of file), and the bytes rsync says it
sent over the file's size.

    .venv/bin/python bench/compression_levels.py [--data-gib 1] [--runs 1]

The image is the OS-like one of ``bench/network.py`` (an ext4 made with ``mkfs.ext4 -d`` from
this machine's ``/usr``, in a 4 GiB-virtual qcow2). Run it with nothing else running: the
times are CPU times on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sandbox.images import make_os_like_qcow2  # noqa: E402

GiB = 1024**3
_SENT = re.compile(r"Total bytes sent:\s*([\d,]+)")
#: (label, rsync options): what migratio may run, and rsync's defaults for comparison
SETTINGS = [
    ("none", []),
    ("lz4", ["--compress", "--compress-choice=lz4"]),
    ("zstd, rsync's default level (3)", ["--compress", "--compress-choice=zstd"]),
    ("zstd level 1 (migratio)", ["--compress", "--compress-choice=zstd", "--compress-level=1"]),
    ("zstd level -1", ["--compress", "--compress-choice=zstd", "--compress-level=-1"]),
]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(image: Path, target: Path, shell: Path, options: list[str]) -> tuple[float, float, int]:
    """One copy: wall seconds, CPU seconds of rsync's two processes, bytes sent."""
    target.unlink(missing_ok=True)
    os.sync()
    cpu, begin = children_cpu(), time.perf_counter()
    done = subprocess.run(
        ["rsync", "--whole-file", "--stats", *options, "-e", str(shell), str(image),
         f"here:{target}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    took, used = time.perf_counter() - begin, children_cpu() - cpu
    match = _SENT.search(done.stdout)
    assert match is not None, done.stdout
    assert target.stat().st_size == image.stat().st_size
    return took, used, int(match.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="migratio-bench-levels-") as tmp:
        work = Path(tmp)
        image = make_os_like_qcow2(
            work / "os.qcow2", virtual_size=4 * GiB, data_bytes=int(args.data_gib * GiB)
        )
        shell = work / "no-ssh"
        shell.write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drops the host: rsync on a pipe
        shell.chmod(0o755)
        size = image.stat().st_size
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)
        print(f"OS-like image of {size / 1e6:.0f} MB; medians of {args.runs}\n")
        print("| setting | wall s | CPU s per GiB (both ends) | sent / file |")
        print("|---|---|---|---|")
        for label, options in SETTINGS:
            runs = [run(image, work / "copy", shell, options) for _ in range(args.runs)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs) / (size / GiB)
            sent = statistics.median(r[2] for r in runs) / size
            print(f"| {label} | {wall:.2f} | {cpu:.1f} | {sent:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
