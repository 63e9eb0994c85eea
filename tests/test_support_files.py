"""The systemd user units and the logrotate example that operators install."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parent.parent / "support" / "systemd").glob("*.service"))


def test_there_are_units() -> None:
    assert [u.name for u in UNITS] == ["migratio-worker.service", "migratio.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    home = tmp_path / "home"
    binary = home / "migratio" / ".venv" / "bin" / "migratio"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    done = subprocess.run(
        ["systemd-analyze", "--user", "verify", *map(str, UNITS)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_restart_on_failure_and_stop_warm(unit: Path) -> None:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(unit)
    service = parser["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "78"  # not every 10 s for a typo
    assert service["KillMode"] == "mixed"  # SIGTERM to migratio only: a warm stop
    assert service["TimeoutStopSec"].endswith("min") and int(service["TimeoutStopSec"][:-3]) >= 15
    command = service["ExecStart"].split()
    assert command[0] == "%h/migratio/.venv/bin/migratio"  # no shell wrapper
    assert command[1] in {"run", "worker"}
