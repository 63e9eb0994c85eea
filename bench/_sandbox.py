"""What the Redis benchmarks share: a two-site sandbox and a Redis server in a temporary dir."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox

from migratio.config import Settings, load_settings


@dataclass(frozen=True)
class BenchSite:
    """The running sandbox and Redis, and site-a's settings pointing at both."""

    work: Path
    server: RedisServer
    sandbox: Sandbox
    config: Path
    settings: Settings


@contextmanager
def sandbox_with_redis(*, own_log_dir: bool = False) -> Iterator[BenchSite]:
    """Start Redis and the sandbox in a temporary directory; remove both afterwards.

    The settings are the sandbox's with ``redis_url`` set (and ``log_dir`` in the temporary
    directory with ``own_log_dir``).
    """
    with tempfile.TemporaryDirectory(prefix="migratio-bench-") as tmp:
        work = Path(tmp)
        with RedisServer(work / "redis") as server, Sandbox(work / "sandbox") as sb:
            config = work / "config.yml"
            yaml = f"\nredis_url: {server.url}\n"
            if own_log_dir:
                yaml += f"log_dir: {work / 'log'}\n"
            config.write_text(sb.config_path.read_text() + yaml)
            yield BenchSite(work, server, sb, config, load_settings(config))
