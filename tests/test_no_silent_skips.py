"""No silent skips: with the sandbox's Glance missing, Redis-only tests still run, tests that
need Glance skip, and under CI=true those skips fail the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELECTED = [
    "tests/test_daemon.py::test_legacy_payload_shapes_are_accepted",  # needs only Redis
    "tests/test_daemon.py::test_operator_commands_enqueue_status_retry",  # needs Glance
]


def run_without_glance(tmp_path: Path, *, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["MIGRATIO_GLANCE_VENV"] = str(tmp_path / "no-such-venv")
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q",
         f"--basetemp={tmp_path / 'inner'}", *SELECTED],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_without_glance_redis_tests_run_and_glance_tests_skip(tmp_path: Path) -> None:
    done = run_without_glance(tmp_path, ci=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed, 1 skipped" in done.stdout
    assert "PASSED tests/test_daemon.py::test_legacy_payload_shapes_are_accepted" in done.stdout
    assert "sandbox unavailable:" in done.stdout and "no-such-venv" in done.stdout


def test_under_ci_a_missing_sandbox_service_fails_the_run(tmp_path: Path) -> None:
    done = run_without_glance(tmp_path, ci=True)
    assert done.returncode != 0
    assert "PASSED tests/test_daemon.py::test_legacy_payload_shapes_are_accepted" in done.stdout
    assert "CI=true: a missing sandbox service fails the run" in done.stdout
    assert " skipped" not in done.stdout.splitlines()[-1]
