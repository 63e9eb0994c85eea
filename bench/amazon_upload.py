"""Benchmark: one OpenStack → Amazon migration (EBS direct APIs) into moto on loopback.

Migrates a 4 GiB-virtual qcow2 holding 1 GiB of incompressible data from the sandbox's source
Glance to an Amazon site served by moto in server mode, with ``migratio migrate``, and
compares what reached the snapshot with the image's own non-zero 512 KiB blocks (counted
here independently, by reading the whole raw disk) and with its virtual size (what the
original uploaded).

    .venv/bin/python bench/amazon_upload.py [--data-gib 1] [--virtual-gib 4] [--concurrency 8]

Targets (issue 4): bytes uploaded <= 1.05 x the non-zero blocks; peak RSS <= 150 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._measure import MB, peak_rss_of, verdict  # noqa: E402
from tests.sandbox.images import make_qcow2  # noqa: E402
from tests.sandbox.moto_server import MotoServer  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402

GiB = 1024**3
BLOCK = 512 * 1024


def nonzero_blocks_of(qcow2: Path, work: Path) -> int:
    """The image's 512 KiB blocks holding a non-zero byte: every byte of the raw disk read."""
    raw = work / "count.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)],
                   check=True)  # fmt: skip
    zero = bytes(BLOCK)
    count = 0
    with raw.open("rb") as disk:
        while block := disk.read(BLOCK):
            count += block != zero[: len(block)]
    raw.unlink()
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--virtual-gib", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    virtual = int(args.virtual_gib * GiB)

    with tempfile.TemporaryDirectory(prefix="migratio-bench-") as tmp:
        work = Path(tmp)
        image = make_qcow2(
            work / "bench.qcow2", virtual_size=virtual, data_bytes=int(args.data_gib * GiB)
        )
        expected = nonzero_blocks_of(image, work)
        with Sandbox(work / "sandbox") as sb, MotoServer(work / "moto") as moto:
            (sb.sites_dir / "aws.conf").write_text(
                moto.site_conf(UPLOAD_CONCURRENCY=str(args.concurrency))
            )
            image_id = sb.source.upload_image(image, name="bench", disk_format="qcow2")
            migratio = str(ROOT / ".venv" / "bin" / "migratio")
            wall, peak, lines = peak_rss_of(
                [migratio, "migrate", "--config", str(sb.config_path), image_id, "aws"]
            )
            ec2, ebs = moto.client("ec2"), moto.client("ebs")
            [snapshot] = ec2.describe_snapshots(
                OwnerIds=["self"], Filters=[{"Name": "tag:source_uuid", "Values": [image_id]}]
            )["Snapshots"]
            stored = 0
            pages = {"SnapshotId": snapshot["SnapshotId"]}
            while True:
                answer = ebs.list_snapshot_blocks(**pages)
                stored += len(answer["Blocks"])
                if not answer.get("NextToken"):
                    break
                pages["NextToken"] = answer["NextToken"]

    def at(prefix: str) -> float:
        return next(t for t, text in lines if text.startswith(prefix))

    upload_seconds = at("Image transfered") - at("Image converted")
    uploaded = stored * BLOCK
    ratio = uploaded / (expected * BLOCK)
    print(f"image: {args.virtual_gib:g} GiB virtual qcow2, {args.data_gib:g} GiB of data")
    data_gib = expected * BLOCK / GiB
    print(f"non-zero 512 KiB blocks of the image:   {expected:8d} ({data_gib:.3f} GiB)")
    print(f"blocks uploaded to the snapshot:        {stored:8d} ({uploaded / GiB:.3f} GiB)")
    print(f"uploaded / non-zero blocks:             {ratio:8.3f}  (target <= 1.05) "
          f"{verdict(ratio <= 1.05)}")  # fmt: skip
    print(f"uploaded / virtual size (the original): {uploaded / virtual:8.3f}  "
          f"({virtual / GiB:.0f} GiB uploaded by the original)")  # fmt: skip
    rate, speed = stored / upload_seconds, uploaded / upload_seconds / MB
    print(f"upload phase:                           {upload_seconds:8.2f} s  "
          f"({rate:.0f} blocks/s, {speed:.0f} MB/s)")  # fmt: skip
    print(f"whole migration (convert, upload, AMI): {wall:8.2f} s")
    print(f"peak RSS of migratio:                   {peak / MB:8.1f} MB (target <= 150) "
          f"{verdict(peak <= 150 * MB)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
