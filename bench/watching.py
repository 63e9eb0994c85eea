"""Benchmark: what watching a busy site costs — ``migratio status`` and a metrics scrape.

10,000 jobs waiting in Atmosphere's queue (pushed with the real Sidekiq client) and 10,000
queued for the workers (taken in by the service): the time ``migratio status --json`` takes
to read them (it lists 20 per state and counts the rest) and one scrape of the metrics
collector, each the median of ``--rounds`` runs. Both should stay flat as queues grow.

    .venv/bin/python bench/watching.py [--jobs 10000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sandbox import sandbox_with_redis  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402
from tests.sandbox import sidekiq  # noqa: E402

from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, Keys, migration_queue  # noqa: E402
from migratio.metrics import MetricsCollector  # noqa: E402
from migratio.overview import overview  # noqa: E402
from migratio.service import Service  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    with sandbox_with_redis() as site:
        server, settings = site.server, site.settings
        redis = server.client()
        keys = Keys(settings.namespace)
        queue = migration_queue(settings.name)
        push = [str(uuid.uuid4()), "site-b-api"]
        sidekiq.push(server.url, settings.namespace, queue, OPENSTACK_MIGRATOR, push,
                     count=args.jobs)  # fmt: skip
        service = Service(settings, redis)
        while redis.llen(keys.queue(queue)):
            service.run_once()
        sidekiq.push(server.url, settings.namespace, queue, OPENSTACK_MIGRATOR, push,
                     count=args.jobs)  # fmt: skip

        status_times, scrape_times = [], []
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(settings, redis, service))  # type: ignore[arg-type]
        for _ in range(args.rounds):
            started = time.perf_counter()
            snapshot = overview(settings, redis)
            snapshot.to_json()
            status_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            text = generate_latest(registry).decode()
            scrape_times.append(time.perf_counter() - started)
        counts = snapshot.counts
        assert counts["waiting"] == args.jobs and counts["queued"] == args.jobs, counts
        assert f'migratio_jobs{{state="queued"}} {float(args.jobs)}' in text

    print(f"{args.jobs} jobs waiting in Atmosphere's queue + {args.jobs} queued for the workers")
    print(f"migratio status --json (read + render): median "
          f"{statistics.median(status_times) * 1000:.1f} ms over {args.rounds} runs")  # fmt: skip
    print(f"one metrics scrape: median {statistics.median(scrape_times) * 1000:.1f} ms "
          f"over {args.rounds} runs")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
