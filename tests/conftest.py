"""Shared fixtures: one real two-site sandbox (Glance x2 + sshd) per test session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # make `tests.sandbox` importable under any import mode
    sys.path.insert(0, str(ROOT))

from tests.sandbox.glance_server import glance_venv_missing  # noqa: E402
from tests.sandbox.moto_server import MotoServer  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The running sandbox, shared by the whole session (skips if the Glance venv is missing)."""
    missing = glance_venv_missing()
    if missing:
        pytest.skip(f"sandbox unavailable: {missing}")
    with Sandbox(tmp_path_factory.mktemp("sandbox")) as sb:
        yield sb


@pytest.fixture
def clean_sandbox(sandbox: Sandbox) -> Sandbox:
    """The sandbox with no images on either Glance and empty staging areas."""
    sandbox.reset()
    return sandbox


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
