"""Shared fixtures: one real two-site sandbox (Glance x2 + sshd) per test session.

No silent skips: a test skips only when a service it really needs is missing, and under
``CI=true`` such a skip fails the run (the bootstrap is broken, not the machine).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from redis import Redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # make `tests.sandbox` importable under any import mode
    sys.path.insert(0, str(ROOT))

from tests.sandbox import sidekiq  # noqa: E402
from tests.sandbox.glance_server import glance_venv_missing  # noqa: E402
from tests.sandbox.moto_server import MotoServer  # noqa: E402
from tests.sandbox.redis_server import RedisServer  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402

# property-based tests: no example database in the checkout; under CI the same examples every
# run (a red CI blocks everyone), elsewhere new ones each run; a failure prints how to replay it
hypothesis_settings.register_profile(
    "migratio", database=None, print_blob=True, derandomize=os.environ.get("CI") == "true"
)
hypothesis_settings.load_profile("migratio")

#: every skip for a missing sandbox service starts with this
SANDBOX_MISSING = "sandbox unavailable: "


def need_service(missing: str | None) -> None:
    """Skip the test when a sandbox service is missing (``missing`` says why); fail under CI."""
    if missing:
        pytest.skip(SANDBOX_MISSING + missing)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under ``CI=true``, a skip because a sandbox service is missing is a failure."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("CI") == "true":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if SANDBOX_MISSING in reason:
            report.outcome = "failed"
            report.longrepr = f"{reason}\nCI=true: a missing sandbox service fails the run"


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The running sandbox, shared by the whole session (skips if the Glance venv is missing)."""
    need_service(glance_venv_missing())
    with Sandbox(tmp_path_factory.mktemp("sandbox")) as sb:
        yield sb


@pytest.fixture
def clean_sandbox(sandbox: Sandbox) -> Sandbox:
    """The sandbox with no images on either Glance and empty staging areas."""
    sandbox.reset()
    return sandbox


@pytest.fixture(scope="module")
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """A throw-away redis-server for one test module; in a module marked ``persistent_redis``
    it saves to disk, as production runs it."""
    persistent = request.node.get_closest_marker("persistent_redis") is not None
    with RedisServer(tmp_path_factory.mktemp("redis"), persistent=persistent) as server:
        yield server


@pytest.fixture
def redis(redis_server: RedisServer) -> Redis:
    """A client of the module's Redis, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture
def atmosphere(
    tmp_path: Path, redis_server: RedisServer, redis: Redis
) -> Iterator[sidekiq.FeedbackServer]:
    """A real Sidekiq server running Atmosphere's status worker on the module's Redis."""
    with sidekiq.FeedbackServer(tmp_path / "sidekiq", redis_server.url, "atmosphere") as server:
        yield server


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto in server mode (EC2, EBS direct APIs, S3) on loopback, for the whole session."""
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    """The moto server with no snapshots, AMIs, buckets or tags."""
    moto_server.reset()
    return moto_server
