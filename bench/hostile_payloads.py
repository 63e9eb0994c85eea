"""Benchmark: hostile payloads through a running ``migratio run``, then a valid job.

Pushes ``--count`` payloads of every hostile kind (random bytes, non-UTF-8, deep nesting,
huge numbers, NUL bytes, 64 KiB / 1 MiB / 5 MiB strings, wrong types, ``../`` and shell
metacharacters, unknown sites and classes; see tests/hostile.py) into Atmosphere's queue while
the service runs, then one valid job with the real Sidekiq client, and waits until that job is
migrated (real Glance servers, sshd, rsync). Prints how many were dead-lettered, whether the
service ever restarted, and its memory (RSS at start, peak, at the end).

    .venv/bin/python bench/hostile_payloads.py [--count 1000] [--seed 20261130]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sandbox import sandbox_with_redis  # noqa: E402
from tests.hostile import through_the_service  # noqa: E402
from tests.sandbox.images import make_qcow2  # noqa: E402

MiB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args()

    with sandbox_with_redis(own_log_dir=True) as site:
        sb = site.sandbox
        image = make_qcow2(site.work / "t.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
        image_id = sb.source.upload_image(image, name="bench", disk_format="qcow2")
        figures = through_the_service(
            site.settings, site.server.client(), image_id, "site-b", seed=args.seed,
            count=args.count,
        )  # fmt: skip
        copies = sb.destination.find_by_property("source_uuid", image_id)
    print(f"hostile payloads through `migratio run` (seed {args.seed}):")
    for line in figures.lines():
        print("  " + line)
    active = [c for c in copies if c["status"] == "active"]
    print(f"  the valid job behind them: {len(active)} active copy at the destination")
    ok = (
        figures.dead_lettered == figures.pushed
        and figures.service_restarts == 0
        and len(copies) == len(active) == 1
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
