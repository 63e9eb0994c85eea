"""Helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tests.sandbox import sidekiq
from tests.sandbox.site import Sandbox, api_site_conf

from migratio.adapters.glance_cli import follow_upload_source
from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, migration_queue
from migratio.config import Settings, load_settings


def settings_for(
    sandbox: Sandbox, tmp_path: Path, *, yaml: str = "", **extra_sites: str
) -> Settings:
    """The sandbox's settings with private staging/log dirs, extra YAML and extra site files."""
    sites = tmp_path / "sites"
    sites.mkdir(exist_ok=True)
    for conf in sandbox.sites_dir.glob("*.conf"):
        shutil.copy(conf, sites / conf.name)
    for name, text in extra_sites.items():
        (sites / f"{name}.conf").write_text(text)
    config = tmp_path / "config.yml"
    config.write_text(
        sandbox.config_path.read_text()
        + f"\nsites_dir: {sites}\nstaging_dir: {tmp_path / 'staging'}\n"
        + f"log_dir: {tmp_path / 'log'}\n"
        + yaml
    )
    return load_settings(config)


def max_parallel_settings(sandbox: Sandbox, tmp_path: Path, redis_url: str) -> Settings:
    """Four workers and two destinations through the Glance API: site-b-api with
    ``MAX_PARALLEL=2`` and site-c (the source's own Glance), retried within seconds."""
    return settings_for(
        sandbox,
        tmp_path,
        yaml=f"redis_url: {redis_url}\nworkers: 4\nretry_delays: [1, 1, 1, 1, 1, 1]\n",
        **{
            "site-b-api": sandbox.site_api_conf.read_text() + "export MAX_PARALLEL=2\n",
            "site-c": api_site_conf(sandbox.source.endpoint),
        },
    )


class Lines(list[str]):
    """A status sink that keeps the lines."""

    def __call__(self, text: str) -> None:
        self.append(text)


def no_work_left(staging_dir: Path) -> bool:
    """Nothing in staging but complete cache entries (no work dir, no half-made entry).

    Dot files (the link history of :mod:`migratio.openstack.compression`) do not count.
    """
    others = [p.name for p in staging_dir.iterdir() if p.name != "cache" and p.name[0] != "."]
    partial = list((staging_dir / "cache").glob("*.partial"))
    return others == [] and partial == []


def redis_only_settings(
    tmp_path: Path, redis_url: str, *, namespace: str = "atmosphere", yaml: str = ""
) -> Settings:
    """Settings for site ``site-a`` that need only Redis: no Glance, no sshd, no moto.

    Destinations ``site-b`` (ssh), ``site-b-api`` (api) and ``aws-eu`` exist as site files, so
    the intake accepts jobs for them; nothing listens where they point (port 9 of loopback), so
    these settings are for tests of the intake and the service, never of a migration.
    """
    sites = tmp_path / "sites"
    sites.mkdir(exist_ok=True)
    (sites / "site-b.conf").write_text(
        "export EXTERNAL_USER=nobody\nexport EXTERNAL_HOST=127.0.0.1\n"
    )
    (sites / "site-b-api.conf").write_text(
        "export REGISTER=api\nexport OS_AUTH_TOKEN=t\nexport OS_IMAGE_URL=http://127.0.0.1:9\n"
    )
    (sites / "aws-eu.conf").write_text(
        "export AWS_REGION=eu-west-1\nexport EC2_URL=http://127.0.0.1:9\n"
        "export AWS_ACCESS_KEY=k\nexport AWS_SECRET_KEY=s\n"
    )
    creds = tmp_path / "creds"
    creds.write_text("export OS_AUTH_TOKEN=t\nexport OS_IMAGE_URL=http://127.0.0.1:9\n")
    config = tmp_path / "config.yml"
    config.write_text(
        f"name: site-a\nredis_url: {redis_url}\nnamespace: {namespace}\n"
        f"credentials_file: {creds}\nsites_dir: {sites}\n"
        f"staging_dir: {tmp_path / 'staging'}\nlog_dir: {tmp_path / 'log'}\n" + yaml
    )
    return load_settings(config)


def push(settings: Settings, args: list[str], job_class: str = OPENSTACK_MIGRATOR) -> str:
    """Push one job as Atmosphere does (the real Sidekiq client); return its jid."""
    [jid] = sidekiq.push(
        settings.redis_url, settings.namespace, migration_queue(settings.name), job_class, args
    )
    return jid


def worker_argv(settings: Settings) -> list[str]:
    """``migratio worker --burst``: a real RQ worker (a forked work-horse per job) until the
    queue is empty."""
    return [sys.executable, "-m", "migratio", "worker", "--burst", "--config",
            str(settings.config_path)]  # fmt: skip


def start_service(settings: Settings) -> subprocess.Popen[bytes]:
    """``migratio run`` for ``settings``, as systemd starts it."""
    env = {**os.environ, "MIGRATIO_CONFIG": str(settings.config_path)}
    return subprocess.Popen([sys.executable, "-m", "migratio", "run"], env=env)


def children_of() -> dict[int, list[int]]:
    """Every process's children, by parent pid (from /proc)."""
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            found.setdefault(ppid, []).append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    children = children_of()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for_part(sb: Sandbox, image_id: str, size: int, timeout: float = 120) -> None:
    """Wait until the transfer to site-b has written ``size`` bytes to the destination's
    staging (the ``.part`` file or its pieces)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staging = sb.remote_staging
        parts = list(staging.glob(f"{image_id}-*.part*")) if staging.exists() else []
        written = 0
        for part in parts:
            with contextlib.suppress(OSError):
                written += part.stat().st_blocks * 512  # pieces are sparse until written
        if written > size:
            return
        time.sleep(0.05)
    raise AssertionError("the transfer never got going")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def processes_of(user: str, needle: str, program: str = "") -> dict[int, int]:
    """pid → parent pid of ``user``'s live processes whose command line (its arguments
    joined by NUL bytes) contains ``needle`` and whose program's name starts with
    ``program``."""
    uid = pwd.getpwnam(user).pw_uid
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        named = Path(cmdline.split(b"\0")[0].decode()).name.startswith(program)
        if named and needle.encode() in cmdline and stat[0] != "Z":
            found[int(entry)] = int(stat[1])
    return found


def upload_helpers(user: str) -> dict[int, int]:
    """pid → parent pid of ``user``'s upload helpers (and their guards) uploading: their
    command line holds the ``--`` before the glance command, which the helper's lookups
    (``--find``) and checks, running the same source, do not."""
    return processes_of(user, "\0--\0", "python")


def run_upload_helper(
    python: str, env: Mapping[str, str], data: bytes, work: Path, **fields: str
) -> tuple[subprocess.CompletedProcess[str], bytes]:
    """The upload helper, run here as ssh runs it there (``python -c``, the creds' variables in
    its environment), on a file that has arrived whole; what it printed, and what the glance
    command it falls back to (``cat`` into a file, here) was given."""
    arrived, given = work / "arrived.part", work / "given"
    arrived.write_bytes(data)
    given.write_bytes(b"")
    fields = {"disk_format": "raw", "container_format": "bare", **fields}
    out, err = work / "out", work / "err"
    with out.open("w") as stdout, err.open("w") as stderr:
        helper = subprocess.Popen(
            [python, "-c", follow_upload_source(), f"--http-fields={json.dumps(fields)}",
             str(arrived), str(len(data)), "sha256", hashlib.sha256(data).hexdigest(), "30",
             "--", "sh", "-c", 'exec cat > "$1"', "sh", str(given)],
            stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, text=True,
            env={"PATH": os.environ["PATH"], "LANG": "C", **env},
        )  # fmt: skip
    assert helper.stdin is not None
    try:  # migratio says "done" once rsync has finished, and stays connected until the end
        helper.stdin.write("done\n")
        helper.stdin.flush()
        helper.wait(timeout=120)
    finally:
        helper.stdin.close()
        helper.kill()
        helper.wait()
    return subprocess.CompletedProcess(
        helper.args, helper.returncode, out.read_text(), err.read_text()
    ), given.read_bytes()
